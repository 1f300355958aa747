"""WideNet (Xue et al., "Go Wider Instead of Deeper", AAAI 2022): one attention and one MoE
feed-forward shared by every block, each block with its own two LayerNorms.

The shared modules are held once (``model.attn``, ``model.moe``) and the per-block norms in
``norms1`` / ``norms2``, so the state dict has each tensor under one name. Presets route top-2
with gaussian noise, capacity factor 1.2 (the paper's; ColossalAI's class default is 1.25) and
the two raw router probabilities as combine weights, not renormalised, as in ColossalAI's
Top2Router (WideNet's code) and V-MoE: ``widenet_cifar`` (32x32, patch 4, 6 blocks, d_model
256, 4 heads, MLP ratio 2, 4 experts, the ViT-Lite shape) and ``widenet_imagenet`` (WideNet-B
shape: 224x224, patch 16, 12 blocks, d_model 768, 12 heads, expert hidden size 4096, 4 experts,
1000 classes: 29M parameters, as in the paper).

Legend: B batch, S sequence, D model dim.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from ..config import _is_int
from .base import VisionModel
from .config import VisionConfig
from .layers import Attention, DropPath
from .registry import register


class WideNet(VisionModel):
    """``logits, aux_loss = model(images)``; aux_loss sums the shared MoE's loss of every block.

    The shared MoE runs ``depth`` times per forward, so its ``last_stats`` only describe the
    last block; :meth:`routing_stats` returns one record per block.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 10, depth: int = 6, d_model: int = 256, num_heads: int = 4,
                 mlp_ratio: float = 2.0, num_experts: int = 4, top_k: int = 2,
                 capacity_factor: float = 1.25, eval_capacity_factor: Optional[float] = None,
                 noise_policy: Optional[str] = "gaussian", drop_rate: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, qkv_bias: bool = False,
                 patch_bias: bool = False, **moe_kwargs):
        if not _is_int(num_experts) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive int for WideNet, got {num_experts!r}")
        cfg = VisionConfig.from_kwargs(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            depth=depth, d_model=d_model, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_experts=num_experts, moe_every=1, top_k=top_k, capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor, noise_policy=noise_policy,
            drop_rate=drop_rate, attn_drop=attn_drop, drop_path=drop_path, qkv_bias=qkv_bias,
            patch_bias=patch_bias, **moe_kwargs)
        super().__init__(cfg)
        D = cfg.d_model
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop, cfg.drop_rate,
                              cfg.kernels)
        self.moe = self._make_moe(num_experts, top_k, noise_policy, residual=False)
        self.norms1 = nn.ModuleList(nn.LayerNorm(D, eps=cfg.norm_eps) for _ in range(depth))
        self.norms2 = nn.ModuleList(nn.LayerNorm(D, eps=cfg.norm_eps) for _ in range(depth))
        self.drop_paths = nn.ModuleList(
            DropPath(cfg.drop_path * i / max(depth - 1, 1)) for i in range(depth))
        self._last_block_stats: list = []
        self._init_weights()

    def _run_blocks(self, x_BSD: Tensor, aux: Tensor, stats: list) -> tuple[Tensor, Tensor]:
        for n1, n2, dp in zip(self.norms1, self.norms2, self.drop_paths):
            x_BSD, a, s = self._call_block(self._block, x_BSD, n1, n2, dp)
            stats.append(s)
            aux = aux + a
        self._last_block_stats = list(stats)
        return x_BSD, aux

    def _block(self, x_BSD: Tensor, n1: nn.Module, n2: nn.Module, dp: nn.Module):
        """One block: the shared attention and MoE with this block's norms and drop path."""
        x_BSD = x_BSD + dp(self.attn(n1(x_BSD)))
        h_BSD, a, s = self.moe(n2(x_BSD), return_stats=True)
        return x_BSD + dp(h_BSD), a, s

    def routing_stats(self) -> list[dict]:
        """One dict per block (the shared MoE's statistics at that block) of the last forward."""
        return [s.as_dict() for s in self._last_block_stats if s is not None]

    def block_experts(self) -> list[int]:
        return [self.config.num_experts] * self.config.depth

    def _block_moe_configs(self):
        return [self.moe.config] * self.config.depth


def _widenet(**preset):
    def build(**overrides) -> WideNet:
        kw = dict(preset)
        kw.update(overrides)
        return WideNet(**kw)
    return build


PAPER_ROUTING = dict(top_k=2, capacity_factor=1.2, normalize_weights=False)
register("widenet_cifar", "WideNet for CIFAR: 6 blocks sharing attention and a 4-expert top-2 "
         "MoE, own LayerNorms")(_widenet(img_size=32, patch_size=4, depth=6, d_model=256,
                                   num_heads=4, mlp_ratio=2.0, num_experts=4, **PAPER_ROUTING))
# WideNet-B: the experts' hidden size is 4096 (moe_mlp_dim of the authors' ViT-MoE-B config), not
# ViT-B's 3072; that gives the paper's 29M parameters. Stored as a ratio, so a d_model override
# keeps d_ff = d_model * 16 / 3.
register("widenet_imagenet", "WideNet-B for ImageNet (224x224, 12 blocks, dim 768, 4 experts; "
         "29M parameters)")(_widenet(img_size=224, patch_size=16, num_classes=1000, depth=12,
                                      d_model=768, num_heads=12, mlp_ratio=4096 / 768,
                                      num_experts=4, **PAPER_ROUTING))

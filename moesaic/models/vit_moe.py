"""ViT-MoE: a pre-norm ViT (class token, learned position embeddings) whose every
``moe_every``-th block has an MoE feed-forward; ``num_experts=0`` is the dense ViT.

Presets (CIFAR-sized, patch 4 on 32x32 images, d_model 256, 4 heads, MLP ratio 2):
``vit_lite6`` / ``vit_lite7`` are ViT-Lite-6/4 and 7/4 of Hassani et al., "Escaping the Big Data
Paradigm with Compact Transformers" (2021), which lists 3.19M and 3.72M parameters; 3,190,282 and
3,716,618 here, with a class token (not sequence pooling), 65 learned positions, a bias-free 4x4
patch projection, attention ``qkv`` without bias, biased output projection and MLP, and a linear
head on the class token. The block is the standard pre-norm block (LayerNorm before each
sub-block and at the end), as in ColossalAI's ViT-MoE that made the 90.66% run below; the
Compact Transformers code differs in places (its block also normalises the residual stream after
attention, its patch convolution has a bias, its presets use attention dropout and stochastic
depth 0.1), so these presets match its sizes, not its every detail. ``vit_moe_lite6/7`` put 8 experts (top-1) on the
odd blocks: the same FLOPs as the dense twin with 2.7x / 2.4x its parameters.
``vit_moe_lite6_prmoe`` is PR-MoE (Rajbhandari et al., DeepSpeed-MoE 2022) as used for the
90.66% CIFAR-10 ViT-MoE-Lite6 run of ColossalAI: experts [4, 4, 8] on blocks 1, 3, 5, a dense
residual MLP mixed per token, top-1 routing, jitter noise.

Legend: B batch, S sequence, D model dim.
"""
from __future__ import annotations

from typing import Optional, Union

import torch.nn as nn
from torch import Tensor

from .base import VisionModel
from .config import VisionConfig
from .layers import Attention, Block, FeedForward
from .registry import register


class ViTMoE(VisionModel):
    """``logits, aux_loss = model(images)``; aux_loss sums the MoE blocks' auxiliary losses.

    Extra keyword options (``aux_loss_coef``, ``drop_tokens``, ``kernels``, ...) go to every
    :class:`moesaic.MoE`. ``qkv_bias`` and ``patch_bias`` default to False as in ViT-Lite.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 10, depth: int = 6, d_model: int = 256, num_heads: int = 4,
                 mlp_ratio: float = 2.0, num_experts: Union[int, list] = 0, moe_every: int = 2,
                 top_k: int = 1, residual: bool = False, capacity_factor: float = 1.25,
                 eval_capacity_factor: Optional[float] = None, noise_policy: Optional[str] = None,
                 drop_rate: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 qkv_bias: bool = False, patch_bias: bool = False, **moe_kwargs):
        cfg = VisionConfig.from_kwargs(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            depth=depth, d_model=d_model, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_experts=num_experts, moe_every=moe_every, top_k=top_k, residual=residual,
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
            noise_policy=noise_policy, drop_rate=drop_rate, attn_drop=attn_drop,
            drop_path=drop_path, qkv_bias=qkv_bias, patch_bias=patch_bias, **moe_kwargs)
        super().__init__(cfg)
        blocks = []
        for i, E in enumerate(cfg.experts_per_block()):
            dp = cfg.drop_path * i / max(cfg.depth - 1, 1)
            attn = Attention(cfg.d_model, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop, cfg.drop_rate,
                             cfg.kernels)
            ffn = (FeedForward(cfg.d_model, cfg.d_ff, cfg.drop_rate, cfg.kernels) if E == 0 else
                   self._make_moe(E, cfg.top_k, cfg.noise_policy, cfg.residual))
            blocks.append(Block(cfg.d_model, attn, ffn, dp, cfg.norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self._init_weights()

    def _run_blocks(self, x_BSD: Tensor, aux: Tensor, stats: list) -> tuple[Tensor, Tensor]:
        for blk in self.blocks:
            x_BSD, a, s = self._call_block(blk, x_BSD)
            if a is not None:
                aux = aux + a
                stats.append(s)
        return x_BSD, aux

    def block_experts(self) -> list[int]:
        return self.config.experts_per_block()

    def _block_moe_configs(self):
        return [blk.ffn.config if blk.is_moe else None for blk in self.blocks]


def _lite(depth: int, **preset):
    def build(**overrides) -> ViTMoE:
        kw = dict(img_size=32, patch_size=4, depth=depth, d_model=256, num_heads=4, mlp_ratio=2.0)
        kw.update(preset)
        kw.update(overrides)
        return ViTMoE(**kw)
    return build


register("vit_lite6", "dense ViT-Lite-6/4 (depth 6, dim 256, 4 heads, MLP ratio 2)")(_lite(6))
register("vit_lite7", "dense ViT-Lite-7/4 (depth 7, dim 256)")(_lite(7))
register("vit_moe_lite6", "ViT-Lite-6/4 with 8 top-1 experts in every second block")(
    _lite(6, num_experts=8, top_k=1))
register("vit_moe_lite7", "ViT-Lite-7/4 with 8 top-1 experts in every second block")(
    _lite(7, num_experts=8, top_k=1))
register("vit_moe_lite6_prmoe", "PR-MoE ViT-Lite-6/4: experts [4, 4, 8], residual MLP, top-1, "
         "jitter (the preset the 90.66% recipe builds on)")(_lite(6, num_experts=[4, 4, 8], top_k=1, residual=True,
                                              noise_policy="jitter"))


@register("vit_moe_tiny")
def vit_moe_tiny(**overrides) -> ViTMoE:
    """Small ViT-MoE for quick runs (the embedded digits default's model).

    The digits default builds it with img_size=8, in_chans=1: four 4x4 patches."""
    kw = dict(depth=4, d_model=64, num_heads=4, mlp_ratio=2.0, num_experts=4, top_k=1)
    kw.update(overrides)
    return ViTMoE(**kw)

"""Building blocks of the vision transformers: patch embedding, attention, feed-forward, block.

A :class:`Block` is pre-norm: ``x + attn(norm1(x))`` then ``x + ffn(norm2(x))``, where the
feed-forward is either a dense MLP or a :class:`moesaic.MoE` (whose aux loss and routing
statistics the block returns).
Attention and feed-forward modules may be shared between blocks (WideNet); norms never are.

Legend: B batch, C channels, H/W image height/width, P patches, S sequence (P + 1 with the class
token), D model dim, F ffn dim, Hd heads, Dh head dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import keyed
from ..layer import MoE
from ..routing import RoutingStats


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly projected: [B, C, H, W] -> [B, P, D]."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, d_model: int, bias: bool):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.proj = nn.Conv2d(in_chans, d_model, patch_size, stride=patch_size, bias=bias)

    def forward(self, images_BCHW: Tensor) -> Tensor:
        B, C, H, W = images_BCHW.shape
        if H != self.img_size or W != self.img_size or C != self.proj.in_channels:
            raise ValueError(f"expected images of shape [B, {self.proj.in_channels}, "
                             f"{self.img_size}, {self.img_size}], got {tuple(images_BCHW.shape)}")
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (fused scaled-dot-product kernel)."""

    def __init__(self, d_model: int, num_heads: int, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, kernels: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_drop = attn_drop
        self.proj_drop = keyed.Dropout(proj_drop, kernels=kernels)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        qkv = self.qkv(x_BSD).reshape(B, S, 3, self.num_heads, D // self.num_heads)
        q_BHSd, k_BHSd, v_BHSd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop if self.training else 0.0
        if p > 0 and keyed.active():  # masks keyed by sample: the unfused form
            o_BHSd = keyed.attention(q_BHSd, k_BHSd, v_BHSd, p)
        else:
            o_BHSd = F.scaled_dot_product_attention(q_BHSd, k_BHSd, v_BHSd, dropout_p=p)
        return self.proj_drop(self.proj(o_BHSd.transpose(1, 2).reshape(B, S, D)))


class FeedForward(nn.Module):
    """Dense D -> F -> D MLP with exact GELU (the dense twin of an MoE block)."""

    def __init__(self, d_model: int, d_ff: int, drop: float = 0.0, kernels: str = "auto"):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = keyed.Dropout(drop, kernels=kernels)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        if keyed.active():
            keep = keyed.keep_samples(x, self.p).view(shape)
        else:
            keep = x.new_empty(shape).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block; ``forward`` returns (x, aux_loss, routing stats), the last
    two None in a dense block."""

    def __init__(self, d_model: int, attn: nn.Module, ffn: nn.Module, drop_path: float = 0.0,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = ffn
        self.drop_path = DropPath(drop_path)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[RoutingStats]]:
        x_BSD = x_BSD + self.drop_path(self.attn(self.norm1(x_BSD)))
        h_BSD = self.norm2(x_BSD)
        aux = stats = None
        if self.is_moe:
            h_BSD, aux, stats = self.ffn(h_BSD, return_stats=True)
        else:
            h_BSD = self.ffn(h_BSD)
        return x_BSD + self.drop_path(h_BSD), aux, stats


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """timm-style init: truncated normal (std 0.02) for linear/conv weights, zero biases, unit
    LayerNorms. Modules inside a :class:`moesaic.MoE` keep their own init (experts are seeded
    per global expert so that expert parallelism reproduces single-process weights)."""
    inside_moe = set()
    for m in model.modules():
        if isinstance(m, MoE):
            inside_moe.update(id(s) for s in m.modules())
    for m in model.modules():
        if id(m) in inside_moe:
            continue
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

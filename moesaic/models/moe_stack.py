"""The smallest model around MoE layers: Linear -> residual MoE layers -> Linear.

For tests, benchmarks and as a usage example: ``y, aux_loss = model(x)`` on [..., D] inputs,
one MoE layer per entry of ``experts`` (so pyramids like (4, 8) are one argument).

Legend: D model dim, F ffn dim.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor

from ..layer import MoE


class MoEStack(nn.Module):
    """``h = inp(x); h = h + moe_i(h)`` for each layer; ``out(h)`` and the summed aux losses.

    ``moe_kwargs`` go to every :class:`moesaic.MoE`; ``top_k`` is capped at each layer's
    expert count."""

    def __init__(self, d_model: int, d_ff: int, experts: Sequence[int], top_k: int = 1,
                 **moe_kwargs):
        super().__init__()
        self.inp = nn.Linear(d_model, d_model)
        self.moes = nn.ModuleList(
            MoE(d_model, d_ff, e, top_k=min(top_k, e), **moe_kwargs) for e in experts)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, return_stats: bool = False):
        """``(y, aux_loss)``, or ``(y, aux_loss, stats)`` with one RoutingStats per layer."""
        h = self.inp(x)
        aux = h.new_zeros(())
        stats = []
        for moe in self.moes:
            y, a, s = moe(h, return_stats=True)
            h, aux = h + y, aux + a
            stats.append(s)
        return (self.out(h), aux, stats) if return_stats else (self.out(h), aux)

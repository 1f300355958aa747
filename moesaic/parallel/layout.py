"""Which ranks hold which experts. Pure bookkeeping: no process groups, no collectives.

The parallel context set by ``moesaic.init_distributed`` decides each layer's ep_size; with no
context (a single process) every layer holds all its experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ExpertLayout:
    """Expert placement of one layer: ``global_ids`` are the experts this rank holds."""

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def global_ids(self) -> list[int]:
        n = self.num_local_experts
        return list(range(self.ep_rank * n, (self.ep_rank + 1) * n))


_context: Optional[object] = None


def set_context(ctx) -> None:
    """Installed by ``init_distributed``; ``ctx.layout_for(num_experts)`` gives a layout."""
    global _context
    _context = ctx


def get_context():
    return _context


def expert_layout(num_experts: int) -> ExpertLayout:
    if _context is None:
        return ExpertLayout(num_experts)
    return _context.layout_for(num_experts)


def next_layer_seed() -> int:
    """A seed for the next layer's experts, drawn from the default generator (identical on
    every rank when ranks are seeded alike, whatever the layout)."""
    return int(torch.randint(0, 2**62, (1,)).item())

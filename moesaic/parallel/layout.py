"""Which ranks hold which experts, and the seeds of each layer's experts. Pure bookkeeping:
no process groups, no collectives.

The parallel context set by ``moesaic.init_distributed`` decides each layer's ep_size; with no
context (a single process) every layer holds all its experts. Expert-parallel groups are
contiguous ranks: rank r is ep_rank ``r % ep_size`` of group ``r // ep_size``.

Legend: E experts of a layer, W world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ExpertLayout:
    """Expert placement of one layer: ``global_ids`` are the experts this rank holds.

    ``edp_size`` is the number of ranks that hold each expert (the expert-data-parallel size,
    world size / ep_size); ``edp_size > 1`` with ``ep_size == num_experts < max_ep_size`` means
    replicated experts.
    """

    num_experts: int
    ep_size: int = 1
    ep_rank: int = 0
    edp_size: int = 1

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def global_ids(self) -> list[int]:
        n = self.num_local_experts
        return list(range(self.ep_rank * n, (self.ep_rank + 1) * n))


def ep_size_for(num_experts: int, max_ep_size: int) -> int:
    """ep_size = max_ep_size when E % max_ep_size == 0; E when max_ep_size % E == 0."""
    if num_experts % max_ep_size == 0:
        return max_ep_size
    if max_ep_size % num_experts == 0:
        return num_experts
    raise ValueError(f"num_experts ({num_experts}) and max_ep_size ({max_ep_size}; the world "
                     "size unless set: the training config's max_ep_size, or "
                     "init_distributed(max_ep_size=...)): one must divide the other to lay the "
                     "experts out over the ranks; run on a number of processes that divides "
                     "num_experts (or that it divides), pick num_experts accordingly, or set "
                     "max_ep_size=1 to keep every expert on every rank")


def layout_for(num_experts: int, max_ep_size: int, rank: int, world_size: int) -> ExpertLayout:
    """The layout of a layer with ``num_experts`` experts on ``rank`` of ``world_size``."""
    ep = ep_size_for(num_experts, max_ep_size)
    return ExpertLayout(num_experts, ep, rank % ep, world_size // ep)


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


_MASK = 2**62 - 1
_seed_state: Optional[list] = None  # [seed, next layer index, rank streams set for], moe_set_seed


def mix_seed(*parts: int) -> int:
    """A 62-bit seed from integers (splitmix-style), identical on every machine."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


def set_layer_seed_base(seed: Optional[int]) -> None:
    """Layer seeds become ``mix_seed(seed, layer index)``, counting layers built from now on."""
    global _seed_state
    _seed_state = None if seed is None else [int(seed), 0, None]


def current_seed() -> Optional[int]:
    return None if _seed_state is None else _seed_state[0]


def next_layer_seed() -> int:
    """A seed for the next layer's experts. After ``moe_set_seed(s)`` it depends only on s and
    the layer's position (its index among MoE layers built since), whatever the layout and
    whatever else drew from the default generator; otherwise it is drawn from the default
    generator (identical on every rank when ranks are seeded alike)."""
    if _seed_state is None:
        return int(torch.randint(0, 2**62, (1,), device="cpu").item())  # also under meta
    seed, index, _ = _seed_state
    _seed_state[1] += 1
    return mix_seed(seed, index, 0x1A7E5)


def claim_rank_streams(rank: int) -> bool:
    """True the first time it is asked for ``rank`` since the last ``moe_set_seed``: the caller
    then reseeds the rank's streams (a later model, e.g. an EMA copy, must not restart them)."""
    if _seed_state is None or _seed_state[2] == rank:
        return False
    _seed_state[2] = rank
    return True

"""Seeding for expert parallelism.

``moe_set_seed(s)`` seeds the default generators identically on every rank (so shared
parameters are identical) and makes each MoE layer's expert seed ``mix(s, layer index)``: an
expert's initial weights then depend only on (s, the layer's position, its global id), whatever
the layout. :func:`use_rank_streams` (called by ``parallelize``) then moves router noise and the
default generator (dropout) to per-rank streams.
"""
from __future__ import annotations

import random

import torch

from .layout import current_seed, mix_seed, set_layer_seed_base


def moe_set_seed(seed: int) -> None:
    """Seed Python's and torch's default generators with ``seed`` on every rank and restart the
    layer counter that numbers MoE layers for their expert seeds. Call before building the model."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    set_layer_seed_base(seed)


def use_rank_streams(moe_layers, rank: int) -> None:
    """Give each layer's router noise its own per-rank generator and reseed the default generator
    (dropout) per rank. A no-op when ``moe_set_seed`` was not called."""
    seed = current_seed()
    if seed is None:
        return
    for i, layer in enumerate(moe_layers):
        device = layer.router.weight.device
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(seed, rank, i, 0x2015E))
        layer.router.noise_generator = g
    torch.manual_seed(mix_seed(seed, rank, 0xD209))

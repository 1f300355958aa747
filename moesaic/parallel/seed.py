"""Seeding for expert parallelism.

``moe_set_seed(s)`` seeds the default generators identically on every rank (so shared
parameters are identical) and makes each MoE layer's expert seed ``mix(s, layer index)``: an
expert's initial weights then depend only on (s, the layer's position, its global id), whatever
the layout. :func:`use_rank_streams` (called by ``parallelize``) then reseeds the default
generator per rank, so ranks draw different dropout masks and router noise.
"""
from __future__ import annotations

import random

import torch

from .layout import current_seed, mix_seed, set_layer_seed_base


_calls = 0  # moe_set_seed calls so far: rank streams are switched on once per call
_streams_for = None  # (call, rank) whose rank streams are in place


def moe_set_seed(seed: int) -> None:
    """Seed Python's and torch's default generators with ``seed`` on every rank and restart the
    layer counter that numbers MoE layers for their expert seeds. Call before building the model."""
    global _calls
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)
    set_layer_seed_base(seed)
    _calls += 1


def use_rank_streams(rank: int) -> None:
    """Reseed the default generators (CPU and every CUDA device) per rank: dropout masks and router
    noise then differ between ranks and stay reproducible. Router noise stays on the default
    stream so that activation checkpointing, which restores only that stream, recomputes the same
    routing. Only the first call after each ``moe_set_seed`` reseeds: parallelizing a second
    model (an EMA copy) must not restart the streams. A no-op without ``moe_set_seed``."""
    global _streams_for
    seed = current_seed()
    if seed is None or _streams_for == (_calls, rank):
        return
    _streams_for = (_calls, rank)
    torch.manual_seed(mix_seed(seed, rank, 0xD209))

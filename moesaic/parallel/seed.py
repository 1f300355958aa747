"""Seeding for expert parallelism.

``moe_set_seed(s)`` seeds the default generators identically on every rank (so shared
parameters are identical) and makes each MoE layer's expert seed ``mix(s, layer index)``: an
expert's initial weights then depend only on (s, the layer's position, its global id), whatever
the layout. :func:`use_rank_streams` (called by ``parallelize``) then reseeds the default
generator per rank, so ranks draw different dropout masks and router noise.
"""
from __future__ import annotations

import contextlib
import numbers
import random

import torch

from . import layout
from .layout import claim_rank_streams, current_seed, mix_seed, set_layer_seed_base


def moe_set_seed(seed: int) -> None:
    """Seed Python's and torch's default generators with ``seed`` on every rank and restart the
    layer counter that numbers MoE layers for their expert seeds. Call before building the model."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    set_layer_seed_base(seed)


@contextlib.contextmanager
def generators_untouched():
    """Build a throwaway model (say, on the meta device to read its settings) leaving Python's
    and torch's CPU generators and the MoE layer counter as they were, so the next real model
    gets the weights it would have got."""
    saved, py = None if layout._seed_state is None else list(layout._seed_state), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            layout._seed_state = saved
            random.setstate(py)


def use_rank_streams(rank: int) -> None:
    """Reseed the default generators (CPU and every CUDA device) per rank: dropout masks and router
    noise then differ between ranks and stay reproducible. Router noise stays on the default
    stream so that activation checkpointing, which restores only that stream, recomputes the same
    routing. Only the first call after each ``moe_set_seed`` reseeds: parallelizing a second
    model (an EMA copy) must not restart the streams. A no-op without ``moe_set_seed``."""
    seed = current_seed()
    if seed is not None and claim_rank_streams(rank):
        torch.manual_seed(mix_seed(seed, rank, 0xD209))

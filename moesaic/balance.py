"""Auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3): a per-expert bias that
steers which experts tokens choose, updated outside autograd.

A layer built with ``bias_update_rate`` u > 0 chooses each token's experts by probability +
``router.expert_bias`` (the combine weights stay the probabilities) and counts its assignments
in training. :func:`update_expert_biases`, called after every optimizer step, moves each
expert's bias by +u if it got fewer assignments than the layer's mean since the last call and
by -u if it got more, then clears the counts. The counts are summed over every rank first, so
the biases stay equal everywhere and do not depend on how the experts are split.

Legend: E experts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .layer import moe_layers
from .parallel.comm import run_collective
from .parallel.layout import get_context


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> None:
    """One bias step for every MoE layer of ``model`` with ``bias_update_rate`` > 0 (a no-op for
    the others). Under ``init_distributed`` every rank must call it (one all-reduce of the
    counts); a checkpointed recomputation or an eval pass adds no counts."""
    layers = [m for m in moe_layers(model) if m.config.bias_update_rate > 0]
    if not layers:
        return
    counts = torch.cat([m.load_counts for m in layers])
    ctx = get_context()
    if ctx is not None and ctx.distributed:
        run_collective("expert-bias count all-reduce", range(ctx.world_size), dist.all_reduce,
                       counts)
    for m, load_E in zip(layers, counts.split([m.config.num_experts for m in layers])):
        load_E = load_E.float()
        m.router.expert_bias += m.config.bias_update_rate * torch.sign(load_E.mean() - load_E)
        m.load_counts.zero_()

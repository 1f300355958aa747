"""Gradient clipping by the global norm of the whole (distributed) model, each expert counted once.

Shared gradients are identical on every rank after synchronisation, so they are summed locally.
Every global expert is held by edp_size ranks (one per ep group), so each rank adds its experts'
|g|^p divided by their layer's edp_size and one all-reduce over the world sums each expert once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ..experts import Experts
from .comm import run_collective
from .layout import get_context


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None) -> Tensor:
    """Scale all gradients so their global ``norm_type``-norm is at most ``max_norm``; returns
    the norm before clipping (float32 scalar, identical on every rank). As
    ``torch.nn.utils.clip_grad_norm_``: ``error_if_nonfinite`` raises on a NaN or infinite norm
    (one host sync), ``foreach=False`` scales tensor by tensor."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"clip_grad_norm_ takes the model (an nn.Module), got a "
                        f"{type(model).__name__}: it needs the MoE layers to count each expert "
                        "once, so pass the model rather than model.parameters()")
    if not (max_norm > 0):
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm_type = float(norm_type)
    ctx = get_context()
    from ..layer import MoE

    edp_of = {id(m.experts): m.layout.edp_size for m in model.modules() if isinstance(m, MoE)}
    expert_ids, weighted = set(), []
    for m in model.modules():
        if isinstance(m, Experts):
            for p in m.parameters():
                expert_ids.add(id(p))
                if p.grad is not None:
                    weighted.append((p.grad, edp_of.get(id(m), 1)))
    shared = [p.grad for p in model.parameters() if id(p) not in expert_ids and p.grad is not None]
    device = next(model.parameters()).device
    inf = math.isinf(norm_type)

    def part(g: Tensor) -> Tensor:
        g = g.detach().float()
        return g.abs().max() if inf else g.abs().pow(norm_type).sum()

    shared_t = torch.zeros((), device=device)
    expert_t = torch.zeros((), device=device)
    for g in shared:
        shared_t = torch.maximum(shared_t, part(g)) if inf else shared_t + part(g)
    for g, edp in weighted:
        expert_t = torch.maximum(expert_t, part(g)) if inf else expert_t + part(g) / edp
    if ctx is not None and ctx.distributed:
        op = dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM
        run_collective("gradient-norm all-reduce", range(ctx.world_size), dist.all_reduce,
                       expert_t, op=op)
    total = torch.maximum(shared_t, expert_t) if inf else (shared_t + expert_t) ** (1 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"The total norm of order {norm_type} of the gradients is "
                           f"{float(total)}, so it cannot be clipped; pass "
                           "error_if_nonfinite=False to clip anyway (the gradients then "
                           "become NaN or zero)")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = shared + [g for g, _ in weighted]
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault((g.device, g.dtype), []).append(g)
    for (dev, dtype), gs in by_dtype.items():
        c = coef.to(device=dev, dtype=dtype)
        if foreach is False:
            for g in gs:
                g.mul_(c)
        else:
            torch._foreach_mul_(gs, c)
    return total

"""Full (global-expert-indexed) state dicts: gather on rank 0, load into any layout.

A full state dict is the model's ``state_dict()`` with every expert tensor of shape
[E_global, ...] (expert ``i`` at row ``i``), i.e. exactly what a single process holds; it loads
into a model laid out with any max_ep_size, and into a one-process model.

Legend: E global experts of a layer, L local experts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import run_collective
from .layout import get_context


def _expert_entries(model: nn.Module) -> dict:
    """state-dict key of each expert tensor -> (layer, the MoE layer's layout)."""
    from ..layer import MoE

    out = {}
    for name, m in model.named_modules(remove_duplicate=False):  # a layer under two names too
        if isinstance(m, MoE):
            prefix = f"{name}.experts." if name else "experts."
            for pname, _ in m.experts.named_parameters():
                out[prefix + pname] = m
    return out


@torch.no_grad()
def full_state_dict(model: nn.Module, all_ranks: bool = False) -> dict:
    """The model's full state dict on rank 0 (every rank with ``all_ranks=True``); other ranks
    get ``{}``. Collective: every rank must call it. Tensors are detached CPU copies."""
    ctx = get_context()
    local = model.state_dict()
    experts = _expert_entries(model)
    distributed = ctx is not None and ctx.distributed
    want = all_ranks or not distributed or ctx.is_main
    out = {}
    for key, t in local.items():
        m = experts.get(key)
        if m is None or m.layout.ep_size == 1 or not distributed:
            if want:
                out[key] = t.detach().cpu().clone()
            continue
        g = ctx.groups(m.layout.ep_size)
        parts = [torch.empty_like(t) for _ in g.ep_ranks]
        run_collective("gather of expert weights", g.ep_ranks, dist.all_gather, parts,
                       t.contiguous(), group=g.ep_group)
        if want:
            out[key] = torch.cat(parts).cpu()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict, strict: bool = True):
    """Load a full state dict into ``model`` whatever its layout: each expert tensor is sliced to
    the experts this rank holds (``layer.experts.global_ids``). Not collective."""
    experts = _expert_entries(model)
    local = {}
    for key, t in state.items():
        m = experts.get(key)
        if m is not None:
            E = m.config.num_experts
            if t.shape[0] != E:
                raise ValueError(f"{key}: the state dict holds {t.shape[0]} experts (shape "
                                 f"{tuple(t.shape)}), the model {E}")
            t = t[m.experts.global_ids[0]:m.experts.global_ids[-1] + 1]
        local[key] = t
    return model.load_state_dict(local, strict=strict)

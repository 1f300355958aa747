"""``parallelize(model)``: check that every rank built the same model, install the all-to-all
dispatchers, synchronise shared state and attach gradient synchronisation.

The model object is returned as it is (no wrapper), so its attributes and methods stay usable.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..experts import Experts
from ..layer import MoE, moe_layers
from .comm import PICKLE_ERROR, CommStats, CountSum, run_collective
from .context import _HOLDERS, ParallelContext, hold_groups
from .dispatcher import AllToAllDispatcher
from .grad_sync import GradSync, StaleSyncHook, scale_grad_hooks
from .layout import get_context
from .seed import use_rank_streams


@dataclass(eq=False)  # compared and hashed by identity (destroy keeps a weak set of them)
class ParallelState:
    """What ``parallelize`` attached to a model (``model.moesaic_parallel``)."""

    ctx: ParallelContext
    moe_layers: list
    grad_sync: Optional[GradSync]
    stats: CommStats
    hooks: list = field(default_factory=list)
    released: bool = False

    def __deepcopy__(self, memo):
        """A deep copy of a parallelized model is not parallelized for training: it has its own
        parameters (without the gradient hooks) and no state; its MoE layers share the original's
        all-to-all groups, so it runs forward passes (an EMA copy) and ``parallelize(copy)``
        makes it a trainable parallel model of its own."""
        return None

    def __getstate__(self):
        if self.ctx.distributed:
            raise TypeError(PICKLE_ERROR)
        return dict(self.__dict__)  # one process: nothing that cannot be pickled

    def release(self) -> None:
        """Let go of every process group (``moesaic.destroy`` calls this): the all-to-all
        dispatchers refuse to run afterwards, the gradient hooks are removed. ``parallelize``
        may then attach the model to a new process group."""
        self.released = True
        for layer in self.moe_layers:
            if isinstance(layer.dispatcher, AllToAllDispatcher):
                layer.dispatcher.release()
            if getattr(layer, "count_sum", None) is not None:
                layer.count_sum.release()
        if self.grad_sync is not None:
            self.grad_sync.release()
        for h in self.hooks:
            h.remove()
        self.hooks = []


def expert_param_ids(model: nn.Module) -> set:
    return {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}


def _signature(model: nn.Module) -> list:
    sig = [(f"MoE layer {n!r}", f"num_experts={m.config.num_experts}", f"ep_size={m.layout.ep_size}")
           for n, m in model.named_modules() if isinstance(m, MoE)]
    sig += [(f"MoE layer {n!r}", f"{k}={v!r}") for n, m in model.named_modules()
            if isinstance(m, MoE) for k, v in m.config.as_dict().items() if k != "kernels"]
    sig += [(f"parameter {n!r}", f"shape={tuple(p.shape)}", str(p.dtype))
            for n, p in model.named_parameters()]
    return sig


def _check_same_model(model: nn.Module, ctx: ParallelContext) -> None:
    mine = _signature(model)
    sigs = [None] * ctx.world_size
    run_collective("model check (all_gather_object)", range(ctx.world_size),
                   dist.all_gather_object, sigs, mine)
    ref = sigs[0]
    for r, sig in enumerate(sigs):
        if sig == ref:
            continue
        for a, b in zip(ref, sig):
            if a != b:
                raise ValueError(f"ranks disagree on the model: rank 0 has {a}, rank {r} has {b}")
        raise ValueError(f"ranks disagree on the model: rank 0 has {len(ref)} entries "
                         f"(parameters and MoE layers), rank {r} has {len(sig)}")


@torch.no_grad()
def _broadcast_coalesced(tensors: list, ranks, group=None, what="shared parameters") -> None:
    """Copy ``tensors`` from ``ranks[0]`` to the other ranks of ``group`` (default: world)."""
    by_dtype = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        run_collective(f"broadcast of {what}", ranks, dist.broadcast, flat, ranks[0], group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def parallelize(model: nn.Module, bucket_mb: float = 25.0, dedup_tokens: bool = False
                ) -> nn.Module:
    """Make a model built under ``init_distributed`` train as one model over all ranks.

    Checks that every rank built the same model (a clear ``ValueError`` otherwise), installs an
    all-to-all dispatcher on every MoE layer whose ep_size > 1, broadcasts shared parameters
    and buffers from rank 0, attaches bucketed gradient all-reduce (shared parameters over the
    world, experts over their expert-data-parallel group, both giving the mean over the world's
    tokens) and moves router noise and dropout to per-rank streams (outside
    :func:`moesaic.sample_keys`, which keys them by sample instead). With ``dedup_tokens`` the
    dropless layers (and those of ``capacity_scope="global"`` in training, whose kept rows are
    ragged too) send a token to a rank once, however many of its experts the rank holds
    (:mod:`moesaic.parallel.dedup`; worth it for top_k >= 2, above all with group-limited
    routing). Returns ``model`` itself.
    """
    old = parallel_state(model)
    if old is not None and not old.released:
        was = {d.dedup for d in (getattr(m, "dispatcher", None) for m in old.moe_layers)
               if isinstance(d, AllToAllDispatcher)}
        if was and was != {dedup_tokens}:
            raise ValueError(f"the model is already parallelized with dedup_tokens="
                             f"{was.pop()}; parallelize runs once per model")
        return model
    for name, m in model.named_modules():
        inner = parallel_state(m)
        if m is not model and inner is not None and not inner.released:
            raise ValueError(f"submodule {name!r} is already parallelized: call parallelize once, "
                             "on the outermost model (a second set of gradient hooks would "
                             "scale and average its gradients twice)")
    ctx = get_context() or ParallelContext()
    layers = moe_layers(model)
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            want = ctx.layout_for(m.config.num_experts)
            if m.layout != want:
                raise ValueError(f"MoE layer {name!r} was built with {m.layout}, but the parallel "
                                 f"context wants {want}: build the model after init_distributed")
            if m.layout.ep_size > 1 and not ctx.distributed:
                raise ValueError(f"MoE layer {name!r} splits its experts over "
                                 f"{m.layout.ep_size} ranks but the parallel context has no "
                                 "process group (after moesaic.destroy?): call init_distributed")
    stats = CommStats()
    state = ParallelState(ctx, layers, None, stats)
    if ctx.distributed:
        _check_same_model(model, ctx)
        expert_ids = expert_param_ids(model)
        shared = [p for p in model.parameters() if id(p) not in expert_ids]
        _broadcast_coalesced(shared + list(model.buffers()), tuple(range(ctx.world_size)))
        sync_groups = [(ctx.grad_group(), tuple(range(ctx.world_size)), shared)]
        by_ep = {}
        for layer in layers:
            g = ctx.groups(layer.layout.ep_size)
            if g.ep_size > 1:
                layer.dispatcher = AllToAllDispatcher(g.ep_group, g.ep_ranks,
                                                      layer.config.num_experts, stats,
                                                      dedup=dedup_tokens)
            params = list(layer.experts.parameters())
            state.hooks += scale_grad_hooks(params, 1.0 / g.ep_size)
            by_ep.setdefault(g.ep_size, (g, []))[1].extend(params)
        for g, params in by_ep.values():
            if g.edp_group is not None:  # replicated experts start equal, like shared weights
                _broadcast_coalesced(params, g.edp_ranks, g.edp_group, "replicated experts")
                sync_groups.append((g.edp_group, g.edp_ranks, params))
        frozen = [(n, q) for n, q in model.named_parameters() if not q.requires_grad]
        state.grad_sync = GradSync(sync_groups, bucket_mb, frozen)
        scoped = [layer for layer in layers if "global" in (layer.config.balance_scope,
                                                            layer.config.capacity_scope)]
        if scoped:
            count_group = ctx.count_group()
            for layer in scoped:
                layer.count_sum = CountSum(count_group, tuple(range(ctx.world_size)))
        for m in {id(m): m for m in [model, *layers]}.values():  # a raised backward: see hook
            state.hooks.append(m.register_forward_pre_hook(StaleSyncHook(state.grad_sync)))
    _check_dedup_applies(layers, dedup_tokens)
    use_rank_streams(ctx.rank)
    hold_groups(state)
    model.moesaic_parallel = state
    return model


def _check_dedup_applies(layers: list, dedup_tokens: bool) -> None:
    """``dedup_tokens`` changes only token-choice layers with ragged plans (dropless, or
    ``capacity_scope="global"`` in training), top_k >= 2 and experts split over ranks: say so
    when a model has none (the option would do nothing). The same rule as
    :func:`moesaic.parallel.dedup.worth_it`, read from the configs instead of a plan."""
    if dedup_tokens and not any(
            m.layout.ep_size > 1 and m.config.top_k > 1 and m.config.router == "token_choice"
            and (not m.config.drop_tokens or m.config.capacity_scope == "global")
            for m in layers):
        warnings.warn("parallelize(dedup_tokens=True) has no effect on this model: no MoE layer "
                      "with top_k >= 2 and its experts split over ranks is dropless "
                      "(drop_tokens=False) or of capacity_scope='global'", stacklevel=3)


def parallel_state(model: nn.Module) -> Optional[ParallelState]:
    return getattr(model, "moesaic_parallel", None)


def grad_synced(p: torch.Tensor) -> bool:
    """Whether a live parallelized model (one not released by ``destroy``) averages ``p``'s
    gradient over ranks: replacing ``p`` then would leave its successor unsynchronised."""
    return any(isinstance(h, ParallelState) and not h.released and h.grad_sync is not None
               and h.grad_sync.covers(p) for h in list(_HOLDERS))


def comm_stats(model: nn.Module) -> CommStats:
    """Bytes this rank sent in MoE all-to-alls since the last ``reset()``."""
    state = parallel_state(model)
    return state.stats if state is not None else CommStats()


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Skip gradient synchronisation inside (local gradient accumulation); the first backward
    after it averages the accumulated gradients."""
    state = parallel_state(model)
    sync = state.grad_sync if state is not None else None
    if sync is None:
        yield
        return
    sync.enabled = False
    try:
        yield
    finally:
        sync.enabled = True


@contextlib.contextmanager
def equal_batches(model: nn.Module):
    """A promise that every rank of each ep group routes the same number of tokens in every MoE
    call inside (e.g. training on equal per-rank batches). Capacity mode then skips the
    exchange of the ranks' capacities: static block sizes, no host sync for the exchange. A broken promise
    fails in the all-to-all (or, on some backends, hangs or reads garbage), so leave it out for
    ragged batches such as a last evaluation batch. Dropless mode, and ``capacity_scope="global"``
    in training (ragged rows too), is unaffected."""
    dispatchers = [m.dispatcher for m in model.modules()
                   if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher)]
    before = [d.equal_batches for d in dispatchers]
    for d in dispatchers:
        d.equal_batches = True
    try:
        yield
    finally:
        for d, b in zip(dispatchers, before):
            d.equal_batches = b

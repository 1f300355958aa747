"""The parallel context: reads the torchrun environment, starts the process group and keeps
the expert-parallel (ep) and expert-data-parallel (edp) groups.

World = ep_size x edp_size for every layer. EP groups are contiguous ranks
([0..ep-1], [ep..2ep-1], ...); the EDP group of rank r is every rank with the same ``r % ep``.
Groups are made lazily by :func:`moesaic.parallelize`, after every rank has agreed on the model,
because making a group is itself a collective that all ranks must enter in the same order.

Legend: W world size, M max_ep_size, E experts of a layer.
"""
from __future__ import annotations

import datetime
import os
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from .layout import ExpertLayout, layout_for, set_context


@dataclass(frozen=True)
class LayerGroups:
    """The process groups of one ep_size: this rank's ep group and edp group (None when the
    group is this rank alone), with their ranks in order."""

    ep_size: int
    ep_ranks: tuple[int, ...]
    edp_ranks: tuple[int, ...]
    ep_group: Optional[object]
    edp_group: Optional[object]


@dataclass(eq=False)  # compared and hashed by identity (destroy keeps a weak set of them)
class ParallelContext:
    """What ``init_distributed`` returns: rank, world size and the layout rules."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    max_ep_size: int = 1
    timeout_s: float = 300.0
    backend: Optional[str] = None  # None: single process, no process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _groups: dict = field(default_factory=dict, repr=False)
    _grad_group: Optional[object] = field(default=None, repr=False)
    _count_group: Optional[object] = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def layout_for(self, num_experts: int) -> ExpertLayout:
        return layout_for(num_experts, self.max_ep_size, self.rank, self.world_size)

    def groups(self, ep_size: int) -> LayerGroups:
        """Groups for layers of this ep_size (collective on first use: every rank must ask for
        the same ep sizes in the same order)."""
        if ep_size in self._groups:
            return self._groups[ep_size]
        W, r = self.world_size, self.rank
        ep_lists = [list(range(g * ep_size, (g + 1) * ep_size)) for g in range(W // ep_size)]
        edp_lists = [list(range(i, W, ep_size)) for i in range(ep_size)]
        ep_ranks = tuple(ep_lists[r // ep_size])
        edp_ranks = tuple(edp_lists[r % ep_size])
        ep_group = self._subgroup(ep_lists) if ep_size > 1 else None
        edp_group = self._subgroup(edp_lists) if W // ep_size > 1 else None
        out = LayerGroups(ep_size, ep_ranks, edp_ranks, ep_group, edp_group)
        self._groups[ep_size] = out
        return out

    def grad_group(self):
        """A world group of its own for the shared-gradient all-reduce (kept apart from the
        default group so asynchronous bucket reductions never interleave with set-up traffic)."""
        if self._grad_group is None and self.distributed:
            self._grad_group = dist.new_group(list(range(self.world_size)), timeout=self.timeout)
        return self._grad_group

    def count_group(self):
        """A world group of its own for the global scopes' count sums and gathers (forward-time
        collectives, kept apart from the gradient buckets)."""
        if self._count_group is None and self.distributed:
            self._count_group = dist.new_group(list(range(self.world_size)), timeout=self.timeout)
        return self._count_group

    def release(self) -> None:
        """Drop this context's process-group objects (``destroy`` calls it)."""
        self._groups.clear()
        self._grad_group = None
        self._count_group = None
        self.backend = None

    def _subgroup(self, rank_lists):
        mine = None
        for ranks in rank_lists:
            g = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                mine = g
        return mine


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return default if v is None else int(v)


def init_distributed(max_ep_size: Optional[int] = None, timeout_s: float = 300.0,
                     backend: Optional[str] = None) -> ParallelContext:
    """Start (or join) the process group from the torchrun environment and install the layout.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them;
    without them (a plain ``python`` run) returns a one-process context and starts nothing.
    ``max_ep_size`` defaults to the world size. Backend: NCCL when CUDA is available, else gloo.
    Every collective of the job fails after ``timeout_s`` seconds instead of hanging.
    """
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    world = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if max_ep_size is None:
        max_ep_size = world
    if not (isinstance(max_ep_size, int) and max_ep_size >= 1):
        raise ValueError(f"max_ep_size must be a positive int, got {max_ep_size!r}")
    if world % max_ep_size != 0:
        raise ValueError(f"world size ({world}) is not divisible by max_ep_size ({max_ep_size})")
    device = torch.device("cpu")
    if world > 1 or dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    rank=rank, world_size=world)
        backend = dist.get_backend()
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    ctx = ParallelContext(rank, world, local_rank, max_ep_size, float(timeout_s), backend, device)
    hold_groups(ctx)
    set_context(ctx)
    return ctx


_HOLDERS = weakref.WeakSet()  # contexts and parallelized models' states: objects with release()


def hold_groups(holder) -> None:
    """Register an object that keeps process groups, so ``destroy`` can make it let go."""
    _HOLDERS.add(holder)


def destroy() -> None:
    """Remove the context and tear the process group down (safe to call twice).

    Every context and parallelized model first drops its process-group objects: kept alive
    until interpreter exit, their gloo threads were torn down in no set order and sometimes
    aborted the process ("terminate called without an active exception", exit code -6) after a
    clean run. A model used for expert parallelism cannot run distributed after this."""
    try:
        for holder in list(_HOLDERS):
            holder.release()
        _HOLDERS.clear()
    finally:
        set_context(None)
        if dist.is_initialized():
            dist.destroy_process_group()

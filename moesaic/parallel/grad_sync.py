"""Bucketed, overlapped gradient all-reduce, launched from gradient hooks during backward.

Parameters are grouped by the process group that averages them (the whole world for shared
parameters, a layer's expert-data-parallel group for its experts) and packed, in reverse
registration order (roughly the order backward produces them), into buckets of at most
``bucket_mb``. A bucket is all-reduced asynchronously as soon as its last gradient is
accumulated, while backward goes on; within one process group buckets launch strictly in order,
so every rank issues the same collectives on that group in the same order. A callback queued on the autograd engine waits for them
at the end of backward and writes the averages back into ``.grad``.

Expert gradients are also scaled by 1 / ep_size by a tensor hook (before accumulation): an
expert on this rank received the tokens of all ep_size ranks of its group, so summing them and
then averaging over the edp group gives the mean over the whole world.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..autograd import in_backward
from .comm import PICKLE_ERROR, run_collective


@dataclass
class _Bucket:
    params: list
    group: object
    ranks: tuple
    lane: int = 0  # index of its process group's launch queue
    ready: int = 0
    work: Optional[object] = None
    flat: Optional[Tensor] = None
    seen: set = field(default_factory=set)  # id() of parameters already counted
    again: bool = False  # a gradient accumulated twice: all-reduce the whole sum at the end


class GradSync:
    """Keeps the hooks and buckets of one parallelized model. ``enabled = False`` skips
    synchronisation (e.g. for local gradient accumulation steps)."""

    def __init__(self, groups: list, bucket_mb: float = 25.0, frozen: tuple = ()):
        """``groups``: list of (process group, ranks, params) to average over; ``frozen``:
        (name, parameter) pairs that did not require grad when the model was parallelized
        (a gradient for one later is an error: nothing would average it)."""
        self.enabled = True
        self.frozen = list(frozen)
        self.buckets: list[_Bucket] = []
        self._index = {}
        self._lanes: list[list[int]] = []  # bucket indices per process group, launch order
        self._next: list[int] = []
        self._queued = False
        self._handles = []
        cap = int(bucket_mb * 2**20)
        for group, ranks, params in groups:
            params = [p for p in params if p.requires_grad]
            self._lanes.append([])
            self._next.append(0)
            cur, size = [], 0
            for p in reversed(params):
                nbytes = p.numel() * p.element_size()
                if cur and (size + nbytes > cap or p.dtype != cur[0].dtype):
                    self._add(cur, group, ranks)
                    cur, size = [], 0
                cur.append(p)
                size += nbytes
            if cur:
                self._add(cur, group, ranks)
        for b in self.buckets:
            for p in b.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _add(self, params, group, ranks) -> None:
        b = _Bucket(params, group, tuple(ranks), lane=len(self._lanes) - 1)
        for p in params:
            self._index[id(p)] = len(self.buckets)
        self._lanes[-1].append(len(self.buckets))
        self.buckets.append(b)

    def covers(self, p: Tensor) -> bool:
        """Whether ``p``'s gradient is averaged by this sync."""
        return id(p) in self._index

    def release(self) -> None:
        """Remove the hooks and forget the process groups (after ``moesaic.destroy``)."""
        self.remove()
        for b in self.buckets:
            b.group, b.work, b.flat = None, None, None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_grad(self, p: Tensor) -> None:
        if not self.enabled:
            return
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
        b = self.buckets[self._index[id(p)]]
        if id(p) in b.seen:  # accumulated again (a weight shared by reentrant checkpoints)
            b.again = True  # on every rank alike, launched yet or not (timing differs by rank)
            return
        b.seen.add(id(p))
        b.ready += 1
        self._launch_ready(b.lane)

    def _launch(self, b: _Bucket) -> None:
        """All-reduce the bucket's gradients (zeros where this rank has none) and, appended, one
        flag per parameter saying whether this rank had a gradient for it."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        flags = grads[0].new_ones(len(b.params))  # made on the device: no host-to-device copy
        for i, p in enumerate(b.params):
            if p.grad is None:
                flags[i].zero_()
        b.flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
        b.work = run_collective("gradient all-reduce", b.ranks, dist.all_reduce, b.flat,
                                group=b.group, async_op=True)

    def _launch_ready(self, lane: int, force: bool = False) -> None:
        order = self._lanes[lane]
        while self._next[lane] < len(order):
            b = self.buckets[order[self._next[lane]]]
            if b.ready < len(b.params) and not force:
                return
            self._launch(b)
            self._next[lane] += 1

    def _finish(self) -> None:
        """End of backward: launch what is left (a parameter unused on some ranks counts as zero
        there), wait, and write the averages back; a parameter no rank used keeps grad None, as
        in one process."""
        try:
            self._check_frozen()
            for lane in range(len(self._lanes)):
                self._launch_ready(lane, force=True)
            for b in self.buckets:
                run_collective("gradient all-reduce", b.ranks, b.work.wait)
                if b.again:  # it may have gone out with a partial sum: send the whole one
                    self._launch(b)  # set on every rank alike (same graph), whatever the timing
                    run_collective("gradient all-reduce", b.ranks, b.work.wait)
                b.flat.div_(len(b.ranks))
                # The flags are read (a host sync) only where this rank lacked a gradient
                # (such a parameter's grad is still None: zeros stood in for it).
                missing = any(p.grad is None for p in b.params)
                used = ((b.flat[-len(b.params):] > 0).tolist() if missing
                        else [True] * len(b.params))
                offset = 0
                for p, any_rank in zip(b.params, used):
                    n = p.numel()
                    g = b.flat[offset:offset + n].view_as(p)
                    offset += n
                    if not any_rank:
                        continue
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)
        finally:
            self._reset()

    def _check_frozen(self) -> None:
        for name, p in self.frozen:
            if p.requires_grad and p.grad is not None:
                raise RuntimeError(
                    f"parameter {name!r} did not require grad when moesaic.parallelize ran, "
                    "so nothing averages its gradient over ranks (and an expert's would not be "
                    "scaled by 1 / ep_size): unfreeze parameters before parallelize")

    def _reset(self) -> None:
        for b in self.buckets:
            b.ready, b.work, b.flat, b.again = 0, None, None, False
            b.seen.clear()
        self._next = [0] * len(self._lanes)
        self._queued = False

    def reset_if_stale(self) -> None:
        """Called before each forward (outside any backward): a backward that raised never ran
        the end-of-backward callback, and its half-filled buckets would keep every later
        backward from synchronising. Drop them, with a warning."""
        if self._queued and not in_backward():
            warnings.warn("moesaic: the previous backward did not finish (it raised), so its "
                          "gradient synchronisation was abandoned; the next backward "
                          "synchronises as usual (zero the gradients before it)", stacklevel=3)
            for b in self.buckets:  # launched on every rank alike: let them complete in order
                if b.work is not None:
                    run_collective("gradient all-reduce", b.ranks, b.work.wait)
            self._reset()


class StaleSyncHook:
    """Forward pre-hook of a parallelized model and its MoE layers: ``reset_if_stale`` first.
    A deep copy of the model (not parallelized) gets a hook that does nothing."""

    def __init__(self, sync: Optional[GradSync]):
        self.sync = sync

    def __call__(self, module, args) -> None:
        if self.sync is not None:
            self.sync.reset_if_stale()

    def __deepcopy__(self, memo):
        return StaleSyncHook(None)

    def __getstate__(self):
        raise TypeError(PICKLE_ERROR)


def scale_grad_hooks(params, scale: float) -> list:
    """Multiply each parameter's incoming gradient by ``scale`` (before accumulation)."""
    if scale == 1.0:
        return []
    return [p.register_hook(lambda g, s=scale: g * s) for p in params if p.requires_grad]

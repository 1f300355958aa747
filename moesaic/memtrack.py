"""Exact peak of live tensor memory during a block of code, on any device.

``with LiveMemory() as mem: step()`` counts every tensor storage created inside the block (by
forward and backward alike; views and in-place results of older tensors are not new) until it
is freed; ``mem.peak_bytes`` is the high-water mark. It sees tensors, not allocator caches or
scratch buffers, so it is deterministic and load-independent: benchmarks use it to compare
peak extra memory, tests to pin memory as O(T * K * D).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveMemory(TorchDispatchMode):
    """Tracks bytes of storages created while active; ``peak_bytes`` is their maximum sum."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _purge(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.live_bytes -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._purge()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        # A view, in-place or out= result (an aliasing return) has no new storage; counting it
        # would count the parameters whenever the block takes a view of one.
        fresh = [o for r, o in zip(func._schema.returns, outs) if r.alias_info is None]
        for t in tree_flatten(fresh)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), nbytes)
                    self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def peak_extra_bytes(module: nn.Module, step: Callable[[], None]) -> int:
    """Peak live tensor bytes of ``step()`` (e.g. one fwd+bwd of ``module``), less the
    parameter gradients it leaves behind: the activation memory of a training step."""
    module.zero_grad(set_to_none=True)
    with LiveMemory() as mem:
        step()
    grads = sum(p.grad.untyped_storage().nbytes() for p in module.parameters() if p.grad is not None)
    return mem.peak_bytes - grads

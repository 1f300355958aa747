"""Epoch sums kept on the training device, read once at the end of the epoch.

Reading a tensor on the host (``.tolist()``, ``float()``, ``.cpu()``) waits for the device, so
the loop never reads statistics per step: :class:`RoutingMeter` adds each MoE call's routing
statistics into device tensors, and the step sums of loss and accuracy are added likewise by the
loop. Each is read with one all-reduce and one copy when the epoch ends.

Legend: E experts of a layer, M MoE calls per forward.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dist import all_reduce_


class RoutingMeter:
    """Tokens per expert (before dropping), dropped fraction and router entropy of every MoE
    call of the training forwards, summed over an epoch on the device.

    :meth:`step` folds the statistics one forward returned (``model(x, return_stats=True)``:
    one record per MoE call in call order, so WideNet's shared layer yields one per block)
    into the sums.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.total_ME: list[torch.Tensor] = []
        self.entropy_M: Optional[torch.Tensor] = None  # None until the epoch's first step
        self.dropped_M: Optional[torch.Tensor] = None
        self.steps = 0

    def step(self, calls: list) -> None:
        """Add one forward's statistics (device ops only, no host read)."""
        if not calls:
            return
        if self.entropy_M is None:
            dev = calls[0].tokens_per_expert.device
            self.total_ME = [torch.zeros(s.tokens_per_expert.numel(), dtype=torch.float64,
                                         device=dev) for s in calls]
            self.entropy_M = torch.zeros(len(calls), dtype=torch.float64, device=dev)
            self.dropped_M = torch.zeros(len(calls), dtype=torch.float64, device=dev)
        for total_E, s in zip(self.total_ME, calls):
            total_E.add_(s.tokens_per_expert)
        self.entropy_M.add_(torch.stack([s.router_entropy.double() for s in calls]))
        self.dropped_M.add_(torch.stack([s.dropped_fraction.double() for s in calls]))
        self.steps += 1

    def result(self, names: list[str]) -> list[dict]:
        """Per MoE call, over all ranks: token share per expert, mean dropped fraction (as the
        layer defines it: assignments past capacity, or for expert choice tokens no expert
        took), mean router entropy. One all-reduce and one copy to the host."""
        if self.entropy_M is None:
            return []
        steps = torch.tensor([float(self.steps)], dtype=torch.float64, device=self.entropy_M.device)
        flat = all_reduce_(torch.cat([*self.total_ME, self.entropy_M, self.dropped_M, steps]))
        flat = flat.cpu().numpy()
        M = len(self.total_ME)
        out, off = [], 0
        totals = []
        for t in self.total_ME:
            totals.append(flat[off:off + t.numel()])
            off += t.numel()
        for i, tot in enumerate(totals):
            name = names[i] if len(names) == M else f"MoE call {i + 1}"
            out.append({"name": name, "token_share": (tot / max(tot.sum(), 1)).tolist()})
        entropy_M, dropped_M, n = flat[off:off + M], flat[off + M:off + 2 * M], flat[-1]
        for o, h, d in zip(out, entropy_M, dropped_M):
            o["dropped_fraction"] = float(d / max(n, 1))
            o["router_entropy"] = float(h / max(n, 1))
        return out

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
    """Tokens per expert (before and after dropping) and router entropy of every MoE call of
    the training forwards, summed over an epoch on the device.

    :meth:`step` folds the statistics one forward returned (``model(x, return_stats=True)``:
    one record per MoE call in call order, so WideNet's shared layer yields one per block)
    into the sums.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.total_ME: list[torch.Tensor] = []
        self.kept_ME: list[torch.Tensor] = []
        self.entropy_M: Optional[torch.Tensor] = None
        self.steps = 0

    def step(self, calls: list) -> None:
        """Add one forward's statistics (device ops only, no host read)."""
        if not calls:
            return
        if self.entropy_M is None:
            dev = calls[0].tokens_per_expert.device
            self.total_ME = [torch.zeros(s.tokens_per_expert.numel(), dtype=torch.float64,
                                         device=dev) for s in calls]
            self.kept_ME = [torch.zeros_like(t) for t in self.total_ME]
            self.entropy_M = torch.zeros(len(calls), dtype=torch.float64, device=dev)
        for total_E, kept_E, s in zip(self.total_ME, self.kept_ME, calls):
            total_E.add_(s.tokens_per_expert)
            kept_E.add_(s.tokens_per_expert_kept)
        self.entropy_M.add_(torch.stack([s.router_entropy.double() for s in calls]))
        self.steps += 1

    def result(self, names: list[str]) -> list[dict]:
        """Per MoE call, over all ranks: token share per expert, dropped fraction, mean router
        entropy. One all-reduce and one copy to the host."""
        if self.entropy_M is None:
            return []
        steps = torch.tensor([float(self.steps)], dtype=torch.float64, device=self.entropy_M.device)
        flat = all_reduce_(torch.cat([*self.total_ME, *self.kept_ME, self.entropy_M, steps]))
        flat = flat.cpu().numpy()
        M = len(self.total_ME)
        out, off = [], 0
        totals = []
        for t in self.total_ME:
            totals.append(flat[off:off + t.numel()])
            off += t.numel()
        for i, tot in enumerate(totals):
            kept = flat[off:off + len(tot)]
            off += len(tot)
            name = names[i] if len(names) == M else f"MoE call {i + 1}"
            out.append({"name": name,
                        "token_share": (tot / max(tot.sum(), 1)).tolist(),
                        "dropped_fraction": float(1 - kept.sum() / max(tot.sum(), 1))})
        entropy_M, n = flat[off:off + M], flat[-1]
        for o, h in zip(out, entropy_M):
            o["router_entropy"] = float(h / max(n, 1))
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

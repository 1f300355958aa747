"""Differentiable all-to-all on torch.distributed, with byte counting and clear errors.

``all_to_all_rows`` sends ``in_splits[j]`` rows of x to rank j of the group and receives
``out_splits[j]`` rows from it; backward is the reverse exchange of the gradient.

Legend: N rows sent, M rows received, D row width; for the routing counts of the "global"
scopes: W ranks, K top-k, E experts, T a rank's tokens, J gathered columns.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..autograd import fresh


class CommError(RuntimeError):
    """A collective failed: a peer rank died, raised, or did not answer within the timeout."""


class CommStats:
    """Bytes this rank sent to other ranks (self-sends excluded) and collective calls made."""

    def __init__(self):
        self.bytes_sent = 0
        self.calls = 0

    def reset(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    def __repr__(self) -> str:
        return f"CommStats(bytes_sent={self.bytes_sent:,}, calls={self.calls})"


def run_collective(what: str, ranks: Sequence[int], fn, *args, **kwargs):
    """Run ``fn`` and turn a backend failure into a :class:`CommError` that says what was
    being exchanged between which ranks and why it most likely failed."""
    try:
        return fn(*args, **kwargs)
    except CommError:
        raise
    except RuntimeError as e:
        also = ("; or the ranks routed different numbers of tokens, which equal_batches "
                "promises they do not (leave equal_batches for ragged batches)"
                if what.endswith(" under equal_batches") else "")
        raise CommError(
            f"moesaic: {what} among ranks {list(ranks)} failed on rank "
            f"{dist.get_rank() if dist.is_initialized() else 0}: a peer rank probably died, "
            f"raised, or did not reach this collective within the process-group timeout "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}){also}") from e


def exchange(x_ND: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group,
             ranks: Sequence[int], stats: Optional[CommStats], what: str) -> Tensor:
    """One all-to-all of rows (no autograd): returns the [sum(out_splits), ...] received rows."""
    x_ND = x_ND.contiguous()
    out_MD = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
    run_collective(what, ranks, dist.all_to_all_single, out_MD, x_ND, list(out_splits),
                   list(in_splits), group=group)
    if stats is not None:
        me = ranks.index(dist.get_rank())
        row_bytes = x_ND[0:1].numel() * x_ND.element_size() if x_ND.dim() > 1 else x_ND.element_size()
        stats.bytes_sent += (sum(in_splits) - in_splits[me]) * row_bytes
        stats.calls += 1
    return out_MD


PICKLE_ERROR = ("a parallelized model holds process groups and cannot be pickled (torch.save of "
                "the module): save moesaic.full_state_dict(model) or model.state_dict() instead")


class GroupRef:
    """A process group its owner can let go of (``moesaic.destroy``): autograd graphs kept alive
    by the caller hold this reference, not the group."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group

    def get(self):
        if self.group is None:
            raise RuntimeError("moesaic.destroy() has torn the process group down: this MoE "
                               "layer's experts live on several ranks and cannot run any more")
        return self.group


class CountSum:
    """A layer's routing counts over every rank: summed per expert (``balance_scope="global"``,
    one all-reduce of E int64 per training forward) or gathered per rank, choice and expert
    (``capacity_scope="global"``, one all-gather of K * E int64, and with score priority one of
    each rank's priorities and choices, with causal priority one of each token's position and
    choices; under expert choice the token counts and every token's ranking scores).
    Installed by ``parallelize``; the layer calls it without knowing the group. Not counted in
    :class:`CommStats` (which counts the all-to-alls, as the gradient all-reduces are not)."""

    def __init__(self, group, ranks: Sequence[int]):
        self.group, self.ranks = group, tuple(ranks)

    def _check(self) -> None:
        if self.group is None:
            raise RuntimeError("balance_scope='global' and capacity_scope='global' count expert "
                               "loads over the ranks, whose process group moesaic.destroy() has "
                               "torn down: parallelize the model again under a new one, or "
                               "build it with scope 'batch'")

    @property
    def rank(self) -> int:
        """This process's position among ``ranks`` (the order its tokens come in)."""
        self._check()
        return dist.get_rank(self.group)

    def gather(self, counts_KE: Tensor, what: str = "count") -> Tensor:
        """[W, K, E]: every rank's counts (any tensor of one shape on every rank), in rank
        order."""
        self._check()
        parts = [torch.empty_like(counts_KE) for _ in self.ranks]
        run_collective(f"MoE global-capacity {what} all-gather", self.ranks, dist.all_gather,
                       parts, counts_KE.detach().contiguous(), group=self.group)
        return torch.stack(parts)

    def gather_rows(self, rows_TJ: Tensor, length: int) -> Tensor:
        """[W, length, J]: every rank's rows, in rank order, each padded with zeros to
        ``length`` (``capacity_scope="global"``: score priorities, causal positions and choices,
        expert-choice scores)."""
        padded = rows_TJ.new_zeros(length, rows_TJ.shape[1])
        padded[:rows_TJ.shape[0]] = rows_TJ.detach()
        return self.gather(padded, "priority")

    def __call__(self, counts_E: Tensor) -> Tensor:
        self._check()
        total_E = counts_E.detach().clone()
        run_collective("MoE global balance-loss count all-reduce", self.ranks, dist.all_reduce,
                       total_E, group=self.group)
        return total_E

    def __deepcopy__(self, memo):
        return self  # holds a process group, no tensors: a copied model shares it

    def __getstate__(self):
        raise TypeError(PICKLE_ERROR)

    def release(self) -> None:
        self.group = None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group_ref, ranks, stats, what):
        ctx.args = (out_splits, in_splits, group_ref, ranks, stats, what)
        return fresh(exchange(x_ND, out_splits, in_splits, group_ref.get(), ranks, stats,
                              what))

    @staticmethod
    def backward(ctx, grad_MD):
        out_splits, in_splits, group_ref, ranks, stats, what = ctx.args
        grad_ND = exchange(grad_MD, in_splits, out_splits, group_ref.get(), ranks, stats,
                           what + " (backward)")
        return grad_ND, None, None, None, None, None, None


def all_to_all_rows(x_ND: Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group,
                    ranks: Sequence[int], stats: Optional[CommStats] = None,
                    what: str = "all-to-all") -> Tensor:
    """Differentiable all-to-all of rows; backward sends the gradient back the way it came.
    ``group``: a process group, or a :class:`GroupRef` to it."""
    ref = group if isinstance(group, GroupRef) else GroupRef(group)
    return _AllToAll.apply(x_ND, list(out_splits), list(in_splits), ref, tuple(ranks), stats,
                           what)

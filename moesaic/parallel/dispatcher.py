"""The all-to-all dispatcher: the same ``dispatch``/``combine`` interface as
:class:`moesaic.dispatch.LocalDispatcher`, with the experts spread over an ep group.

The routing plan lists rows in expert-major order over GLOBAL experts, and rank j of the ep
group holds the contiguous experts [j * E_local, (j + 1) * E_local), so the rows for each
destination are one contiguous slice. After the exchange the rows arrive ordered
[source rank, local expert]; they are reordered to [local expert, source rank] so each local
expert's rows are contiguous for the grouped FFN, and back again before the return exchange.

- dropless (``plan.capacity is None``): counts are exchanged first ([ep, E_local] int64), then
  rows with an uneven ``all_to_all_single``;
  with ``dedup=True`` (top_k >= 2), a token goes to a rank once, however many of its experts
  that rank holds (:mod:`moesaic.parallel.dedup`);
- capacity: every rank sends a zero-padded [E, C, D] block; the experts run on the whole
  [E_local, sum of the sources' C] block. C comes from each rank's own token count, so the
  ranks first exchange their C (one int64 each) and source s sends [E_local, C_s] rows to each
  rank. Under :func:`moesaic.parallel.equal_batches` the caller promises equal token counts:
  then the exchange is skipped and the sizes are static (no host sync for it).

Hidden dropout's row keys (one int32 per row; per slot of the padded block in capacity mode)
follow their rows with ``send_keys``: one more all-to-all, in training only.

Legend: T tokens, D model dim, E global experts, L local experts (E / ep), S source ranks
(= ep), C capacity per expert, N rows this rank sends, M rows it receives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..routing import RoutingPlan
from . import dedup
from .comm import PICKLE_ERROR, CommStats, GroupRef, all_to_all_rows, exchange
from .rows import block_order, exclusive_cumsum, inverse


_PROMISE = " under equal_batches"  # the error then names the other cause: unequal batches


@dataclass
class _Handle:
    in_splits: list  # rows sent to each rank of the group
    out_splits: list  # rows received from each rank
    order_M: Optional[Tensor]  # [S, L] -> [L, S] row order (dropless)
    pos_N: Optional[Tensor]  # slot of each kept row in the padded [E * C] block (capacity)
    shape: Optional[tuple]  # (L, S, C) of the received capacity block
    pairs: Optional[dedup.Pairs] = None  # deduplicated dropless dispatch


class AllToAllDispatcher:
    """Moves rows to the ranks that hold their experts and brings the outputs back.

    ``stats`` (a :class:`~moesaic.parallel.comm.CommStats`) counts the bytes this rank sends,
    forward and backward. ``dedup``: dropless rows go once per (rank, token) pair
    (:mod:`moesaic.parallel.dedup`).
    """

    def __init__(self, group, ranks: Sequence[int], num_experts: int,
                 stats: Optional[CommStats] = None, dedup: bool = False):
        self.group_ref, self.ranks = GroupRef(group), tuple(ranks)
        self.ep_size = len(self.ranks)
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.stats = stats if stats is not None else CommStats()
        self.equal_batches = False  # True: every rank routes the same token count (same C)
        self.dedup = dedup

    @property
    def group(self):
        return self.group_ref.get()

    def __deepcopy__(self, memo):
        """A deep-copied model (an EMA copy, ``AveragedModel``) shares this layer's process group
        and byte counter: the dispatcher holds no tensors, and a group cannot be copied."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __getstate__(self):
        raise TypeError(PICKLE_ERROR)

    def release(self) -> None:
        """Forget the process group (``moesaic.destroy``), also where autograd graphs still
        hold this dispatcher's all-to-alls; it cannot run after."""
        self.group_ref.group = None

    def dispatch(self, x_TD: Tensor, plan: RoutingPlan, ops):
        self.group_ref.get()  # a clear error once destroy() has run
        if self.dedup and dedup.worth_it(plan):
            x_MD, counts_L, pairs, splits, recv_splits, order_M = dedup.dispatch(
                x_TD, plan, self.ep_size, self.num_local, self.group_ref, self.ranks, self.stats,
                ops)
            return x_MD, counts_L, _Handle(splits, recv_splits, order_M, None, None, pairs)
        x_ND = ops.permute(x_TD, plan)
        if plan.capacity is None:
            return self._dispatch_dropless(x_ND, plan)
        return self._dispatch_capacity(x_ND, plan)

    def send_keys(self, keys_N: Tensor, handle: _Handle) -> Tensor:
        """Per-row int32 keys (hidden dropout) moved exactly as ``dispatch`` moved the rows."""
        if handle.pos_N is not None:
            keys_N = keys_N.new_zeros(sum(handle.in_splits)).index_copy_(0, handle.pos_N, keys_N)
        keys_M = exchange(keys_N, handle.out_splits, handle.in_splits, self.group, self.ranks,
                          self.stats, "MoE hidden-dropout key all-to-all")
        if handle.order_M is not None:
            return keys_M.index_select(0, handle.order_M)
        L, S, C = handle.shape
        return keys_M.reshape(S, L, C).transpose(0, 1).reshape(L * S * C)

    def combine(self, y_ND: Tensor, plan: RoutingPlan, handle: _Handle, ops) -> Tensor:
        if handle.pairs is not None:
            return dedup.combine(y_ND, handle.pairs, self.group_ref, self.ranks, self.stats, ops)
        if handle.order_M is not None:
            y_MD = y_ND.index_select(0, inverse(handle.order_M))
        else:
            L, S, C = handle.shape
            D = y_ND.shape[-1]  # spelled out: with C = 0 (no tokens anywhere) -1 is ambiguous
            y_MD = y_ND.reshape(L, S, C, D).transpose(0, 1).reshape(S * L * C, D)
        what = "MoE combine all-to-all"
        if self.equal_batches and plan.capacity is not None:
            what += _PROMISE
        y_back = all_to_all_rows(y_MD, handle.in_splits, handle.out_splits, self.group_ref,
                                 self.ranks, self.stats, what)
        if handle.pos_N is not None:
            y_back = y_back.index_select(0, handle.pos_N)
        return ops.combine(y_back, plan)

    def _dispatch_dropless(self, x_ND: Tensor, plan: RoutingPlan):
        S, L = self.ep_size, self.num_local
        send_SL = plan.counts_E.to(torch.int64).reshape(S, L)
        recv_SL = exchange(send_SL, [1] * S, [1] * S, self.group, self.ranks, self.stats,
                           "MoE token-count exchange")
        return self._exchange_blocks(x_ND, send_SL, recv_SL, None, "MoE dispatch all-to-all")

    def _exchange_blocks(self, x_ND: Tensor, send_SL: Tensor, recv_SL: Tensor,
                         pos_N: Optional[Tensor], what: str):
        """Rows in blocks of ``send_SL[s, l]`` to rank s's local expert l; the received blocks
        (``recv_SL[s, l]`` rows from source s) regrouped to [local expert, source rank]."""
        in_splits = send_SL.sum(1).tolist()
        out_splits = recv_SL.sum(1).tolist()
        x_MD = all_to_all_rows(x_ND, out_splits, in_splits, self.group_ref, self.ranks, self.stats,
                               what)
        order_M = block_order(recv_SL, total=sum(out_splits))
        return (x_MD.index_select(0, order_M), recv_SL.sum(0),
                _Handle(in_splits, out_splits, order_M, pos_N, None))

    def _dispatch_capacity(self, x_ND: Tensor, plan: RoutingPlan):
        S, L, E, C = self.ep_size, self.num_local, self.num_experts, int(plan.capacity)
        counts_E = plan.counts_E.to(torch.int64)
        pos_N = None
        if x_ND.shape[0] != E * C:
            start_E = exclusive_cumsum(counts_E)
            n = x_ND.shape[0]
            pos_N = (torch.arange(n, device=x_ND.device)
                     - torch.repeat_interleave(start_E, counts_E)
                     + torch.repeat_interleave(torch.arange(E, device=x_ND.device) * C, counts_E))
            x_ND = torch.index_copy(x_ND.new_zeros(E * C, x_ND.shape[1]), 0, pos_N, x_ND)
        splits = [L * C] * S
        what = "MoE dispatch all-to-all (capacity block)"
        if self.equal_batches:
            what += _PROMISE
        else:
            recv_S = exchange(torch.full((S,), C, dtype=torch.int64, device=x_ND.device),
                              [1] * S, [1] * S, self.group, self.ranks, self.stats,
                              "MoE capacity exchange").tolist()
            if recv_S != [C] * S:  # source s sends [L, C_s] rows to each rank
                send_SL = torch.full((S, L), C, dtype=torch.int64)
                recv_SL = torch.tensor(recv_S, dtype=torch.int64, device=x_ND.device)
                return self._exchange_blocks(x_ND, send_SL, recv_SL.view(S, 1).expand(S, L),
                                             pos_N, "MoE dispatch all-to-all (capacity, uneven)")
        x_MD = all_to_all_rows(x_ND, splits, splits, self.group_ref, self.ranks, self.stats, what)
        D = x_MD.shape[-1]  # spelled out: with C = 0 (no tokens anywhere) -1 is ambiguous
        x_LD = x_MD.reshape(S, L, C, D).transpose(0, 1).reshape(L * S * C, D)
        counts_L = torch.full((L,), S * C, dtype=torch.int64)
        return x_LD, counts_L, _Handle(splits, splits, None, pos_N, (L, S, C))

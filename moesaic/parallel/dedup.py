"""Deduplicated dropless dispatch: each token crosses to a rank once, however many of its
experts that rank holds.

The plain dropless exchange sends one row per assignment, so a token whose k experts share a
rank goes there k times, and k outputs come back. Here the sender finds the distinct
(rank, token) pairs of its assignments and sends each token row once per rank, with two small
per-assignment columns: the pair it belongs to (int32) and its combine weight (float32). The
receiver expands pairs into its experts' rows, and after the experts sums each pair's outputs,
weighted, so one row per pair goes back. Volume per token: the number of distinct ranks among
its experts, not k; group-limited routing (``num_groups`` = ep_size, ``topk_groups`` = m)
bounds it by m. The weights are applied where the experts ran, so their gradients (the router's
signal) come back through the same exchange.

The results equal the plain exchange's up to the order of the float sums. Capacity mode keeps
its padded [E, C] blocks (no deduplication).

Legend: T tokens, D model dim, E global experts, L local experts, S ranks of the ep group,
N assignment rows sent, M received, P (rank, token) pairs sent, Q pairs received.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..routing import RoutingPlan
from .comm import all_to_all_rows, exchange
from .rows import block_order, exclusive_cumsum


@dataclass
class Pairs:
    """What ``combine`` needs to send each pair's summed output back to its token."""

    pair_token_P: Tensor  # token of each pair this rank sent, grouped by destination rank
    pair_splits: list  # pairs sent to each rank
    recv_pair_splits: list  # pairs received from each rank
    pair_N: Tensor  # received pair (row of the received block) of each expert row, [L, S] order
    weight_N: Tensor  # combine weight of each expert row, float32, differentiable
    num_tokens: int


def dispatch(x_TD: Tensor, plan: RoutingPlan, S: int, L: int, group_ref, ranks, stats):
    """Returns (x_ND rows in [local expert, source rank] order, rows per local expert, Pairs,
    row splits sent, row splits received, the [S, L] -> [L, S] order of the received rows)."""
    T, dev = x_TD.shape[0], x_TD.device
    counts_E = plan.counts_E.to(torch.int64)
    rank_N = torch.repeat_interleave(torch.arange(S, device=dev), counts_E.view(S, L).sum(1))
    key_P, pair_N = torch.unique(rank_N * T + plan.row_token_N, sorted=True, return_inverse=True)
    pairs_S = torch.bincount(torch.div(key_P, max(T, 1), rounding_mode="floor"), minlength=S)
    pair_token_P = key_P - torch.div(key_P, max(T, 1), rounding_mode="floor") * T
    local_pair_N = (pair_N - exclusive_cumsum(pairs_S).index_select(0, rank_N)).to(torch.int32)
    send_SL = counts_E.view(S, L)
    sizes = exchange(torch.cat([send_SL, pairs_S.view(S, 1)], 1), [1] * S, [1] * S,
                     group_ref.get(), ranks, stats, "MoE token-count exchange (deduplicated)")
    recv_SL, recv_pairs_S = sizes[:, :L], sizes[:, L]
    row_splits, recv_row_splits = send_SL.sum(1).tolist(), recv_SL.sum(1).tolist()
    pair_splits, recv_pair_splits = pairs_S.tolist(), recv_pairs_S.tolist()
    x_QD = all_to_all_rows(x_TD.index_select(0, pair_token_P), recv_pair_splits, pair_splits,
                           group_ref, ranks, stats, "MoE dispatch all-to-all (deduplicated)")
    local_pair_M = exchange(local_pair_N, recv_row_splits, row_splits, group_ref.get(), ranks,
                            stats, "MoE pair-index all-to-all")
    weight_M = all_to_all_rows(plan.row_weight_N.float().unsqueeze(1), recv_row_splits,
                               row_splits, group_ref, ranks, stats,
                               "MoE combine-weight all-to-all").squeeze(1)
    source_M = torch.repeat_interleave(torch.arange(S, device=dev), recv_SL.sum(1))
    pair_M = local_pair_M.long() + exclusive_cumsum(recv_pairs_S).index_select(0, source_M)
    order_M = block_order(recv_SL)
    pair_ND = pair_M.index_select(0, order_M)
    pairs = Pairs(pair_token_P, pair_splits, recv_pair_splits, pair_ND,
                  weight_M.index_select(0, order_M), T)
    return (x_QD.index_select(0, pair_ND), recv_SL.sum(0), pairs, row_splits, recv_row_splits,
            order_M)


def combine(y_ND: Tensor, pairs: Pairs, group_ref, ranks, stats) -> Tensor:
    """Each pair's weighted sum of its expert rows goes back once; tokens sum their pairs."""
    D = y_ND.shape[1]
    weighted_ND = y_ND * pairs.weight_N.to(y_ND.dtype).unsqueeze(1)
    y_QD = y_ND.new_zeros(sum(pairs.recv_pair_splits), D).index_add(0, pairs.pair_N, weighted_ND)
    y_PD = all_to_all_rows(y_QD, pairs.pair_splits, pairs.recv_pair_splits, group_ref, ranks,
                           stats, "MoE combine all-to-all (deduplicated)")
    return y_ND.new_zeros(pairs.num_tokens, D).index_add(0, pairs.pair_token_P, y_PD)

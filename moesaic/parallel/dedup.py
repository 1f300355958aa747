"""Deduplicated dropless dispatch: each token crosses to a rank once, however many of its
experts that rank holds.

The plain dropless exchange sends one row per assignment, so a token whose k experts share a
rank goes there k times, and k outputs come back. Here the sender marks the distinct
(rank, token) pairs of its assignments ([S, T] membership, no sort) and sends each token row
once per rank, with one float32 [N, 2] column block per assignment: the pair it belongs to
(exact in float32 below 2**24 pairs) and its combine weight. The receiver expands pairs into its
experts' rows and, after the experts, sums each pair's outputs with their weights, so one row
per pair goes back; the sender adds its pairs per token. The weights are applied where the
experts ran, so their gradients, the router's signal, come back through the same exchange.

Both sums and both expansions are the backend's token-centric ``ops.permute`` / ``ops.combine``
(Triton or PyTorch) over small plans built here, one "token" per pair or per token: no
scatter-add, so results are deterministic, and weight gradients are float32 dot products as in
the plain path. Results equal the plain exchange's up to the order of the float sums. Capacity
mode keeps its padded [E, C] blocks, and top-1 layers keep the plain exchange (nothing to
save). Each of the two sum plans takes one stable sort of its members.

Legend: T tokens, D model dim, E global experts, L local experts, S ranks of the ep group,
K top-k, N assignment rows sent, R rows received (the experts' rows, [local expert, source
rank] order), P (rank, token) pairs sent, Q pairs received, X = L + 1 size columns (rows per
local expert, pairs); in the sum-plan helpers, O owners and M their member rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..routing import RoutingPlan
from .comm import all_to_all_rows, exchange
from .rows import block_order, exclusive_cumsum

MAX_PAIRS = 2 ** 24  # pair indices travel as float32 next to the weights: exact below this


def worth_it(plan: RoutingPlan) -> bool:
    """Dropless token choice with top_k >= 2: a top-1 token has one row to send anyway."""
    return plan.capacity is None and plan.dest_TK is not None and plan.dest_TK.shape[1] > 1


def _owner_slots(owner_M: Tensor, num_owners: int, K: int) -> tuple[Tensor, Tensor]:
    """For rows that each belong to one of ``num_owners`` owners (at most K rows each): the
    [num_owners, K] table of each owner's rows in row order (-1 pads), and each row's flat slot
    in it. One stable sort; no host sync."""
    M = owner_M.numel()
    order_M = torch.argsort(owner_M, stable=True)
    sorted_owner_M = owner_M.index_select(0, order_M)
    counts_O = torch.zeros(num_owners, dtype=torch.int64, device=owner_M.device)
    counts_O.scatter_add_(0, owner_M, torch.ones_like(owner_M))
    pos_M = torch.arange(M, device=owner_M.device) - exclusive_cumsum(counts_O).index_select(
        0, sorted_owner_M)
    slot_M = torch.empty_like(owner_M).index_copy_(0, order_M, sorted_owner_M * K + pos_M)
    dest_OK = torch.full((num_owners * K,), -1, dtype=torch.int64, device=owner_M.device)
    dest_OK.index_copy_(0, slot_M, torch.arange(M, device=owner_M.device))
    return dest_OK.view(num_owners, K), slot_M


def _sum_plan(owner_M: Tensor, weight_M: Tensor, num_owners: int, K: int) -> RoutingPlan:
    """A plan whose "tokens" are owners (pairs, or tokens) and whose rows are their members,
    so ``ops.permute`` copies owner rows out and ``ops.combine`` sums members back, weighted.
    The [owners, K] weights are built from ``weight_M`` differentiably (the Triton combine
    takes gradients through them, the PyTorch one through ``row_weight_N``)."""
    dest_OK, slot_M = _owner_slots(owner_M, num_owners, K)
    weight_OK = weight_M.new_zeros(num_owners * K).index_put((slot_M,), weight_M).view(
        num_owners, K)
    return RoutingPlan(row_token_N=owner_M, row_weight_N=weight_M, counts_E=None,
                       num_tokens=num_owners, capacity=None, dest_TK=dest_OK,
                       weight_TK=weight_OK)


@dataclass
class Pairs:
    """What ``combine`` needs: the two sum plans and the pair exchange's splits."""

    token_plan: RoutingPlan  # sender: tokens own their pairs (weights 1)
    pair_plan: RoutingPlan  # receiver: pairs own their expert rows (the combine weights)
    pair_splits: list  # pairs sent to each rank
    recv_pair_splits: list  # pairs received from each rank


def dispatch(x_TD: Tensor, plan: RoutingPlan, S: int, L: int, group_ref, ranks, stats, ops):
    """Returns (x_RD: the experts' rows in [local expert, source rank] order, rows per local
    expert, Pairs, row splits sent, row splits received, the [source, expert] -> [expert,
    source] order of the received rows (hidden-dropout keys follow it))."""
    T, K, N, dev = x_TD.shape[0], plan.dest_TK.shape[1], plan.row_token_N.numel(), x_TD.device
    if T >= MAX_PAIRS:
        raise ValueError(f"dedup_tokens handles fewer than {MAX_PAIRS} tokens per rank, got {T}")
    send_SL = plan.counts_E.to(torch.int64).view(S, L)
    rank_N = torch.repeat_interleave(torch.arange(S, device=dev), send_SL.sum(1), output_size=N)
    cell_N = rank_N * T + plan.row_token_N  # flat [rank, token] cell of each assignment
    member_ST = torch.zeros(S * T, dtype=torch.bool, device=dev).index_fill_(0, cell_N, True)
    pair_ST = torch.cumsum(member_ST, 0) - 1  # pairs numbered rank-major, then by token
    pairs_S = member_ST.view(S, T).sum(1)
    pair_N = pair_ST.index_select(0, cell_N)
    sent_SX = torch.cat([send_SL, pairs_S.view(S, 1)], 1)  # [S, L + 1]: rows per expert, pairs
    recv_SX = exchange(sent_SX, [1] * S, [1] * S, group_ref.get(), ranks, stats,
                       "MoE token-count exchange (deduplicated)")
    host = torch.stack([sent_SX, recv_SX]).tolist()  # the one host read of the exchange sizes
    row_splits = [sum(r[:L]) for r in host[0]]
    recv_row_splits = [sum(r[:L]) for r in host[1]]
    pair_splits, recv_pair_splits = [r[L] for r in host[0]], [r[L] for r in host[1]]
    P, Q, R = sum(pair_splits), sum(recv_pair_splits), sum(recv_row_splits)

    pair_token_P = torch.empty(P, dtype=torch.int64, device=dev).index_put_(
        (pair_N,), plan.row_token_N)  # every pair has a row; duplicates write the same token
    token_plan = _sum_plan(pair_token_P, torch.ones(P, device=dev), T, K)
    x_QD = all_to_all_rows(ops.permute(x_TD, token_plan), recv_pair_splits, pair_splits,
                           group_ref, ranks, stats, "MoE dispatch all-to-all (deduplicated)")
    local_pair_N = (pair_N - exclusive_cumsum(pairs_S).index_select(0, rank_N)).float()
    columns_R2 = all_to_all_rows(torch.stack([local_pair_N, plan.row_weight_N.float()], 1),
                                 recv_row_splits, row_splits, group_ref, ranks, stats,
                                 "MoE pair-index and combine-weight all-to-all")
    recv_SL = recv_SX[:, :L]
    source_R = torch.repeat_interleave(torch.arange(S, device=dev), recv_SL.sum(1),
                                       output_size=R)
    order_R = block_order(recv_SL, total=R)
    pair_R = (columns_R2[:, 0].detach().long()
              + exclusive_cumsum(recv_SX[:, L]).index_select(0, source_R)).index_select(0, order_R)
    pair_plan = _sum_plan(pair_R, columns_R2[:, 1].index_select(0, order_R), Q, K)
    pairs = Pairs(token_plan, pair_plan, pair_splits, recv_pair_splits)
    return (ops.permute(x_QD, pair_plan), recv_SL.sum(0), pairs, row_splits, recv_row_splits,
            order_R)


def combine(y_RD: Tensor, pairs: Pairs, group_ref, ranks, stats, ops) -> Tensor:
    """Each pair's weighted sum of its expert rows goes back once; tokens sum their pairs."""
    y_QD = ops.combine(y_RD, pairs.pair_plan)
    y_PD = all_to_all_rows(y_QD, pairs.pair_splits, pairs.recv_pair_splits, group_ref, ranks,
                           stats, "MoE combine all-to-all (deduplicated)")
    return ops.combine(y_PD, pairs.token_plan)

"""Fused token-choice routing: softmax (or sigmoid) + top-k + capacity slots in Triton.

Pass 1 (one program per block of tokens) reads the float32 logits once, writes the
probabilities and each token's top-k expert ids, and, for position priority, counts each
block's assignments per expert and choice (an [E, K * blocks] histogram, so that the prefix
below scans along contiguous rows: a scan down the other axis is one serial loop per expert).
Score priority needs the tokens sorted by top-1 probability first, so its histogram is a second
small pass over the ids in that order; causal priority places the T x K ids as T * K tokens
of one choice each, ordered by position, choice and sequence (token order for one sequence),
with its own histogram pass, dropless: its per-position budgets then drop assignments in
PyTorch (:func:`moesaic.routing.causal_capped`, O(T * K)). An exclusive prefix over the
histogram gives every (choice, block) its first slot per expert; pass 2 ranks each assignment
inside its block with a cumulative sum of the one-hot expert ids, adds that base, drops slots
past the capacity and scatters the kept assignments to their expert-major rows. Index traffic
is O(T * K); the only O(T * E) traffic is reading the logits and writing the probabilities
once.

Ties: on exactly equal probabilities the kernel takes the lowest expert id (torch.topk leaves
the choice unspecified). With a selection bias (auxiliary-loss-free balancing) experts are
chosen by probability + bias and weighted by the probability. ``score_func="sigmoid"`` scores
each expert by sigmoid(logit) instead of the softmax (DeepSeek-V3); without a bias it selects
by the logits (the same order, without the ties of float32 sigmoids saturated at 1.0 for
logits above about 17); with a bias such saturated scores can tie, and the rule above applies.
Group-limited routing (``groups``, DeepSeek-V3) scores each group of experts by the sum of its
two best scores (+ bias) and masks the experts outside each token's best groups before the
top-k; equal group scores go to the lower group id.

Legend: T tokens, E experts (columns of a block), K top-k, B token blocks, N kept assignments
(rows); G groups of GS experts, TOPG kept per token; P the rows placed (T, or T * K under
causal priority, each of KP = 1 choice).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..autograd import first_order, fresh
from ..routing import (TINY, RoutingPlan, causal_capped, causal_order, first_choice_prob,
                       ranking_scores)


@triton.jit
def _softmax_topk_kernel(logits_ptr, probs_ptr, idx_ptr, hist_ptr, bias_ptr, T, E, num_blocks,
                         K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                         WRITE_HIST: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SIGMOID: tl.constexpr, G: tl.constexpr, TOPG: tl.constexpr,
                         GS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * E + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        p = tl.where(ok, tl.sigmoid(x), 0.0)
    else:
        x_max = tl.where(row_ok, tl.max(x, 1), 0.0)
        ex = tl.where(ok, tl.exp(x - x_max[:, None]), 0.0)
        denom = tl.where(row_ok, tl.sum(ex, 1), 1.0)
        p = ex / denom[:, None]
    tl.store(probs_ptr + offs, p, mask=ok)
    score = p
    if HAS_BIAS:  # selection only: the weights stay the probabilities
        score = p + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    group_score = score
    if not HAS_BIAS and SIGMOID:  # the logits: the sigmoid's order, without its float32 ties
        score = x
    work = tl.where(col_ok[None, :], score, float("-inf"))
    if TOPG < G:  # group-limited: only the experts of each token's TOPG best groups of GS
        group_E = cols // GS
        value_TE = tl.zeros([BT, BE], dtype=tl.float32)  # each column's group score
        for g in tl.static_range(G):
            in_g = (group_E == g) & col_ok
            s_g = tl.where(in_g[None, :], group_score, float("-inf"))
            best = tl.max(s_g, 1)
            if GS > 1:  # plus the second best
                first = tl.argmax(s_g, 1)
                best += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), s_g), 1)
            value_TE = tl.where(in_g[None, :], best[:, None], value_TE)
        ahead_TE = tl.zeros([BT, BE], dtype=tl.int32)  # groups ranked before each column's
        for g in tl.static_range(G):
            in_g = (group_E == g) & col_ok
            v_g = tl.max(tl.where(in_g[None, :], value_TE, float("-inf")), 1)[:, None]
            ahead_TE += ((v_g > value_TE) | ((v_g == value_TE) & (g < group_E[None, :]))
                         ).to(tl.int32)
        work = tl.where(ahead_TE < TOPG, work, float("-inf"))
    for k in tl.static_range(K):
        top = tl.argmax(work, 1)
        tl.store(idx_ptr + rows.to(tl.int64) * K + k, top.to(tl.int32), mask=row_ok)
        chosen = cols[None, :] == top[:, None]
        if WRITE_HIST:
            cnt = tl.sum((chosen & row_ok[:, None]).to(tl.int32), 0)
            tl.store(hist_ptr + cols * (K * num_blocks) + k * num_blocks + pid, cnt, mask=col_ok)
        work = tl.where(chosen, float("-inf"), work)


@triton.jit
def _ordered_hist_kernel(idx_ptr, order_ptr, hist_ptr, T, E, num_blocks,
                         K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                         HAS_ORDER: tl.constexpr):
    """Per (block of tokens in priority order, or in token order, choice k): assignments per
    expert."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    pos = pid * BT + tl.arange(0, BT)
    ok = pos < T
    if HAS_ORDER:
        tok = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
    else:
        tok = pos.to(tl.int64)
    e = tl.load(idx_ptr + tok * K + k, mask=ok, other=-1)
    cols = tl.arange(0, BE)
    cnt = tl.sum((e[:, None] == cols[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + cols * (K * num_blocks) + k * num_blocks + pid, cnt, mask=cols < E)


@triton.jit
def _place_kernel(idx_ptr, order_ptr, base_ptr, start_ptr, dest_ptr, row_token_ptr,
                  row_assign_ptr, T, E, num_blocks, capacity,
                  K: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                  HAS_ORDER: tl.constexpr, HAS_CAPACITY: tl.constexpr):
    """Slot = block base + rank within the block; kept slots go to row start_E[e] + slot."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    pos = pid * BT + tl.arange(0, BT)
    ok = pos < T
    if HAS_ORDER:
        tok = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
    else:
        tok = pos.to(tl.int64)
    e = tl.load(idx_ptr + tok * K + k, mask=ok, other=-1)
    cols = tl.arange(0, BE)
    onehot_ET = (cols[:, None] == e[None, :]).to(tl.int32)  # scan along the last axis
    rank = tl.sum(tl.cumsum(onehot_ET, 1) * onehot_ET, 0) - 1
    e_safe = tl.where(ok, e, 0)
    base = tl.load(base_ptr + e_safe * (K * num_blocks) + k * num_blocks + pid, mask=ok, other=0)
    slot = base + rank
    keep = ok
    if HAS_CAPACITY:
        keep = ok & (slot < capacity)
    start = tl.load(start_ptr + e_safe, mask=ok, other=0)
    dest = tl.where(keep, start + slot, -1).to(tl.int64)
    assign = tok * K + k
    tl.store(dest_ptr + assign, dest, mask=ok)
    tl.store(row_token_ptr + dest, tok, mask=keep)
    tl.store(row_assign_ptr + dest, assign, mask=keep)


def _blocks(T: int, E: int):
    """Tokens per program and warps: at most 2048 [token, expert] elements per program keeps
    the sm_90 build free of register spills (checked with ptxas for E = 8, 64, 256)."""
    BE = triton.next_power_of_2(max(E, 2))
    BT = max(2, min(128, triton.next_power_of_2(max(T, 2)), 2048 // BE))
    return BT, BE, triton.cdiv(T, BT), (8 if BT * BE >= 2048 else 4)


class _SoftmaxTopK(torch.autograd.Function):
    """probs_TE = softmax(logits_TE) (or sigmoid) with each token's top-k ids (of probs + bias
    when a selection bias is given) and the position-order histogram."""

    @staticmethod
    def forward(ctx, logits_TE: Tensor, top_k: int, write_hist: bool, bias_E: Optional[Tensor],
                sigmoid: bool = False, groups: Optional[tuple[int, int]] = None):
        T, E = logits_TE.shape
        logits_TE = logits_TE.contiguous().float()
        BT, BE, B, warps = _blocks(T, E)
        probs_TE = torch.empty_like(logits_TE)
        idx_TK = torch.empty(T, top_k, dtype=torch.int32, device=logits_TE.device)
        hist = torch.zeros(E, top_k * B if write_hist else 1, dtype=torch.int32,
                           device=logits_TE.device)
        G, topg = groups if groups is not None else (1, 1)
        has_bias = bias_E is not None
        bias_E = bias_E.float().contiguous() if has_bias else probs_TE  # unread without bias
        _softmax_topk_kernel[(B,)](logits_TE, probs_TE, idx_TK, hist, bias_E, T, E, B,
                                   K=top_k, BT=BT, BE=BE, WRITE_HIST=write_hist,
                                   HAS_BIAS=has_bias, SIGMOID=sigmoid, G=G, TOPG=topg,
                                   GS=E // G, num_warps=warps)
        ctx.sigmoid = sigmoid
        ctx.save_for_backward(probs_TE)
        ctx.mark_non_differentiable(idx_TK, hist)
        return fresh(probs_TE), idx_TK, hist

    @staticmethod
    @first_order
    def backward(ctx, grad_probs, _grad_idx, _grad_hist):
        (p,) = ctx.saved_tensors
        if grad_probs is None:
            return None, None, None, None, None, None
        g = grad_probs.float()
        if ctx.sigmoid:
            return g * p * (1 - p), None, None, None, None, None
        return p * (g - (g * p).sum(-1, keepdim=True)), None, None, None, None, None


def token_choice(logits_TE: Tensor, top_k: int, capacity: Optional[int], drop_policy: str,
                 normalize: bool, bias_E: Optional[Tensor] = None, score_func: str = "softmax",
                 groups: Optional[tuple[int, int]] = None, seq_len: Optional[int] = None,
                 position_T: Optional[Tensor] = None) -> tuple[RoutingPlan, Tensor, Tensor]:
    """Same contract and results as :func:`moesaic.routing.token_choice`, fused in Triton."""
    if drop_policy == "causal" and capacity is not None:  # placed dropless, then capped
        plan, probs_TE, counts_E = token_choice(logits_TE, top_k, None, drop_policy, normalize,
                                                bias_E, score_func, groups, seq_len, position_T)
        return causal_capped(plan, seq_len, capacity, position_T), probs_TE, counts_E
    T, E = logits_TE.shape
    device = logits_TE.device
    by_score = capacity is not None and drop_policy == "score"
    flat = drop_policy == "causal"  # placed as T * K tokens of one choice each
    probs_TE, idx_TK, hist = _SoftmaxTopK.apply(logits_TE, top_k, not (by_score or flat),
                                                bias_E, score_func == "sigmoid", groups)
    P, KP, idx_PK = (T * top_k, 1, idx_TK.view(-1, 1)) if flat else (T, top_k, idx_TK)
    BT, BE, B, warps = _blocks(P, E)
    order_P = causal_order(T, top_k, seq_len, device, position_T) if flat else None
    if by_score:
        rank_TE = ranking_scores(probs_TE, logits_TE, score_func)
        order_P = torch.argsort(first_choice_prob(rank_TE, idx_TK), descending=True,
                                stable=True)
    if by_score or flat:
        hist = torch.empty(E, KP * B, dtype=torch.int32, device=device)
        _ordered_hist_kernel[(B, KP)](idx_PK, idx_PK if order_P is None else order_P, hist, P,
                                      E, B, K=KP, BT=BT, BE=BE, HAS_ORDER=order_P is not None,
                                      num_warps=warps)
    counts_E = hist.sum(1, dtype=torch.int64)
    base = (torch.cumsum(hist, 1, dtype=torch.int32) - hist).contiguous()
    kept_counts_E = counts_E if capacity is None else counts_E.clamp(max=capacity)
    start_E = (torch.cumsum(kept_counts_E, 0) - kept_counts_E).to(torch.int32)
    N = int(kept_counts_E.sum())
    dest_TK = torch.empty(T, top_k, dtype=torch.int64, device=device)
    row_token_N = torch.empty(N, dtype=torch.int64, device=device)
    row_assign_N = torch.empty(N, dtype=torch.int64, device=device)
    _place_kernel[(B, KP)](
        idx_PK, idx_PK if order_P is None else order_P, base, start_E, dest_TK, row_token_N,
        row_assign_N, P, E, B, 0 if capacity is None else capacity,
        K=KP, BT=BT, BE=BE, HAS_ORDER=order_P is not None, HAS_CAPACITY=capacity is not None,
        num_warps=warps)
    if flat:  # the placement's "tokens" were assignments
        row_token_N = torch.div(row_assign_N, top_k, rounding_mode="floor")
    weight_TK = probs_TE.gather(1, idx_TK.long())
    if normalize:
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp(min=TINY)
    plan = RoutingPlan(
        row_token_N=row_token_N, row_weight_N=weight_TK.reshape(-1).index_select(0, row_assign_N),
        counts_E=kept_counts_E, num_tokens=T, capacity=capacity,
        dest_TK=dest_TK, weight_TK=weight_TK, expert_TK=idx_TK)
    return plan, probs_TE, counts_E

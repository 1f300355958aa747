"""Routers: token choice (top-k with capacity and drop policies) and expert choice.

A router turns float32 logits into a :class:`RoutingPlan`: the kept assignments laid out in
expert-major order (the order the experts consume them), their combine weights, and per-expert
row counts. Plans are built by one stable sort of T*K expert ids, never by one-hot [T, E, C]
tensors, so memory stays O(T * K).

Legend: T tokens, D model dim, E experts (global), K top-k, A = T*K assignments,
N kept assignments (rows of the expert-major buffer), C capacity per expert, G expert groups,
Q sequences (balance_scope="sequence"), S positions in a sequence (drop_policy="causal"); for
capacity_scope="global": W ranks, M each rank's token rows padded to the longest rank's, R = W *
M rows of all ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import keyed

JITTER_EPS = 0.01
TINY = torch.finfo(torch.float32).tiny  # normalising sums clamp here: all-zero scores give 0, not NaN


@dataclass
class RoutingPlan:
    """Where every kept assignment goes, in expert-major order."""

    row_token_N: Tensor  # token index of each row of the expert-major buffer
    row_weight_N: Tensor  # combine weight of each row (float32, carries the router's gradient)
    counts_E: Tensor  # kept rows per (global) expert, int64; sums to N
    num_tokens: int
    capacity: Optional[int]  # None in dropless mode
    dest_TK: Optional[Tensor] = None  # row of each token-choice assignment, -1 where dropped
    weight_TK: Optional[Tensor] = None  # combine weight of each token-choice assignment
    expert_TK: Optional[Tensor] = None  # expert of each token-choice assignment (kept or not)


@dataclass
class RoutingStats:
    """Router statistics of one forward pass (detached; read them for logging)."""

    tokens_per_expert: Tensor  # assignments per expert before dropping
    tokens_per_expert_kept: Tensor  # after dropping
    dropped_fraction: Tensor  # token choice: assignments dropped; expert choice: tokens no expert took
    router_entropy: Tensor  # mean over tokens of the entropy of the router's distribution
    balance_loss: Tensor
    z_loss: Tensor

    def as_dict(self) -> dict:
        return {
            "tokens_per_expert": self.tokens_per_expert.tolist(),
            "tokens_per_expert_kept": self.tokens_per_expert_kept.tolist(),
            "dropped_fraction": float(self.dropped_fraction),
            "router_entropy": float(self.router_entropy),
            "balance_loss": float(self.balance_loss),
            "z_loss": float(self.z_loss),
        }


def cpu_uniform(shape, generator: Optional[torch.Generator] = None) -> Tensor:
    """U[0, 1) float32 on the CPU from numpy's SFC64 generator, seeded by one draw from the torch
    generator: about twice as fast as torch's CPU generator for the T x D jitter draws, and as
    reproducible (same torch seed or per-rank generator, same noise)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    values = np.random.Generator(np.random.SFC64(seed)).random(math.prod(shape), dtype=np.float32)
    return torch.from_numpy(values).view(shape)


def _weight_back_to_float32(router: "Router", incompatible_keys) -> None:
    """``load_state_dict(..., assign=True)`` installs the loaded tensors as they are: a bf16
    weight or selection bias would bypass the float32 guard of ``_apply``."""
    w = router.weight
    if w.dtype != torch.float32:
        router.weight = nn.Parameter(w.detach().float(), requires_grad=w.requires_grad)
    bias = getattr(router, "expert_bias", None)
    if bias is not None and bias.dtype != torch.float32:
        router.expert_bias = bias.float()


def _zero_bias_if_missing(router: "Router", state_dict, prefix, *args) -> None:
    """A state dict saved without the feature (or before it existed) had no selection bias: it
    loads as zeros, the bias such a model routed with (fine-tuning with balancing switched on)."""
    if hasattr(router, "expert_bias") and prefix + "expert_bias" not in state_dict \
            and prefix + "weight" in state_dict:
        state_dict[prefix + "expert_bias"] = torch.zeros_like(router.expert_bias)


class Router(nn.Module):
    """Linear gate ``logits = x W^T`` computed in float32, with optional training noise.

    ``weight`` [E, D] (and ``expert_bias`` [E], the selection bias of auxiliary-loss-free
    balancing, when asked for) stay float32 whatever dtype the model is cast to. Noise comes
    from torch's default generator of the input's device, which activation checkpointing saves
    and restores, so a recomputed forward routes exactly as the first one. ``noise_generator``
    overrides it; a private generator is not restored by ``torch.utils.checkpoint``. Under
    :func:`moesaic.keyed.sample_keys` the layer passes token keys and the noise is hashed from
    them instead (the same for a token on any rank, in any micro-batch).
    """

    def __init__(self, d_model: int, num_experts: int, noise_policy: Optional[str] = None,
                 selection_bias: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.noise_policy = noise_policy
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        if selection_bias:  # auxiliary-loss-free balancing: see moesaic.balance
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.noise_generator: Optional[torch.Generator] = None
        self.reset_parameters()
        self.register_load_state_dict_post_hook(_weight_back_to_float32)
        self.register_load_state_dict_pre_hook(_zero_bias_if_missing)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default weight init, from the default generator; a zero selection bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if hasattr(self, "expert_bias"):
            self.expert_bias.zero_()

    def _apply(self, fn, recurse=True):
        """Keep the weight (and its gradient) float32 whatever the model is cast to, without
        rounding it through the target dtype, and move the per-rank noise generator with the
        module (re-seeded from its seed: generator state cannot cross devices)."""

        def keep_float32(t: Tensor) -> Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        super()._apply(keep_float32, recurse)
        gen = self.noise_generator
        if gen is not None and gen.device != self.weight.device:
            self.noise_generator = torch.Generator(device=self.weight.device)
            self.noise_generator.manual_seed(gen.initial_seed())
        return self

    def _generator(self, device) -> Optional[torch.Generator]:
        gen = self.noise_generator
        if gen is not None and gen.device != device:
            raise ValueError(f"router noise_generator is on {gen.device} but the input is on {device}")
        return gen

    def _jitter(self, x: Tensor, keys_T: Optional[Tensor] = None) -> Tensor:
        """x * U(1 - eps, 1 + eps), elementwise; the noise is built in place, outside autograd."""
        gen = self._generator(x.device)
        if keys_T is not None:
            u = keyed.uniform(keys_T, x.shape[-1])
        elif x.device.type == "cpu":
            u = cpu_uniform(x.shape, gen)
        else:
            u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
        return x * u.mul_(2 * JITTER_EPS).add_(1.0 - JITTER_EPS)

    def forward(self, x_TD: Tensor, keys_T: Optional[Tensor] = None) -> Tensor:
        """Logits [T, E]; ``keys_T`` (one int32 per token, :mod:`moesaic.keyed`) keys the noise
        by token instead of drawing it from a generator."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.noise_policy == "jitter":
                x_TD = self._jitter(x_TD, keys_T)
            logits_TE = F.linear(x_TD, self.weight.float())  # a no-op unless set from outside
            if self.training and self.noise_policy == "logit_jitter":
                logits_TE = self._jitter(logits_TE, None if keys_T is None else keys_T ^ 0x51ED)
            if self.training and self.noise_policy == "gaussian":
                noise_TE = (keyed.normal(keys_T, logits_TE.shape[-1]) if keys_T is not None else
                            torch.randn(logits_TE.shape, generator=self._generator(logits_TE.device),
                                        device=logits_TE.device, dtype=torch.float32))
                logits_TE = logits_TE + noise_TE / self.num_experts ** 2
        return logits_TE


def token_choice_capacity(num_tokens: int, num_experts: int, top_k: int,
                          capacity_factor: float, min_capacity: int) -> int:
    """C = min(T, max(min_capacity, ceil(cf * K * T / E))), in exact arithmetic (1.1 * 100 is
    110). An expert gets each token at most once, so slots past T would only pad buffers."""
    num, den = _exact_ratio(capacity_factor)
    c = max(min_capacity, _ceil_div(num * top_k * num_tokens, den * num_experts))
    return min(num_tokens, c)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(cf * T / E), at most T."""
    num, den = _exact_ratio(capacity_factor)
    return min(num_tokens, _ceil_div(num * num_tokens, den * num_experts))


def _exact_ratio(capacity_factor: float) -> tuple[int, int]:
    """The decimal the user wrote, as a ratio of ints (``1.1`` is 11/10, not 1.1000000000000000888).
    Plain ints, so torch.compile can trace the capacity arithmetic with a symbolic T."""
    return Fraction(repr(float(capacity_factor))).as_integer_ratio()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def router_scores(logits_TE: Tensor, score_func: str = "softmax") -> Tensor:
    """Each token's expert scores: softmax over the experts, or an independent sigmoid per
    expert (DeepSeek-V3), which does not make the experts compete for one unit of mass."""
    if score_func == "sigmoid":
        return torch.sigmoid(logits_TE)
    return torch.softmax(logits_TE, dim=-1)


def ranking_scores(scores_TE: Tensor, logits_TE: Tensor, score_func: str = "softmax") -> Tensor:
    """What routing ranks by: the scores, or for sigmoid scores the logits (the same order
    elementwise, without the ties of float32 sigmoids saturated at 1.0 above about 17)."""
    return logits_TE if score_func == "sigmoid" else scores_TE


def score_distribution(scores_TE: Tensor, score_func: str = "softmax") -> Tensor:
    """The scores as a distribution over experts (sigmoid scores normalised per token), as the
    balance loss and the router entropy read them."""
    if score_func == "sigmoid":
        return scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=TINY)
    return scores_TE


def allowed_groups(score_TE: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """[T, E] bool: the experts of each token's ``topk_groups`` best groups (DeepSeek-V3's
    group-limited routing). Experts form ``num_groups`` contiguous groups of E / num_groups; a
    group's score is the sum of its two best scores (its best one for groups of one expert), in
    float32; equal group scores go to the lower group id (a stable sort), as in the kernel."""
    T, E = score_TE.shape
    size = E // num_groups
    group_TG = score_TE.float().view(T, num_groups, size).topk(min(2, size), dim=-1).values.sum(-1)
    best_idx = torch.sort(group_TG, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=score_TE.device)
    keep_TG.scatter_(1, best_idx, True)
    return keep_TG.repeat_interleave(size, dim=1)


def topk_weights(probs_TE: Tensor, top_k: int, normalize: bool,
                 bias_E: Optional[Tensor] = None, select_TE: Optional[Tensor] = None,
                 groups: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
    """Top-k experts of each token and their combine weights (renormalised when asked; a token
    whose k scores all underflow to 0 gets zero weights, not 0/0). With ``bias_E`` the experts
    are chosen by probs + bias and weighted by the probabilities alone (auxiliary-loss-free
    balancing); ``select_TE`` chooses them by other scores of the same order (sigmoid routing
    selects by the logits, which do not saturate to ties at 1.0 as float32 sigmoids do).
    ``groups = (num_groups, topk_groups)`` restricts the choice to the experts of each token's
    best groups, scored by probs (+ bias): :func:`allowed_groups`."""
    if bias_E is None and select_TE is None and groups is None:
        topk_prob_TK, topk_idx_TK = probs_TE.topk(top_k, dim=-1)
    else:
        score_TE = probs_TE.detach() + bias_E.float() if bias_E is not None else probs_TE.detach()
        by_TE = score_TE if select_TE is None else select_TE.detach()
        if groups is not None:
            by_TE = by_TE.masked_fill(~allowed_groups(score_TE, *groups), float("-inf"))
        topk_idx_TK = by_TE.topk(top_k, dim=-1).indices
        topk_prob_TK = probs_TE.gather(1, topk_idx_TK)
    if normalize:
        return topk_prob_TK / topk_prob_TK.sum(-1, keepdim=True).clamp(min=TINY), topk_idx_TK
    return topk_prob_TK, topk_idx_TK


def first_choice_prob(rank_TE: Tensor, topk_idx_TK: Tensor) -> Tensor:
    """Each token's ranking score (:func:`ranking_scores`) for its first choice: the priority of
    ``drop_policy="score"`` (the top-1 probability, unless a selection bias chose another expert
    first; for sigmoid scores the logit)."""
    return rank_TE.detach().gather(1, topk_idx_TK[:, :1].long()).squeeze(1)


def causal_order(num_tokens: int, top_k: int, seq_len: Optional[int], device,
                 position_T: Optional[Tensor] = None) -> Optional[Tensor]:
    """Flat assignment ids (t * K + k) in causal priority (``drop_policy="causal"``): by
    position in the sequence, then choice, then sequence, for T tokens held batch-first as
    sequences of ``seq_len``, or at the positions ``position_T`` (packed or masked sequences:
    equal positions rank by token order); so no assignment's rank depends on a later position
    of any sequence. None when the tokens are one sequence (token order)."""
    if position_T is not None:
        key_A = (position_T[:, None] * top_k
                 + torch.arange(top_k, device=position_T.device)).reshape(-1)
        return torch.sort(key_A, stable=True).indices
    if seq_len is None or seq_len >= num_tokens:
        return None
    if seq_len <= 0 or num_tokens % seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be positive and divide the {num_tokens} "
                         "tokens (batch-first sequences)")
    return (torch.arange(num_tokens * top_k, device=device)
            .view(num_tokens // seq_len, seq_len, top_k).permute(1, 2, 0).reshape(-1))


def assignment_slots(topk_idx_TK: Tensor, priority_T: Optional[Tensor], num_experts: int):
    """Rank assignments choice-major (then by token priority) and give each its expert slot.

    Returns (perm_A, slot_A, counts_E): ``perm_A`` lists flat assignment ids (t * K + k) in
    expert-major order, ``slot_A`` is each listed assignment's position within its expert, and
    ``counts_E`` counts assignments per expert before any dropping.
    """
    T, K = topk_idx_TK.shape
    order_T = torch.arange(T, device=topk_idx_TK.device) if priority_T is None else priority_T
    expert_KT = topk_idx_TK.index_select(0, order_T).t()  # choice-major
    flat_KT = order_T.unsqueeze(0) * K + torch.arange(K, device=order_T.device).unsqueeze(1)
    sorted_expert_A, order_A = torch.sort(expert_KT.reshape(-1), stable=True)
    perm_A = flat_KT.reshape(-1).index_select(0, order_A)
    counts_E = torch.bincount(sorted_expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_A = torch.arange(T * K, device=perm_A.device) - starts_E.index_select(0, sorted_expert_A)
    return perm_A, slot_A, counts_E


def token_choice(logits_TE: Tensor, top_k: int, capacity: Optional[int], drop_policy: str,
                 normalize: bool, bias_E: Optional[Tensor] = None, score_func: str = "softmax",
                 groups: Optional[tuple[int, int]] = None, seq_len: Optional[int] = None,
                 position_T: Optional[Tensor] = None) -> tuple[RoutingPlan, Tensor, Tensor]:
    """Top-k token-choice routing on ``router_scores(logits_TE, score_func)`` (selection biased
    by ``bias_E`` if given, limited to each token's best expert groups with ``groups =
    (num_groups, topk_groups)``). ``seq_len``: the tokens are sequences of that length,
    batch-first (None: one sequence); or ``position_T``, each token's position in its
    sequence (then ``seq_len`` is the longest, max + 1); read by ``drop_policy="causal"``
    only. Returns (plan, scores_TE, counts_E before dropping)."""
    if drop_policy == "causal" and capacity is not None:  # dropless in causal order, capped
        plan, probs_TE, counts_E = token_choice(logits_TE, top_k, None, drop_policy, normalize,
                                                bias_E, score_func, groups, seq_len, position_T)
        return causal_capped(plan, seq_len, capacity, position_T), probs_TE, counts_E
    T, E = logits_TE.shape
    probs_TE = router_scores(logits_TE, score_func)
    rank_TE = ranking_scores(probs_TE, logits_TE, score_func)
    select_TE = rank_TE if score_func == "sigmoid" and bias_E is None else None
    weight_TK, topk_idx_TK = topk_weights(probs_TE, top_k, normalize, bias_E, select_TE, groups)
    if drop_policy == "causal":  # a [T * K, 1] routing, in causal order
        order_A = causal_order(T, top_k, seq_len, logits_TE.device, position_T)
        perm_A, slot_A, counts_E = assignment_slots(topk_idx_TK.reshape(-1, 1), order_A, E)
    else:
        priority_T = None
        if capacity is not None and drop_policy == "score":
            priority_T = torch.argsort(first_choice_prob(rank_TE, topk_idx_TK),
                                       descending=True, stable=True)
        perm_A, slot_A, counts_E = assignment_slots(topk_idx_TK, priority_T, E)
    if capacity is None:
        kept_A, kept_counts_E = perm_A, counts_E
        dest_A = torch.arange(perm_A.numel(), device=perm_A.device)
    else:
        keep_A = slot_A < capacity
        kept_A = perm_A[keep_A]
        kept_counts_E = counts_E.clamp(max=capacity)
        dest_A = torch.where(keep_A, torch.cumsum(keep_A, 0) - 1, -1)
    dest_TK = torch.empty(T * top_k, dtype=torch.long, device=perm_A.device)
    dest_TK.index_copy_(0, perm_A, dest_A)
    plan = RoutingPlan(
        row_token_N=torch.div(kept_A, top_k, rounding_mode="floor"),
        row_weight_N=weight_TK.reshape(-1).index_select(0, kept_A),
        counts_E=kept_counts_E, num_tokens=T, capacity=capacity,
        dest_TK=dest_TK.view(T, top_k), weight_TK=weight_TK, expert_TK=topk_idx_TK,
    )
    return plan, probs_TE, counts_E


def causal_capped(plan: RoutingPlan, seq_len: Optional[int], capacity: int,
                  position_T: Optional[Tensor] = None) -> RoutingPlan:
    """A dropless plan ranked in :func:`causal_order`, capped by the causal rule on this batch
    alone (sequences of ``seq_len``, None: one; or the tokens at ``position_T``, all below
    ``seq_len``), in O(T * K) memory."""
    T, E = plan.num_tokens, plan.counts_E.shape[0]
    S = seq_len or max(T, 1)
    pos_N = (plan.row_token_N % S if position_T is None
             else position_T.to(plan.row_token_N.device).index_select(0, plan.row_token_N))
    expert_N = torch.repeat_interleave(torch.arange(E, device=pos_N.device), plan.counts_E)
    keep_N = causal_keep(expert_N, pos_N, plan.counts_E, S, capacity)
    return kept_rows(plan, keep_N.index_select(0, plan.dest_TK.reshape(-1)).view_as(
        plan.dest_TK), capacity)


def causal_keep(expert_N: Tensor, pos_N: Tensor, counts_E: Tensor, S: int,
                 capacity: int) -> Tensor:
    """[N] bool: which of N assignments, listed expert-major and in causal order within each
    expert (so positions never decrease along an expert's rows), the causal rule keeps.

    Position s may fill an expert up to its share of the capacity so far, budget(s) =
    min(C, ceil(C * (s + 1) / S)), what earlier positions left unused carrying over: kept(s) =
    min(budget(s), kept(s - 1) + demand(s)), in closed form through(s) + min(0, min over
    j <= s of budget(j) - through(j)), through(s) the expert's assignments at positions <= s.
    The rows of one (expert, position) run form a group, so that minimum is a cumulative one
    over the expert's groups (each expert's groups offset below the previous expert's, so one
    cummin restarts at every expert)."""
    N = expert_N.numel()
    if N == 0:
        return torch.zeros(0, dtype=torch.bool, device=expert_N.device)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    slot_N = torch.arange(N, device=expert_N.device) - start_E.index_select(0, expert_N)
    first_N = torch.ones(N, dtype=torch.bool, device=expert_N.device)
    first_N[1:] = (expert_N[1:] != expert_N[:-1]) | (pos_N[1:] != pos_N[:-1])
    group_N = torch.cumsum(first_N, 0) - 1
    head_G = first_N.nonzero().squeeze(1)  # each group's first row
    tail_G = torch.cat([head_G[1:], head_G.new_tensor([N])]) - 1
    expert_G, pos_G = expert_N.index_select(0, head_G), pos_N.index_select(0, head_G)
    through_G = slot_N.index_select(0, tail_G) + 1
    budget_G = torch.clamp((capacity * (pos_G + 1) + S - 1) // S, max=capacity)
    big = 2 * (N + capacity + 2)  # above the spread of budget - through within an expert
    low_G = torch.cummin(budget_G - through_G - expert_G * big, 0).values + expert_G * big
    kept_G = through_G + torch.clamp(low_G, max=0)  # kept up to the group's position
    before_G = torch.zeros_like(kept_G)
    before_G[1:] = torch.where(expert_G[1:] == expert_G[:-1], kept_G[:-1], 0)
    allowed_G = kept_G - before_G  # this position's share, unused earlier shares included
    rank_N = slot_N - slot_N.index_select(0, head_G).index_select(0, group_N)
    return rank_N < allowed_G.index_select(0, group_N)


def _causal_keep_globally(plan: RoutingPlan, cols_WMJ: Tensor, sizes: list[int], rank: int,
                          capacity: int) -> Tensor:
    """[T, K] bool: this rank's kept assignments when one process ranks every rank's tokens
    causally, rank 0's first: ``cols_WMJ`` holds every rank's rows of [position, K expert
    ids], padded to one length (O(global T * K), never a per-position count)."""
    K, E = plan.expert_TK.shape[1], plan.counts_E.shape[0]
    real_WM = _real_rows(sizes, cols_WMJ.shape[1], cols_WMJ.device)
    cols_GJ = cols_WMJ[real_WM]
    pos_G, expert_GK = cols_GJ[:, 0], cols_GJ[:, 1:]
    S = int(pos_G.max()) + 1 if pos_G.numel() else 1
    order_A = causal_order(pos_G.numel(), K, S, pos_G.device, pos_G)
    perm_A, _, counts_E = assignment_slots(expert_GK.reshape(-1, 1), order_A, E)
    keep_N = causal_keep(expert_GK.reshape(-1).index_select(0, perm_A),
                          pos_G.index_select(0, perm_A // K), counts_E, S, capacity)
    keep_A = torch.zeros_like(keep_N).index_copy_(0, perm_A, keep_N)
    start = sum(sizes[:rank]) * K
    return keep_A[start:start + plan.num_tokens * K].view(plan.num_tokens, K)


def choice_counts(expert_TK: Tensor, num_experts: int) -> Tensor:
    """[K, E] int64: assignments of each choice (first, second, ...) to each expert."""
    T, K = expert_TK.shape
    pair_A = (torch.arange(K, device=expert_TK.device) * num_experts + expert_TK).reshape(-1)
    return torch.bincount(pair_A, minlength=K * num_experts).view(K, num_experts)


def cap_globally(plan: RoutingPlan, counts_WKE: Tensor, rank: int, capacity_factor: float,
                 min_capacity: int, ranked: Optional[tuple[Tensor, Tensor]] = None,
                 sizes: Optional[list[int]] = None,
                 causal: Optional[Tensor] = None) -> tuple[RoutingPlan, int]:
    """Drop a dropless plan's assignments as one process would on the ranks' batches laid end to
    end (rank 0's tokens first): ``counts_WKE`` holds every rank's :func:`choice_counts`. The
    capacity is that of the global token count. Returns the capped plan (``capacity`` None: its
    rows are ragged, as a dropless plan's) and the capacity.

    Position priority (``ranked`` None) ranks an expert's assignments choice-major, then by
    token, so an assignment's global slot is its slot on this rank plus, for its choice k and
    expert e, the global assignments of earlier choices less this rank's, plus lower ranks' of
    choice k. Score priority ranks tokens by their first choice's ranking score: ``ranked =
    (priority_WM, expert_WMK)`` holds every rank's :func:`first_choice_prob` and choices, each
    rank's T rows padded to one length (padding rows are never counted). Causal priority
    (``drop_policy="causal"``) takes ``causal``: every rank's rows of [position, K expert ids],
    padded to one length; one process ranks position s of every rank (choice by choice, rank
    0's sequences first) before position s + 1, each position's drops from its share of the
    global capacity, S the largest position + 1. ``sizes``, every rank's token count, is read
    from ``counts_WKE`` when not given (a host read)."""
    _, K, E = counts_WKE.shape
    T = plan.num_tokens
    if sizes is None:
        sizes = counts_WKE[:, 0].sum(-1).tolist()
    capacity = token_choice_capacity(sum(sizes), E, K, capacity_factor, min_capacity)
    if causal is not None:
        keep_TK = _causal_keep_globally(plan, causal, sizes, rank, capacity)
        return kept_rows(plan, keep_TK, None), capacity
    if ranked is None:
        slot_TK = _position_slots(plan, counts_WKE, rank)
    else:
        slot_TK = _score_slots(*ranked, sizes, rank, E)
    return kept_rows(plan, slot_TK < capacity, None), capacity


def kept_rows(plan: RoutingPlan, keep_TK: Tensor, capacity: Optional[int]) -> RoutingPlan:
    """``plan`` with only the assignments of ``keep_TK`` (rows renumbered, order kept),
    labelled with ``capacity``."""
    T = plan.num_tokens
    expert_TK, dest_TK = plan.expert_TK, plan.dest_TK
    keep_N = torch.zeros(plan.row_token_N.numel(), dtype=torch.bool, device=dest_TK.device)
    keep_N[dest_TK.reshape(-1)] = keep_TK.reshape(-1)
    new_row_N = torch.cumsum(keep_N, 0) - 1
    kept_N = keep_N.nonzero().squeeze(1)
    capped = RoutingPlan(
        row_token_N=plan.row_token_N.index_select(0, kept_N),
        row_weight_N=plan.row_weight_N.index_select(0, kept_N),
        counts_E=torch.zeros_like(plan.counts_E).index_add_(
            0, expert_TK.reshape(-1), keep_TK.reshape(-1).to(plan.counts_E.dtype)),
        num_tokens=T, capacity=capacity,
        dest_TK=torch.where(keep_TK, new_row_N[dest_TK], -1).to(dest_TK.dtype),
        weight_TK=plan.weight_TK, expert_TK=expert_TK)
    return capped


def _position_slots(plan: RoutingPlan, counts_WKE: Tensor, rank: int) -> Tensor:
    """[T, K] global slots of this rank's assignments under position priority."""
    K = counts_WKE.shape[1]
    total_KE, local_KE = counts_WKE.sum(0), counts_WKE[rank]
    offset_KE = ((torch.cumsum(total_KE, 0) - total_KE) - (torch.cumsum(local_KE, 0) - local_KE)
                 + counts_WKE[:rank].sum(0))
    expert_TK, dest_TK = plan.expert_TK, plan.dest_TK
    start_E = torch.cumsum(plan.counts_E, 0) - plan.counts_E
    choice_TK = torch.arange(K, device=dest_TK.device).expand(plan.num_tokens, K)
    return dest_TK - start_E[expert_TK] + offset_KE.to(dest_TK.device)[choice_TK, expert_TK]


def _real_rows(sizes: list[int], M: int, device) -> Tensor:
    """[W, M] bool: which of each rank's M gathered rows are tokens (the rest are padding)."""
    return torch.arange(M, device=device) < torch.tensor(sizes, device=device)[:, None]


def _score_slots(priority_WM: Tensor, expert_WMK: Tensor, sizes: list[int], rank: int,
                 num_experts: int) -> Tensor:
    """[T, K] global slots of this rank's assignments under score priority: the one-process
    ranking (:func:`assignment_slots`) run on every rank's tokens (``sizes`` of each), padding
    rows sent to an expert of their own (id E) so that they take no real expert's slot."""
    W, M, K = expert_WMK.shape
    E = num_experts
    real_WM = _real_rows(sizes, M, expert_WMK.device)
    expert_RK = torch.where(real_WM[..., None], expert_WMK, E).reshape(W * M, K)
    order_R = torch.argsort(priority_WM.reshape(-1), descending=True, stable=True)
    perm_A, slot_A, _ = assignment_slots(expert_RK, order_R, E + 1)
    slot_RK = torch.empty(W * M * K, dtype=slot_A.dtype, device=slot_A.device)
    slot_RK[perm_A] = slot_A
    return slot_RK.view(W, M, K)[rank, :sizes[rank]]


def expert_choice(logits_TE: Tensor, capacity: int, score_func: str = "softmax"
                  ) -> tuple[RoutingPlan, Tensor]:
    """Each expert takes the ``capacity`` tokens it gives the highest score."""
    T, E = logits_TE.shape
    probs_TE = router_scores(logits_TE, score_func)
    token_CE = ranking_scores(probs_TE, logits_TE, score_func).detach().topk(capacity, dim=0).indices
    weight_CE = probs_TE.gather(0, token_CE)
    plan = RoutingPlan(
        row_token_N=token_CE.t().reshape(-1), row_weight_N=weight_CE.t().reshape(-1),
        counts_E=torch.full((E,), capacity, dtype=torch.long, device=logits_TE.device),
        num_tokens=T, capacity=capacity,
    )
    return plan, probs_TE


def expert_choice_globally(probs_TE: Tensor, score_WME: Tensor, sizes: list[int], rank: int,
                           capacity_factor: float) -> RoutingPlan:
    """This rank's share of expert choice over every rank's tokens laid end to end (rank 0's
    first): each expert takes the C = ceil(cf * global T / E) best of all of them.
    ``score_WME`` holds every rank's ranking scores (:func:`ranking_scores`, detached), each
    rank's T rows padded to M (padding rows never chosen); ``probs_TE`` are this rank's scores,
    which weigh its rows. Rows stay expert-major, in each expert's ranking order; the plan is
    ragged (``capacity`` None): a rank holds as many of an expert's C rows as it won."""
    W, M, E = score_WME.shape
    T = probs_TE.shape[0]
    capacity = expert_choice_capacity(sum(sizes), E, capacity_factor)
    real_WM = _real_rows(sizes, M, score_WME.device)
    ranked_RE = score_WME.masked_fill(~real_WM[..., None], float("-inf")).reshape(W * M, E)
    token_EC = ranked_RE.topk(capacity, dim=0).indices.t().to(probs_TE.device) - rank * M
    mine_EC = (token_EC >= 0) & (token_EC < T)
    expert_EC = torch.arange(E, device=probs_TE.device)[:, None].expand_as(token_EC)
    mine_N = mine_EC.reshape(-1).nonzero().squeeze(1)
    row_token_N = token_EC.reshape(-1).index_select(0, mine_N)
    expert_N = expert_EC.reshape(-1).index_select(0, mine_N)
    return RoutingPlan(row_token_N=row_token_N, row_weight_N=probs_TE[row_token_N, expert_N],
                       counts_E=mine_EC.sum(1), num_tokens=T, capacity=None)


def balance_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """E * sum_e f_e * P_e: f_e = share of assignments (before dropping), P_e = mean prob."""
    T, E = probs_TE.shape
    f_E = counts_E.to(probs_TE.dtype) / counts_E.sum().clamp(min=1)
    return E * torch.sum(f_E * probs_TE.sum(0) / max(T, 1))


def sequence_ids(position_T: Tensor) -> Tensor:
    """[T] each token's sequence, numbered from 0: a new sequence starts wherever the position
    does not increase (packed sequences, or a padded batch's real tokens, x[mask], keep each
    sequence's tokens together and in order)."""
    new_T = torch.ones_like(position_T, dtype=torch.bool)
    new_T[1:] = position_T[1:] <= position_T[:-1]
    return torch.cumsum(new_T, 0) - 1


def sequence_balance_loss(probs_TE: Tensor, expert_TK: Tensor, num_seqs: int,
                          seq_T: Optional[Tensor] = None) -> Tensor:
    """The mean over sequences of :func:`balance_loss` taken within each (DeepSeek-V3's
    sequence-wise balance loss): the T tokens are ``num_seqs`` sequences of T / num_seqs, or
    the sequences ``seq_T`` numbers (:func:`sequence_ids`; any lengths)."""
    T, E = probs_TE.shape
    if T == 0:  # an empty batch (e.g. a rank's last evaluation shard): no sequences
        return probs_TE.new_zeros(())
    K = expert_TK.shape[1]
    if seq_T is not None:
        len_Q = torch.bincount(seq_T)
        Q = len_Q.numel()
        counts_QE = torch.bincount(seq_T.repeat_interleave(K) * E + expert_TK.reshape(-1).long(),
                                   minlength=Q * E).view(Q, E)
        f_QE = counts_QE.to(probs_TE.dtype) / (K * len_Q[:, None]).clamp(min=1)
        p_QE = probs_TE.new_zeros(Q, E).index_add_(0, seq_T, probs_TE)
        p_QE = p_QE / len_Q[:, None].clamp(min=1)
        return E * (f_QE * p_QE).sum(1)[len_Q > 0].mean()
    if num_seqs < 1 or T % num_seqs:
        raise ValueError(f"{T} tokens do not split into num_seqs ({num_seqs}) equal sequences")
    seq_A = torch.arange(T, device=probs_TE.device).div(T // num_seqs, rounding_mode="floor")
    seq_A = seq_A.repeat_interleave(K)
    counts_QE = torch.bincount(seq_A * E + expert_TK.reshape(-1).long(),
                               minlength=num_seqs * E).view(num_seqs, E)
    f_QE = counts_QE.to(probs_TE.dtype) / (K * (T // num_seqs))
    return E * (f_QE * probs_TE.view(num_seqs, -1, E).mean(1)).sum(1).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Mean over tokens of logsumexp(logits)^2 (ST-MoE); 0 for no tokens."""
    return torch.logsumexp(logits_TE, dim=-1).square().sum() / max(logits_TE.shape[0], 1)


def router_entropy(logits_TE: Tensor, score_func: str = "softmax") -> Tensor:
    """Mean over tokens of the entropy of the router's distribution over experts."""
    if score_func == "sigmoid":
        p_TE = score_distribution(torch.sigmoid(logits_TE), score_func)
        return -(p_TE * torch.log(p_TE.clamp(min=1e-30))).sum() / max(logits_TE.shape[0], 1)
    logp_TE = torch.log_softmax(logits_TE, dim=-1)
    return -(logp_TE.exp() * logp_TE).sum() / max(logits_TE.shape[0], 1)

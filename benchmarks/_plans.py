"""Routing plans of two backends compared so that only rounding can explain a difference
(benchmarks/gpu.py's routing check on the GPU; tests/test_kernels.py tests the comparison).

Two softmaxes computed differently (a Triton kernel, torch on CUDA) may differ in the last bits,
so a token whose two best experts nearly tie may choose differently on each: that flip, and the
slots it shifts within the experts it touches, are rounding. Anything else is a bug: a flip
whose scores do not nearly tie, a slot or kept count that differs on an expert no flip touched.

Legend: T tokens, K top-k, E experts, G expert groups.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _slots_TK(dest_TK: Tensor, expert_TK: Tensor, counts_E: Tensor) -> Tensor:
    """Each assignment's slot within its expert (-1 where dropped)."""
    start_E = torch.cumsum(counts_E, 0) - counts_E
    return torch.where(dest_TK >= 0, dest_TK - start_E[expert_TK], -1)


def compare_plans(p0, p1, scores: Sequence[Tensor], group_size: Optional[int] = None,
                  tol: float = 1e-5, max_listed: int = 64) -> dict:
    """Compare plan ``p1`` against the reference ``p0``.

    ``scores``: the reference's [T, E] selection scores (probabilities, + bias, logits, ...); a
    choice that differs is explained when, in one of them, the two experts score within ``tol``
    (with ``group_size``, or their groups do, scored as the routing does: the sum of a group's
    two best). Returns ``flipped`` (fraction of tokens with another choice), ``unexplained``
    (flipped tokens no near-tie explains; more than ``max_listed`` flips count as all
    unexplained), ``slot_mismatch`` (fraction of assignments on experts no flip touched whose
    slot differs) and ``counts_equal`` (kept counts of those experts)."""
    e0_TK, e1_TK = p0.expert_TK.long(), p1.expert_TK.long()
    differ_TK = e0_TK != e1_TK
    flip_T = differ_TK.any(1)
    flipped = int(flip_T.sum())
    counts0_E, counts1_E = p0.counts_E.long(), p1.counts_E.long()
    E = counts0_E.numel()
    unexplained = flipped if flipped > max_listed else 0
    if 0 < flipped <= max_listed:
        group_scores = []
        if group_size:
            for s_TE in scores:
                s_TGS = s_TE.float().view(s_TE.shape[0], E // group_size, group_size)
                group_scores.append(s_TGS.topk(min(2, group_size), dim=-1).values.sum(-1))
        bad = set()
        for t, k in differ_TK.nonzero().tolist():
            a, b = int(e0_TK[t, k]), int(e1_TK[t, k])
            near = any(abs(float(s[t, a]) - float(s[t, b])) <= tol for s in scores)
            near = near or any(abs(float(g[t, a // group_size]) - float(g[t, b // group_size]))
                               <= tol for g in group_scores)
            if not near:
                bad.add(t)
        unexplained = len(bad)
    touched_E = torch.zeros(E, dtype=torch.bool, device=e0_TK.device)
    touched_E[e0_TK[flip_T].flatten()] = True
    touched_E[e1_TK[flip_T].flatten()] = True
    keep_TK = ~flip_T[:, None] & ~touched_E[e0_TK]
    s0_TK = _slots_TK(p0.dest_TK.long(), e0_TK, counts0_E)
    s1_TK = _slots_TK(p1.dest_TK.long(), e1_TK, counts1_E)
    slot_mismatch = float((s0_TK != s1_TK)[keep_TK].float().mean()) if keep_TK.any() else 0.0
    counts_equal = bool(torch.equal(counts0_E[~touched_E], counts1_E[~touched_E]))
    return {"flipped": flipped / max(e0_TK.shape[0], 1), "unexplained": unexplained,
            "slot_mismatch": slot_mismatch, "counts_equal": counts_equal}

"""drop_policy="causal" against its rule written as a loop: assignments in order of position,
choice, sequence; one is kept when its expert has kept fewer than min(C, ceil(C * (s + 1) / S))
assignments so far."""
import pytest
import torch

from moesaic import routing


def _kept_at_positions(expert_TK, position_T, capacity, num_experts):
    """The rule for tokens at any positions (packed or masked sequences): position by
    position, choice by choice, tokens of equal position in token order."""
    T, K = expert_TK.shape
    S = int(position_T.max()) + 1 if T else 1
    kept, keep_TK = [0] * num_experts, torch.zeros(T, K, dtype=torch.bool)
    for s in range(S):
        budget = min(capacity, -(-capacity * (s + 1) // S))
        for k in range(K):
            for t in (position_T == s).nonzero().flatten().tolist():
                e = int(expert_TK[t, k])
                if kept[e] < budget:
                    kept[e] += 1
                    keep_TK[t, k] = True
    return keep_TK


def _kept_by_the_rule(expert_TK, seq_len, capacity, num_experts):
    """The rule on batch-first sequences of ``seq_len``: their tokens' positions."""
    position_T = torch.arange(expert_TK.shape[0]) % seq_len
    return _kept_at_positions(expert_TK, position_T, capacity, num_experts)


@pytest.mark.parametrize("seed", range(4))
def test_causal_drops_follow_the_rule(seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(40):
        B, S, E = (int(torch.randint(1, n, (), generator=gen)) for n in (4, 10, 6))
        K = int(torch.randint(1, min(E, 3) + 1, (), generator=gen))
        C = int(torch.randint(0, B * S + 1, (), generator=gen))
        logits_TE = torch.randn(B * S, E, generator=gen)
        seq_len = S if B > 1 or seed % 2 else None  # one sequence: None as well
        plan, _, counts_E = routing.token_choice(logits_TE, K, C, "causal", K > 1, None,
                                                 "softmax", None, seq_len)
        want = _kept_by_the_rule(plan.expert_TK, S, C, E)
        assert torch.equal(plan.dest_TK >= 0, want), (B, S, E, K, C)
        t, k = want.nonzero(as_tuple=True)
        assert torch.equal(plan.row_token_N[plan.dest_TK[t, k]], t)
        assert plan.capacity == C and bool((plan.counts_E <= C).all())
        assert int(counts_E.sum()) == B * S * K


def test_allowance_spends_at_most_the_capacity_and_carries_what_is_unused():
    """Demand per position [0, 4, 4, 4] for expert 0 and [5, 5, 5, 5] for expert 1, C = 8 over
    S = 4 (shares 2, 4, 6, 8): the kept rows of each (expert, position) run."""
    demand_SE = torch.tensor([[0, 5], [4, 5], [4, 5], [4, 5]])
    expert_N = torch.repeat_interleave(torch.tensor([0, 1]), demand_SE.sum(0))
    pos_N = torch.cat([torch.repeat_interleave(torch.arange(4), demand_SE[:, e])
                       for e in range(2)])
    keep_N = routing.causal_keep(expert_N, pos_N, demand_SE.sum(0), 4, 8)
    kept_SE = torch.zeros(4, 2, dtype=torch.long).index_put_(
        (pos_N[keep_N], expert_N[keep_N]), torch.tensor(1), accumulate=True)
    assert kept_SE[:, 0].tolist() == [0, 4, 2, 2]  # position 0 left its 2 to position 1
    assert kept_SE[:, 1].tolist() == [2, 2, 2, 2]
    assert bool((kept_SE <= demand_SE).all()) and kept_SE.sum(0).tolist() == [8, 8]
    group_N = pos_N * 2 + expert_N  # each run keeps its first rows
    for g in group_N.unique():
        kept = keep_N[group_N == g]
        assert torch.equal(kept, kept.sort(descending=True).values)


def test_seq_len_must_divide_the_tokens():
    with pytest.raises(ValueError, match=r"seq_len \(4\) must be positive and divide the 10 "):
        routing.causal_order(10, 2, 4, "cpu")


@pytest.mark.parametrize("seed", range(3))
def test_causal_drops_at_given_positions_follow_the_rule(seed):
    """Packed sequences of random lengths, shuffled token by token: each token ranks by its
    own position; the plan is valid (rows point back at their tokens)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(30):
        lengths = torch.randint(1, 8, (int(torch.randint(1, 5, (), generator=gen)),),
                                generator=gen)
        position_T = torch.cat([torch.arange(int(n)) for n in lengths])
        position_T = position_T[torch.randperm(len(position_T), generator=gen)]
        T, E = len(position_T), int(torch.randint(1, 6, (), generator=gen))
        K = int(torch.randint(1, min(E, 3) + 1, (), generator=gen))
        C = int(torch.randint(0, T + 1, (), generator=gen))
        logits_TE = torch.randn(T, E, generator=gen)
        plan, _, _ = routing.token_choice(logits_TE, K, C, "causal", K > 1, None, "softmax",
                                          None, int(position_T.max()) + 1, position_T)
        want = _kept_at_positions(plan.expert_TK, position_T, C, E)
        assert torch.equal(plan.dest_TK >= 0, want), (T, E, K, C)
        t, k = want.nonzero(as_tuple=True)
        assert torch.equal(plan.row_token_N[plan.dest_TK[t, k]], t)
        assert bool((plan.counts_E <= C).all())

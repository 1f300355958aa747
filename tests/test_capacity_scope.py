"""capacity_scope="global" in one process: the ranks' capped plans, built from every rank's
choice counts, keep exactly the assignments the whole batch's capacity plan keeps (the
distributed equalities are in tests/_dist_workers.py: check_global_capacity)."""
import copy
import threading

import pytest
import torch

import moesaic
from moesaic import routing
from moesaic.parallel.comm import CountSum


def _split_plans(logits_TE, sizes, top_k, cf, min_capacity, policy):
    """What each rank's layer does: a dropless plan, then capped from the gathered counts (and
    for score priority every rank's priorities and choices, padded to the longest rank)."""
    E = logits_TE.shape[1]
    parts = torch.split(logits_TE, sizes)
    routed = [routing.token_choice(p, top_k, None, policy, top_k > 1)[:2] for p in parts]
    counts_WKE = torch.stack([routing.choice_counts(p.expert_TK, E) for p, _ in routed])
    ranked = None
    if policy == "score":
        M = max(sizes)
        pad = lambda t: torch.cat([t, t.new_full((M - t.shape[0], *t.shape[1:]), 7)])
        ranked = (torch.stack([pad(routing.first_choice_prob(probs, p.expert_TK))
                               for p, probs in routed]),
                  torch.stack([pad(p.expert_TK) for p, _ in routed]))
    return [routing.cap_globally(p, counts_WKE, r, cf, min_capacity, ranked)
            for r, (p, _) in enumerate(routed)]


@pytest.mark.parametrize("policy", ["position", "score"])  # causal: simulated ranks below
@pytest.mark.parametrize("top_k,E,sizes,cf,min_capacity", [
    (1, 4, (7, 9), 0.5, 0), (2, 4, (6, 6), 0.5, 0), (2, 8, (5, 0, 11), 1.0, 1),
    (3, 6, (1, 2, 3, 4), 0.75, 2), (2, 4, (10, 10), 100.0, 4)])
def test_ranks_keep_what_the_whole_batch_keeps(top_k, E, sizes, cf, min_capacity, policy):
    logits_TE = torch.randn(sum(sizes), E, generator=torch.Generator().manual_seed(sum(sizes)))
    if policy == "score":  # ties in priority go to the earlier token, across ranks too
        logits_TE[1::3] = logits_TE[0]
    T = sum(sizes)
    capacity = routing.token_choice_capacity(T, E, top_k, cf, min_capacity)
    whole = routing.token_choice(logits_TE, top_k, capacity, policy, top_k > 1)[0]
    capped = _split_plans(logits_TE, list(sizes), top_k, cf, min_capacity, policy)
    assert all(c == capacity for _, c in capped)
    kept_TK = torch.cat([p.dest_TK >= 0 for p, _ in capped])
    assert torch.equal(kept_TK, whole.dest_TK >= 0)
    assert torch.equal(sum(p.counts_E for p, _ in capped), whole.counts_E)
    for (p, _), lo in zip(capped, [sum(sizes[:r]) for r in range(len(sizes))]):
        assert p.capacity is None and p.row_token_N.numel() == int(p.counts_E.sum())
        # each kept assignment's row holds its token and weight, rows in expert-major order
        t, k = (p.dest_TK >= 0).nonzero(as_tuple=True)
        rows = p.dest_TK[t, k]
        assert torch.equal(p.row_token_N[rows], t)
        assert torch.equal(p.row_weight_N[rows], p.weight_TK[t, k])
        experts = p.expert_TK[t, k][torch.argsort(rows)]
        assert torch.equal(experts, torch.sort(experts, stable=True).values)


def test_one_process_global_is_batch_capacity():
    x = torch.randn(4, 6, 8)
    outs = []
    for scope in ("batch", "global"):
        moesaic.moe_set_seed(0)
        layer = moesaic.MoE(8, 16, 4, top_k=2, capacity_factor=0.5, capacity_scope=scope)
        outs.append(layer(x)[0])
        assert "capacity_scope=global" in repr(layer) or scope == "batch"
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("kw,msg", [
    (dict(capacity_scope="world"), "capacity_scope must be one of ('batch', 'global'), got 'world'"),
    (dict(capacity_scope="global", drop_tokens=False), "capacity_scope='global' takes no "
     "drop_tokens=False"),
    (dict(capacity_scope="global", router="expert_choice", drop_tokens=False),
     "capacity_scope='global' takes no drop_tokens=False")])
def test_bad_scopes_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        moesaic.MoE(8, 16, 4, **kw)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("sizes,cf", [((7, 9), 1.0), ((5, 0, 11), 2.0), ((1, 2, 3, 4), 0.5)])
def test_expert_choice_ranks_take_what_the_whole_batch_takes(sizes, cf, score_func):
    """Each expert picks its C best among every rank's tokens: the ranks' rows together are the
    whole batch's plan (tokens, experts, weights), each rank holding its own tokens."""
    E = 4
    logits_TE = torch.randn(sum(sizes), E, generator=torch.Generator().manual_seed(len(sizes)))
    T = sum(sizes)
    whole, _ = routing.expert_choice(logits_TE, routing.expert_choice_capacity(T, E, cf),
                                     score_func)
    M = max(sizes)
    parts = torch.split(logits_TE, list(sizes))
    score_WME = torch.stack([torch.cat([
        routing.ranking_scores(routing.router_scores(p, score_func), p, score_func),
        torch.zeros(M - p.shape[0], E)]) for p in parts])
    got = set()
    for r, p in enumerate(parts):
        plan = routing.expert_choice_globally(routing.router_scores(p, score_func), score_WME,
                                              list(sizes), r, cf)
        assert plan.capacity is None and int(plan.counts_E.sum()) == plan.row_token_N.numel()
        expert_N = torch.repeat_interleave(torch.arange(E), plan.counts_E)
        lo = sum(sizes[:r])
        got |= {(int(t) + lo, int(e), float(w)) for t, e, w in
                zip(plan.row_token_N, expert_N, plan.row_weight_N)}
    expert_N = torch.repeat_interleave(torch.arange(E), whole.counts_E)
    want = {(int(t), int(e), float(w))
            for t, e, w in zip(whole.row_token_N, expert_N, whole.row_weight_N)}
    assert got == want


class _ThreadGather(CountSum):
    """An all-gather among threads, one per simulated rank: the layer's global-capacity path
    (its gathers and host reads) run as on W processes, in one."""

    def __init__(self, rank: int, board: list, barrier: threading.Barrier):
        super().__init__(None, range(len(board)))
        self._rank, self.board, self.barrier = rank, board, barrier

    def _check(self) -> None:
        pass

    @property
    def rank(self) -> int:
        return self._rank

    def gather(self, counts_KE, what="count"):
        self.board[self._rank] = counts_KE.detach().clone()
        self.barrier.wait()
        out = torch.stack(self.board)
        self.barrier.wait()
        return out


def _run_ranks(layer, xs, errors=None, positions=None):
    """Each rank's output, from a copy of ``layer`` per simulated rank; a rank's exception is
    raised, or kept in ``errors[rank]`` when a list is given."""
    board, barrier = [None] * len(xs), threading.Barrier(len(xs), timeout=60)
    outs, raised = [None] * len(xs), [None] * len(xs)

    def run(r):
        try:
            local = copy.deepcopy(layer)
            local.count_sum = _ThreadGather(r, board, barrier)
            outs[r] = local(xs[r], positions=None if positions is None else positions[r])[0]
        except BaseException as e:  # noqa: BLE001 - reported below
            raised[r] = e
            if errors is None:
                barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors is not None:
        errors[:] = raised
    elif any(raised):  # the cause, not a rank's broken barrier that followed it
        raise min((e for e in raised if e is not None),
                  key=lambda e: isinstance(e, threading.BrokenBarrierError))
    return outs


@pytest.mark.parametrize("policy", ["position", "score", "causal"])
@pytest.mark.parametrize("shape,sizes", [("sequences", (2, 1, 3)), ("sequences", (1, 0)),
                                         ("tokens", (7, 12)), ("tokens", (5, 0, 9))])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_layer_on_simulated_ranks_equals_one_process(policy, shape, sizes, top_k):
    """The layer's own gathers (threads standing in for ranks): the ranks' outputs laid end to
    end equal one process on the whole batch, sequences [B, S, D] (causal: by position across
    every rank's sequences, each position's budget from the global capacity) or tokens [T, D]
    (rank 0's first; causal refuses them: a rank's tokens hold no positions)."""
    D, S = 8, 5
    moesaic.moe_set_seed(top_k)
    layer = moesaic.MoE(D, 12, 4, top_k=top_k, capacity_factor=0.5, min_capacity=0,
                        drop_policy=policy, capacity_scope="global")
    gen = torch.Generator().manual_seed(sum(sizes))
    if shape == "sequences":
        xs = [torch.randn(b, S, D, generator=gen) for b in sizes]
    else:
        xs = [torch.randn(t, D, generator=gen) for t in sizes]
    whole, _ = layer(torch.cat(xs))
    assert float(layer.last_stats.dropped_fraction) > 0
    if policy == "causal" and shape == "tokens":  # positions are per sequence
        with pytest.raises(ValueError, match=r"needs a batch-first \[\.\.\., S, D\] input "
                           r"\(or positions=\) on every rank, got a \[T, D\] input on rank\(s\) \[0, 1"):
            _run_ranks(layer, xs)
        return
    torch.testing.assert_close(torch.cat(_run_ranks(layer, xs)), whole, rtol=1e-6, atol=1e-6)


def test_causal_budgets_ignore_an_empty_rank_of_longer_sequences():
    """A rank holding no tokens does not lengthen the sequences every share is counted over:
    rank 0's output equals one process on its batch, whatever S the empty rank's [0, S, D]."""
    D = 8
    moesaic.moe_set_seed(3)
    layer = moesaic.MoE(D, 12, 4, top_k=2, capacity_factor=0.5, min_capacity=0,
                        drop_policy="causal", capacity_scope="global")
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0))
    whole, _ = layer(x)
    for empty_S in (5, 9):
        outs = _run_ranks(layer, [x, torch.randn(0, empty_S, D)])
        torch.testing.assert_close(outs[0], whole, rtol=1e-6, atol=1e-6)


def test_causal_global_refuses_tokens_on_every_rank_at_once():
    """One rank passing [T, D] tokens makes every rank raise after the first gather, naming it:
    no rank waits in a collective the others never join (barrier timeout: 60 s)."""
    D = 8
    layer = moesaic.MoE(D, 12, 4, top_k=2, capacity_factor=0.5, min_capacity=0,
                        drop_policy="causal", capacity_scope="global")
    errors = []
    _run_ranks(layer, [torch.randn(2, 5, D), torch.randn(7, D), torch.randn(1, 3, D)], errors)
    for r, e in enumerate(errors):
        assert isinstance(e, ValueError), (r, e)
        assert "got a [T, D] input on rank(s) [1]" in str(e)
    assert "this rank: [T, D] of 7 tokens" in str(errors[1])
    assert "this rank: S=5" in str(errors[0])


@pytest.mark.parametrize("sizes", [(9, 4), (6, 0, 11)])
def test_causal_global_takes_tokens_with_positions(sizes):
    """[T, D] tokens with their positions (packed sequences) on every rank: the ranks' outputs
    laid end to end equal one process on all the tokens and positions."""
    D = 8
    moesaic.moe_set_seed(7)
    layer = moesaic.MoE(D, 12, 4, top_k=2, capacity_factor=0.5, min_capacity=0,
                        drop_policy="causal", capacity_scope="global")
    gen = torch.Generator().manual_seed(sum(sizes))
    xs = [torch.randn(t, D, generator=gen) for t in sizes]
    ps = [torch.randint(0, 6, (t,), generator=gen) for t in sizes]
    whole, _ = layer(torch.cat(xs), positions=torch.cat(ps))
    assert float(layer.last_stats.dropped_fraction) > 0
    outs = _run_ranks(layer, xs, positions=ps)
    torch.testing.assert_close(torch.cat(outs), whole, rtol=1e-6, atol=1e-6)

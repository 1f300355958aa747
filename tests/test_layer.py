"""The MoE layer's equivalence ladder: dense FFN, dropless vs capacity, and a per-token loop.

Legend: T tokens, D model dim, FF ffn dim, E experts, K top-k.
"""
import contextlib
import copy
import importlib.util
import shutil
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moesaic
from moesaic import routing
from reference import reference_forward

D, FF, E = 12, 20, 4


def make(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("z_loss_coef", 0.001)
    return moesaic.MoE(D, FF, E, **kw)


def grads_of(layer, x, fn):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y, aux = fn(layer, x)[:2]
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(7))
    ((y * g).sum() + 3 * aux).backward()
    return y.detach(), aux.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()
                                             if p.grad is not None}


def assert_same(a, b, atol=1e-5):
    ya, auxa, gxa, gpa = a
    yb, auxb, gxb, gpb = b
    torch.testing.assert_close(ya, yb, atol=atol, rtol=1e-4)
    torch.testing.assert_close(auxa, auxb, atol=atol, rtol=1e-4)
    torch.testing.assert_close(gxa, gxb, atol=atol, rtol=1e-4)
    assert gpa.keys() == gpb.keys()
    for name in gpa:
        torch.testing.assert_close(gpa[name], gpb[name], atol=atol, rtol=1e-4, msg=name)


def layer_fn(layer, x):
    return layer(x)


def ref_fn(layer, x):
    return reference_forward(layer, x)


CASES = [
    dict(top_k=1, capacity_factor=0.6, min_capacity=0),
    dict(top_k=1, capacity_factor=0.6, min_capacity=0, drop_policy="score"),
    dict(top_k=2, capacity_factor=0.5, min_capacity=1),
    dict(top_k=2, capacity_factor=0.5, min_capacity=1, drop_policy="score"),
    dict(top_k=2, capacity_factor=0.5, min_capacity=1, drop_policy="causal"),
    dict(top_k=3, capacity_factor=0.75, drop_policy="causal", activation="swiglu"),
    dict(top_k=2, drop_tokens=False),
    dict(top_k=3, drop_tokens=False, normalize_weights=False),
    dict(top_k=1, capacity_factor=1.0, activation="relu"),
    dict(top_k=2, capacity_factor=0.75, activation="swiglu"),
    dict(router="expert_choice", capacity_factor=1.0),
    dict(router="expert_choice", capacity_factor=0.5),
    dict(top_k=1, capacity_factor=0.8, residual=True),
    dict(top_k=2, capacity_factor=0.75, score_func="sigmoid"),
    dict(top_k=1, capacity_factor=1.0, score_func="sigmoid", num_shared_experts=1,
         drop_policy="score"),
    dict(router="expert_choice", capacity_factor=1.0, score_func="sigmoid"),
    dict(top_k=2, capacity_factor=0.75, num_groups=2, topk_groups=1, drop_policy="score"),
    dict(top_k=2, drop_tokens=False, num_groups=4, topk_groups=2, score_func="sigmoid"),
    dict(top_k=2, capacity_factor=0.5, min_capacity=1, balance_scope="sequence"),
]


@pytest.mark.parametrize("kw", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("training", [True, False])
def test_matches_per_token_loop(kw, training):
    layer = make(**kw).train(training)
    x = torch.randn(3, 9, D)
    assert_same(grads_of(layer, x, layer_fn), grads_of(layer, x, ref_fn))


@pytest.mark.parametrize("kw", CASES[:4], ids=[str(c) for c in CASES[:4]])
def test_tokens_really_dropped_and_counted(kw):
    layer = make(**kw)
    x = torch.randn(2, 16, D)
    _, _, counts, kept = reference_forward(layer, x)
    layer(x)
    s = layer.last_stats
    assert s.tokens_per_expert.tolist() == counts
    assert s.tokens_per_expert_kept.tolist() == kept
    assert sum(kept) < sum(counts)
    assert float(s.dropped_fraction) == pytest.approx(1 - sum(kept) / sum(counts))


def test_dense_ffn_equals_one_expert_moe():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(D, FF), nn.Linear(FF, D)
    layer = moesaic.MoE(D, FF, 1, drop_tokens=False, aux_loss_coef=0.0)
    with torch.no_grad():
        layer.experts.w1[0].copy_(fc1.weight.t())
        layer.experts.b1[0].copy_(fc1.bias)
        layer.experts.w2[0].copy_(fc2.weight.t())
        layer.experts.b2[0].copy_(fc2.bias)
    x = torch.randn(5, 7, D, requires_grad=True)
    y, aux = layer(x)
    y_ref = fc2(F.gelu(fc1(x)))
    torch.testing.assert_close(y, y_ref)
    assert aux.item() == 0.0
    g = torch.randn_like(y)
    gx, gw1 = torch.autograd.grad((y * g).sum(), (x, layer.experts.w1))
    gx_ref, gw1_ref = torch.autograd.grad((y_ref * g).sum(), (x, fc1.weight))
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw1[0], gw1_ref.t())


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("policy", ["position", "score", "causal"])
def test_dropless_equals_capacity_with_room(top_k, policy):
    dropless = make(top_k=top_k, drop_tokens=False)
    roomy = copy.deepcopy(dropless)
    roomy.config.drop_tokens, roomy.config.capacity_factor, roomy.config.drop_policy = True, 100.0, policy
    x = torch.randn(4, 8, D)
    assert_same(grads_of(dropless, x, layer_fn), grads_of(roomy, x, layer_fn))
    assert float(roomy.last_stats.dropped_fraction) == 0.0


@pytest.mark.parametrize("policy,causal", [("causal", True), ("position", False)])
def test_causal_drop_policy_keeps_later_positions_out_of_earlier_outputs(policy, causal):
    """Top-2 with capacity on a [B, S, D] batch: under drop_policy="causal" no output at
    position < 12 of any sequence depends on a later position of any sequence (ranked by
    position, then choice, then sequence, each position up to its share of the capacity), in
    training and in eval (capacity 0.75 in both); position priority lets a later first choice
    take an earlier second choice's slot."""
    layer = make(top_k=2, capacity_factor=0.75, eval_capacity_factor=0.75, min_capacity=0,
                 drop_policy=policy)
    gen = torch.Generator().manual_seed(3)
    for training in (True, False):
        layer.train(training)
        worst = 0.0
        for B in (1, 3):
            for _ in range(6):
                x = torch.randn(B, 24, D, generator=gen)
                later = x.clone()
                later[:, 12:] = torch.randn(B, 12, D, generator=gen)
                early = (layer(x)[0] - layer(later)[0])[:, :12]
                worst = max(worst, early.abs().max().item())
        assert float(layer.last_stats.dropped_fraction) > 0
        assert worst < 1e-6 if causal else worst > 1e-3, (training, worst)


def test_positions_rank_packed_and_masked_sequences_causally():
    """``positions``: arange positions equal the batch's own ([B, S, D]) and one sequence's
    ([T, D]); the tokens of a padded batch picked by a mask (x[mask], positions[mask]) keep
    every earlier output when later positions change, in training and eval (the Triton path:
    tests/test_kernels.py)."""
    layer = make(top_k=2, capacity_factor=0.75, eval_capacity_factor=0.75, min_capacity=0,
                 drop_policy="causal")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, D, generator=gen)
    assert torch.equal(layer(x)[0], layer(x, positions=torch.arange(10).expand(3, 10))[0])
    assert torch.equal(layer(x[0])[0], layer(x[0], positions=torch.arange(10))[0])
    lengths = torch.tensor([10, 4, 7])
    mask = torch.arange(10) < lengths[:, None]
    positions = torch.arange(10).expand(3, 10)
    for training in (True, False):
        layer.train(training)
        later = x.clone()
        later[:, 5:] = torch.randn(3, 5, D, generator=gen)
        y, y_later = (layer(v[mask], positions=positions[mask])[0] for v in (x, later))
        early = positions[mask] < 5
        assert float(layer.last_stats.dropped_fraction) > 0
        torch.testing.assert_close(y[early], y_later[early], rtol=0, atol=1e-6)
        assert not torch.allclose(y[~early], y_later[~early])


def test_sequence_balance_on_packed_sequences_is_the_mean_over_them():
    """balance_scope="sequence" with ``positions``: a sequence starts where the position does
    not increase, so a padded batch's real tokens (x[mask], positions[mask]) or packed ones
    give the mean of each sequence's own loss, whatever the lengths."""
    layer = make(top_k=2, drop_tokens=False, balance_scope="sequence")
    lengths = [6, 2, 4]
    mask = torch.arange(6) < torch.tensor(lengths)[:, None]
    x = torch.randn(3, 6, D)
    positions = torch.arange(6).expand(3, 6)
    assert routing.sequence_ids(positions[mask]).tolist() == [0] * 6 + [1] * 2 + [2] * 4
    def balance(*args, **kw):
        return layer(*args, **kw, return_stats=True)[2].balance_loss

    packed = balance(x[mask], positions=positions[mask])
    alone = [balance(x[q:q + 1, :n]) for q, n in enumerate(lengths)]
    torch.testing.assert_close(packed, torch.stack(alone).mean())
    torch.testing.assert_close(balance(x, positions=positions), balance(x))  # equal lengths


def test_positions_are_checked():
    layer = make(top_k=2, drop_policy="causal")
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"positions must have the input's shape without its "
                       r"last dim, \(2, 5\), got \(5,\)"):
        layer(x, positions=torch.arange(5))
    with pytest.raises(TypeError, match="positions must be an integer torch.Tensor, got a "
                       "torch.float32 tensor"):
        layer(x, positions=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"positions must be >= 0, got -1"):
        layer(x, positions=torch.full((2, 5), -1))
    make(top_k=2)(x, positions=torch.full((2, 5), -1))  # read by causal drops only


def test_loss_values_by_hand():
    layer = make(top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01, drop_tokens=False)
    x = torch.randn(10, D)
    _, aux = layer(x)
    logits = x @ layer.router.weight.t()
    p = logits.softmax(-1)
    chosen = p.topk(2, -1).indices
    f = torch.stack([(chosen == e).sum() for e in range(E)]).float() / 20
    balance = E * (f * p.mean(0)).sum()
    z = (logits.logsumexp(-1) ** 2).mean()
    torch.testing.assert_close(aux, 0.1 * balance + 0.01 * z)
    torch.testing.assert_close(layer.last_stats.balance_loss, balance)
    entropy = -(p * p.log()).sum(-1).mean()
    torch.testing.assert_close(layer.last_stats.router_entropy, entropy)


def test_expert_choice_has_no_balance_loss():
    layer = make(router="expert_choice", aux_loss_coef=1.0, z_loss_coef=0.0)
    _, aux = layer(torch.randn(8, D))
    assert aux.item() == 0.0


def test_residual_mixing():
    layer = make(residual=True, drop_tokens=False)
    x = torch.randn(6, D)
    y, _ = layer(x)
    plain = copy.deepcopy(layer)
    plain.residual, plain.residual_coef = None, None
    y_moe, _ = plain(x)
    c = torch.softmax(layer.residual_coef(x), -1)
    mlp = layer.residual.fc2(F.gelu(layer.residual.fc1(x)))
    torch.testing.assert_close(y, y_moe * c[:, :1] + mlp * c[:, 1:])
    assert isinstance(layer.residual_coef, nn.Linear) and layer.residual_coef.out_features == 2


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_shared_experts_are_added_to_the_routed_output(activation):
    """num_shared_experts n: a dense MLP of width n * d_ff that every token passes through,
    added to the routed experts' output; its gradients flow like any dense layer's."""
    layer = make(top_k=2, num_shared_experts=2, activation=activation, hidden_dropout=0.0)
    assert layer.shared.fc1.weight.shape == (2 * FF, D) and layer.residual is None
    x = torch.randn(10, D, requires_grad=True)
    y, _ = layer(x)
    routed = copy.deepcopy(layer)
    routed.shared = None
    torch.testing.assert_close(y, routed(x)[0] + layer.shared(x))
    y.square().sum().backward()
    assert layer.shared.fc2.weight.grad.abs().sum() > 0
    shared = {n for n, _ in layer.named_parameters() if n.startswith("shared.")}
    assert shared == ({"shared.fc1.weight", "shared.fc3.weight", "shared.fc2.weight"}
                      if activation == "swiglu" else
                      {"shared.fc1.weight", "shared.fc1.bias", "shared.fc2.weight", "shared.fc2.bias"})


def test_sigmoid_scores_weight_select_and_balance_as_deepseek_v3():
    """score_func="sigmoid": top-1 weights are sigmoid(logit) (no competition between
    experts), the experts chosen are the softmax's (both are monotone in the logit), and the
    balance loss and entropy read the scores normalised per token."""
    x = torch.randn(32, D)
    soft = make(top_k=1, drop_tokens=False)
    sig = make(top_k=1, drop_tokens=False, score_func="sigmoid")
    logits = sig.router(x)
    _, _, st_sig = sig(x, return_stats=True)
    _, _, st_soft = soft(x, return_stats=True)
    assert torch.equal(st_sig.tokens_per_expert, st_soft.tokens_per_expert)
    s_TE = torch.sigmoid(logits)
    p_TE = s_TE / s_TE.sum(-1, keepdim=True)
    f_E = st_sig.tokens_per_expert.float() / 32
    torch.testing.assert_close(st_sig.balance_loss, E * (f_E * p_TE.mean(0)).sum())
    torch.testing.assert_close(st_sig.router_entropy, -(p_TE * p_TE.log()).sum(-1).mean())
    # the outputs' weights are checked against the per-token loop (CASES)


def test_sigmoid_ranks_saturated_scores_by_logit():
    """Logits above about 17 saturate float32 sigmoids at 1.0: expert choice and the score
    drop policy still take the highest logits, not whichever tie comes first."""
    logits = torch.arange(48, dtype=torch.float32).view(48, 1) * 2.0  # one expert
    plan, _ = routing.expert_choice(logits, 4, "sigmoid")
    assert sorted(plan.row_token_N[:4].tolist()) == [44, 45, 46, 47]
    plan, _, _ = routing.token_choice(logits, 1, 3, "score", False, None, "sigmoid")
    assert sorted(plan.row_token_N.tolist()) == [45, 46, 47]


def test_routed_scale_multiplies_the_routed_part_only():
    x = torch.randn(12, D)
    base = make(top_k=2, num_shared_experts=1, drop_tokens=False)
    scaled = copy.deepcopy(base)
    scaled.config.routed_scale = 2.5
    routed_only = copy.deepcopy(base)
    routed_only.shared = None
    want = 2.5 * routed_only(x)[0] + base.shared(x)
    torch.testing.assert_close(scaled(x)[0], want, rtol=1e-5, atol=1e-6)
    assert moesaic.MoE(D, FF, E, routed_scale=2.5).config.routed_scale == 2.5


def test_dropout_branches_drops_each_branch_before_mixing():
    """dropout_branches: the experts' and the residual MLP's outputs get their own masks before
    the mix (ColossalAI Titans' placement), so an output element is zero only where both masks
    drop it (about p^2 of them), against p for dropout on the mixed output; eval is unchanged."""
    x = torch.randn(4000, D)
    zeros = {}
    for branches in (False, True):
        layer = make(residual=True, drop_tokens=False, dropout=0.5, dropout_branches=branches)
        torch.manual_seed(1)
        y, _ = layer.train()(x)
        zeros[branches] = (y == 0).float().mean().item()
        y_eval, _ = layer.eval()(x)
        ref = make(residual=True, drop_tokens=False).eval()
        torch.testing.assert_close(y_eval, ref(x)[0], rtol=0, atol=0)
    assert abs(zeros[False] - 0.5) < 0.02 and abs(zeros[True] - 0.25) < 0.02, zeros
    layer = make(residual=True, drop_tokens=False, dropout=0.5, dropout_branches=True)
    torch.manual_seed(2)
    y, _ = layer.train()(x)
    plain = copy.deepcopy(layer)
    plain.residual, plain.residual_coef = None, None
    plain.config.dropout_branches = False
    torch.manual_seed(2)  # the experts' mask is drawn first, then the residual MLP's
    y_moe, _ = plain(x)
    c = torch.softmax(layer.residual_coef(x), -1)
    mlp = layer.dropout(layer.residual(x))
    torch.testing.assert_close(y, torch.lerp(mlp, y_moe, c[:, :1]))


def test_capacity_formula_and_eval_factor():
    layer = make(top_k=2, capacity_factor=0.5, eval_capacity_factor=1.0, min_capacity=3)
    x = torch.randn(20, D)
    layer.train()(x)
    assert layer.last_stats.tokens_per_expert_kept.max() <= max(3, math.ceil(0.5 * 2 * 20 / E))
    layer.eval()(x)
    assert layer.last_stats.tokens_per_expert_kept.max() <= math.ceil(1.0 * 2 * 20 / E)


@pytest.mark.parametrize("training,eval_cf,want", [(True, 0.5, 6), (False, 0.5, 6), (False, 1.0, 8)])
def test_min_capacity_and_eval_factor_bind_exactly(training, eval_cf, want):
    """Every token to expert 0 (T 32, E 4): it keeps exactly max(min_capacity 6,
    ceil(cf * T / E)) rows: 2 -> 6 in training (cf 0.25), 4 -> 6 or 8 in eval."""
    layer = make(top_k=1, capacity_factor=0.25, eval_capacity_factor=eval_cf, min_capacity=6)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(1.0)
    layer.train(training)(torch.rand(32, D) + 0.1)
    assert layer.last_stats.tokens_per_expert_kept.tolist() == [want, 0, 0, 0]


def test_expert_choice_keeps_its_compute_budget_in_eval():
    layer = make(router="expert_choice", capacity_factor=1.25)
    assert layer.config.eval_capacity_factor == 1.25 and make().config.eval_capacity_factor == 2.0
    x = torch.randn(64, D)
    kept = []
    for mode in (True, False):
        layer.train(mode)(x)
        kept.append(layer.last_stats.tokens_per_expert_kept.tolist())
    assert kept == [[20] * E, [20] * E]
    layer = make(router="expert_choice", capacity_factor=1.25, eval_capacity_factor=2.0).eval()
    layer(x)
    assert layer.last_stats.tokens_per_expert_kept.tolist() == [32] * E


@pytest.mark.parametrize("kw", [dict(balance_scope="sequence"), dict(noise_policy="gaussian"),
                                dict(noise_policy="jitter", hidden_dropout=0.2, dropout=0.2)])
def test_an_empty_batch_passes_through_also_under_sample_keys(kw):
    """[0, S, D] (a rank's empty last evaluation shard) in training and eval, with and without
    randomness keyed by sample: an empty output and a zero aux loss."""
    layer = make(top_k=2, **kw)
    for training in (True, False):
        layer.train(training)
        for keys in (None, torch.tensor([1, 2], dtype=torch.int32)):
            with moesaic.sample_keys(keys) if keys is not None else contextlib.nullcontext():
                y, aux = layer(torch.randn(0, 6, D))
            assert y.shape == (0, 6, D) and float(aux) == 0.0


@pytest.mark.parametrize("kw,named", [(dict(top_k=2), "top_k=2"),
                                      (dict(drop_tokens=False), "drop_tokens=False"),
                                      (dict(drop_policy="score"), "drop_policy='score'"),
                                      (dict(num_groups=2, topk_groups=1), "topk_groups=1"),
                                      (dict(balance_scope="sequence"),
                                       "balance_scope='sequence'")])
def test_expert_choice_refuses_token_choice_options(kw, named):
    with pytest.raises(ValueError, match=f"router='expert_choice' takes no {named}: "):
        make(router="expert_choice", **kw)


def test_capacity_is_exact_for_decimal_factors():
    assert routing.token_choice_capacity(100, 10, 1, 1.1, 0) == 11   # float 1.1 * 100 / 10 > 11
    assert routing.token_choice_capacity(100, 4, 2, 1.1, 0) == 55
    assert routing.token_choice_capacity(3, 8, 1, 1.25, 4) == 3    # min_capacity, capped at T
    assert routing.token_choice_capacity(10, 8, 2, 1e308, 0) == 10  # no overflow, capped at T
    assert routing.expert_choice_capacity(100, 10, 1.1) == 11


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_keeps_router_weight_exact(dtype):
    layer = make(top_k=2)
    layer(torch.randn(8, D))[0].sum().backward()
    w0, g0 = layer.router.weight.detach().clone(), layer.router.weight.grad.clone()
    layer.to(dtype)
    assert torch.equal(layer.router.weight.detach(), w0)
    assert torch.equal(layer.router.weight.grad, g0)
    assert layer.experts.w1.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    layer = make(top_k=2, drop_tokens=False)
    x = torch.randn(4, 8, D)
    y32, _ = layer(x)
    low = copy.deepcopy(layer).to(dtype)
    assert low.router.weight.dtype == torch.float32
    assert low.experts.w1.dtype == dtype
    y, aux = low(x.to(dtype))
    assert y.dtype == dtype and aux.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert low.router.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(residual=True), dict(num_shared_experts=1)])
def test_low_precision_input_to_float32_residual_layer(dtype, kw):
    layer = make(top_k=1, **kw)
    x = torch.randn(4, 8, D)
    y, _ = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x)[0], atol=5e-2, rtol=5e-2)


def test_expert_choice_dropped_fraction_counts_untaken_tokens():
    layer = make(router="expert_choice", capacity_factor=0.5)
    x = torch.randn(16, D)
    layer(x)
    probs = (x @ layer.router.weight.t()).softmax(-1)
    taken = set(probs.topk(2, dim=0).indices.flatten().tolist())
    assert float(layer.last_stats.dropped_fraction) == pytest.approx(1 - len(taken) / 16)


def test_bf16_autocast_on_cpu():
    layer = make(top_k=2, residual=True)
    x = torch.randn(4, 8, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    y.float().sum().backward()
    assert layer.experts.w1.grad is not None and layer.experts.w1.grad.dtype == torch.float32


def test_same_seed_same_result():
    x = torch.randn(3, 5, D)
    outs = []
    for _ in range(2):
        layer = make(seed=3, top_k=2, noise_policy="gaussian").train()
        torch.manual_seed(11)
        outs.append(layer(x)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["jitter", "gaussian"])
def test_noise_only_in_training(policy):
    layer = make(noise_policy=policy, drop_tokens=False)
    x = torch.randn(6, D)
    clean = copy.deepcopy(layer)
    clean.router.noise_policy = None
    layer.eval()
    clean.eval()
    torch.testing.assert_close(layer.router(x), clean.router(x))
    layer.train()
    noisy = layer.router(x)
    assert not torch.allclose(noisy, clean.router(x))
    if policy == "jitter":
        ratio = (x @ layer.router.weight.t()).abs().max()
        assert (noisy - clean.router(x)).abs().max() <= 0.011 * ratio * D


def test_jitter_is_uniform_between_bounds_and_seeded():
    layer = make(noise_policy="jitter")
    ones = torch.ones(4000, D)
    torch.manual_seed(5)
    u = layer.router._jitter(ones)
    assert u.min() >= 0.99 and u.max() <= 1.01
    assert u.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert u.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.02)
    torch.manual_seed(5)
    assert torch.equal(layer.router._jitter(ones), u)


def test_logit_jitter_scales_the_logits_in_training_only():
    """ColossalAI's UniformNoiseGenerator: the gate logits times U(0.99, 1.01)."""
    layer = make(noise_policy="logit_jitter")
    x = torch.randn(3000, D)
    clean = F.linear(x, layer.router.weight)
    ratio = layer.train().router(x) / clean
    assert ratio.min() >= 0.99 - 1e-5 and ratio.max() <= 1.01 + 1e-5 and ratio.std() > 1e-3
    torch.testing.assert_close(layer.eval().router(x), clean)


def test_noise_generator_follows_the_module_and_must_match_the_input():
    elsewhere = types.SimpleNamespace(device=torch.device("cuda", 0), initial_seed=lambda: 1234)
    layer = make(noise_policy="gaussian").train()
    layer.router.noise_generator = elsewhere
    layer.to("cpu")
    moved = layer.router.noise_generator
    assert moved.device == torch.device("cpu") and moved.initial_seed() == 1234
    layer.router.noise_generator = elsewhere
    with pytest.raises(ValueError, match="noise_generator is on cuda:0"):
        layer.router._generator(torch.device("cpu"))


@pytest.mark.parametrize("noise", ["jitter", "logit_jitter", "gaussian"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_routing(noise, reentrant):
    """Under torch.utils.checkpoint the backward reruns the forward: router noise and expert
    dropout must come out the same, or the gradients belong to a different routing."""
    from torch.utils.checkpoint import checkpoint
    layer = make(top_k=2, capacity_factor=0.75, noise_policy=noise, dropout=0.3).train()
    x = torch.randn(96, D)

    def plain(layer, x):
        torch.manual_seed(11)
        return layer(x)

    def checkpointed(layer, x):
        torch.manual_seed(11)
        return checkpoint(layer, x, use_reentrant=reentrant)

    assert_same(grads_of(layer, x, plain), grads_of(layer, x, checkpointed), atol=1e-6)


@pytest.mark.parametrize("kw", [dict(top_k=2, drop_tokens=False), dict(router="expert_choice")])
def test_torch_compile_traces_dropless_and_expert_choice(kw):
    """The other routings under torch.compile (aot_eager: dynamo + AOT autograd, no C++ build;
    inductor is tested on capacity routing below): eager outputs and gradients."""
    torch._dynamo.reset()
    layer = make(**kw)
    x = torch.randn(40, D)
    compiled = torch.compile(layer, backend="aot_eager")
    assert_same(grads_of(layer, x, layer_fn), grads_of(layer, x, lambda m, x: compiled(x)))


def test_gaussian_noise_scale():
    """Standard deviation 1 / E**2, as ColossalAI's NormalNoiseGenerator (WideNet's code)."""
    layer = make(noise_policy="gaussian")
    x = torch.zeros(20000, D)
    noise = layer.train().router(x)
    assert noise.std().item() == pytest.approx(1 / E ** 2, rel=0.05)


def test_shapes_and_parameter_names():
    layer = make(residual=True)
    assert tuple(layer.router.weight.shape) == (E, D)
    assert tuple(layer.experts.w1.shape) == (E, D, FF) and tuple(layer.experts.b1.shape) == (E, FF)
    assert tuple(layer.experts.w2.shape) == (E, FF, D) and tuple(layer.experts.b2.shape) == (E, D)
    assert layer.experts.global_ids == list(range(E))
    assert moesaic.MoeModule is moesaic.MoE
    swiglu = make(activation="swiglu")
    assert swiglu.experts.b1 is None and tuple(swiglu.experts.w3.shape) == (E, D, FF)


def test_single_token_and_single_expert():
    layer = make(top_k=1)
    y, _ = layer(torch.randn(1, D))
    assert y.shape == (1, D)
    one = moesaic.MoE(D, FF, 1, top_k=1)
    y, _ = one(torch.randn(2, 3, D))
    assert y.shape == (2, 3, D)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=2, drop_tokens=False), dict(router="expert_choice"),
                                dict(residual=True)])
def test_no_tokens(kw):
    layer = make(**kw)
    x = torch.zeros(0, 3, D, requires_grad=True)
    y, aux = layer(x)
    (y.sum() + aux).backward()
    assert y.shape == x.shape and aux.item() == 0.0
    assert float(layer.last_stats.dropped_fraction) == 0.0


def test_cuda_path_is_validated():
    with pytest.raises(ValueError, match="cuda_path.*'bmmm'"):
        make().experts.cuda_path = "bmmm"


def test_all_tokens_to_one_expert():
    layer = make(top_k=1, capacity_factor=1.0, min_capacity=0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(16, D)
    y, _ = layer(x)
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 0, 16, 0]
    assert layer.last_stats.tokens_per_expert_kept.tolist() == [0, 0, 4, 0]
    assert (y[4:] == 0).all() and (y[:4] != 0).any()


BAD = [
    (dict(top_k=0), "top_k"), (dict(top_k=5), "top_k"),
    (dict(capacity_factor=0), "capacity_factor"), (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(eval_capacity_factor=0.0), "eval_capacity_factor"),
    (dict(drop_policy="random"), "drop_policy"), (dict(router="hash"), "router"),
    (dict(noise_policy="rsample"), "noise_policy"), (dict(activation="tanh"), "activation"),
    (dict(min_capacity=-1), "min_capacity"), (dict(dropout=1.5), "dropout"),
    (dict(kernels="cuda"), "kernels"), (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(drop_tokens="no"), "drop_tokens"), (dict(bias=1), "bias"), (dict(residual=None), "residual"),
    (dict(normalize_weights=1), "normalize_weights"), (dict(z_loss_coef=float("inf")), "z_loss_coef"),
    (dict(dropout_branches=1), "dropout_branches"), (dict(dropout_branches=True), "dropout_branches"),
    (dict(num_shared_experts=-1), "num_shared_experts"), (dict(num_shared_experts=1.5), "num_shared_experts"),
    (dict(num_shared_experts=2, residual=True), "num_shared_experts"),
    (dict(score_func="tanh"), "score_func"), (dict(routed_scale=0.0), "routed_scale"),
    (dict(num_groups=3), "num_groups"), (dict(num_groups=0), "num_groups"),
    (dict(topk_groups=3, num_groups=2), "topk_groups"), (dict(topk_groups=0), "topk_groups"),
    (dict(top_k=3, num_groups=2, topk_groups=1), "top_k"),
    (dict(balance_scope="token"), "balance_scope"),
]


@pytest.mark.parametrize("kw,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_name_field_and_value(kw, field):
    with pytest.raises(ValueError) as err:
        moesaic.MoE(D, FF, E, **kw)
    msg = str(err.value)
    assert field in msg and repr(list(kw.values())[0]) in msg


def test_bad_input_dim():
    with pytest.raises(ValueError, match=r"d_model=12.*\(2, 5\)"):
        make()(torch.randn(2, 5))


@pytest.mark.parametrize("x,what", [(torch.ones(2, D, dtype=torch.long), "torch.int64 tensor"),
                                    (torch.ones(2, D, dtype=torch.bool), "torch.bool tensor"),
                                    ([[0.0] * D], "list")])
def test_bad_input_type(x, what):
    with pytest.raises(TypeError, match=f"floating-point torch.Tensor, got a {what}"):
        make()(x)


@pytest.mark.parametrize("x", [torch.tensor(1.0), torch.ones(3, D + 1)])
def test_bad_input_shape(x):
    with pytest.raises(ValueError, match=f"last dim must be d_model={D}"):
        make()(x)


def test_numpy_scalars_are_accepted_as_plain_numbers():
    import numpy as np
    layer = moesaic.MoE(np.int64(D), FF, E, top_k=np.int32(2), capacity_factor=np.float32(1.5))
    plain = moesaic.MoE(D, FF, E, top_k=2, capacity_factor=1.5)
    assert layer.config.as_dict() == plain.config.as_dict()
    assert type(layer.config.top_k) is int and type(layer.config.capacity_factor) is float
    assert moesaic.MoE(D, FF, E, capacity_factor=np.float32(1.1)).config.capacity_factor == 1.1
    flags = moesaic.MoE(D, FF, E, drop_tokens=np.bool_(False), normalize_weights=np.True_).config
    assert flags.drop_tokens is False and flags.normalize_weights is True


def test_router_weight_loaded_in_another_dtype_stays_float32():
    """load_state_dict(..., assign=True) installs tensors as they are, past the cast guard."""
    layer = make(top_k=2)
    sd = {k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd, assign=True)
    assert layer.router.weight.dtype == torch.float32 and layer.experts.w1.dtype == torch.bfloat16
    assert torch.equal(layer.router.weight, sd["router.weight"].float())
    x = torch.randn(4, D)  # a weight swapped in from outside (functional_call) still routes
    logits = torch.func.functional_call(layer.router, {"weight": sd["router.weight"]}, (x,))
    assert logits.dtype == torch.float32
    y, aux = layer(torch.randn(5, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(top_k=2, bias_update_rate=0.01),
                                dict(residual=True, activation="swiglu")])
def test_meta_device_build_then_reset_parameters_gives_the_eager_weights(kw):
    """Deferred init: build on meta (no memory), ``to_empty``, then each module's
    ``reset_parameters`` in order reproduces the eager build (moe_set_seed fixes the experts'
    seeds at construction; manual_seed before the reset replays the other draws)."""
    moesaic.moe_set_seed(3)
    eager = moesaic.MoE(D, FF, E, **kw)
    moesaic.moe_set_seed(3)
    with torch.device("meta"):
        layer = moesaic.MoE(D, FF, E, **kw)
    assert all(p.is_meta for p in layer.parameters())
    layer.to_empty(device="cpu")
    torch.manual_seed(3)
    for m in layer.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    ref = eager.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in layer.state_dict().items())
    assert layer.router.weight.dtype == torch.float32
    if hasattr(layer, "load_counts"):  # not saved, so not in the state dict: zeroed too
        assert not layer.load_counts.any()


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_loading_a_deferred_build_clears_the_balancing_counts(how):
    """The counts of auxiliary-loss-free balancing are not saved: loading a state dict into a
    meta build (``assign=True``) or after ``to_empty`` zeroes them on the router's device, so
    the biases move as in the eagerly built layer (on meta they stayed at zero; after to_empty
    the first step moved them by uninitialised memory)."""
    kw = dict(top_k=2, bias_update_rate=0.01)
    eager = make(**kw)
    sd = copy.deepcopy(eager.state_dict())
    with torch.device("meta"):
        layer = moesaic.MoE(D, FF, E, **kw)
    if how == "assign":
        layer.load_state_dict(sd, assign=True)
    else:
        layer.to_empty(device="cpu")
        layer.load_counts.fill_(12345)
        layer.load_state_dict(sd)
    assert layer.load_counts.device.type == "cpu" and not layer.load_counts.any()
    torch.manual_seed(5)
    xs = [torch.randn(16, D) for _ in range(3)]
    for m in (eager, layer):
        for x in xs:
            m(x)
            moesaic.update_expert_biases(m)
    assert layer.router.expert_bias.abs().sum() > 0
    assert torch.equal(layer.router.expert_bias, eager.router.expert_bias)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = make(kernels="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        layer(torch.randn(4, D))


def test_combine_is_twice_differentiable_and_the_layer_says_it_is_not():
    """A gradient penalty through dispatch.combine works (its backward runs out of place under
    create_graph); the experts' backward is first-order only, so the whole layer refuses a
    create_graph backward at once, however the second derivative would be taken (a second
    ``autograd.grad`` with ``inputs`` could skip once_differentiable's error node)."""
    from moesaic.dispatch import _Combine
    g = torch.Generator().manual_seed(0)
    y_ND = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w_N = torch.rand(5, dtype=torch.float64, generator=g, requires_grad=True)
    row_token_N = torch.tensor([0, 2, 1, 2, 3])
    dest_TK = torch.tensor([[0, -1], [2, -1], [1, 3], [4, -1]])
    weight_TK = torch.rand(4, 2, dtype=torch.float64, generator=g)
    # Expert-choice form: the forward reads w_N itself, so check both inputs.
    assert torch.autograd.gradgradcheck(
        lambda y, w: _Combine.apply(y, w, row_token_N, 4, None, None), (y_ND, w_N))
    # Token-choice form: the forward reads the (detached) weight_TK; check the rows.
    assert torch.autograd.gradgradcheck(
        lambda y: _Combine.apply(y, w_N.detach(), row_token_N, 4, dest_TK, weight_TK), (y_ND,))
    layer = moesaic.MoE(8, 16, 4, top_k=2)
    x = torch.randn(6, 8, requires_grad=True)
    y, _ = layer(x)
    with pytest.raises(RuntimeError, match="first-order gradients only.*create_graph=True"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    y, _ = layer(x)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        y.square().sum().backward(create_graph=True)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_masks_are_the_eager_masks():
    """Hidden dropout's mask hash: inductor does not keep int32 wrap-around (at width 24 it
    computed other masks), so the hash is excluded from compilation and compiled callers get
    the eager masks. (Here, not in test_hidden_dropout: inductor imports Triton, which must
    wait for test_kernels' interpreter set-up.)"""
    from moesaic.hidden_dropout import draw_keys, drop_, kept
    torch._dynamo.reset()
    keys = draw_keys(14, "cpu")
    a = torch.randn(14, 24)
    assert torch.equal(torch.compile(lambda k: kept(k, 24, 0.5))(keys), kept(keys, 24, 0.5))
    torch.testing.assert_close(torch.compile(lambda t, k: drop_(t.clone(), k, 0.5))(a, keys),
                               drop_(a.clone(), keys, 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("hidden_dropout", [0.0, 0.5])
def test_torch_compile_matches_eager(hidden_dropout, monkeypatch):
    """torch.compile (graph breaks allowed) gives the eager outputs and gradients; with hidden
    dropout too (inductor's own random numbers switched off so both draw the same keys): the
    mask hash relies on int32 wrap-around, which inductor's generated code does not keep, so
    it runs eagerly (a hidden width of 24 is one where inductor computed other masks)."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = moesaic.MoE(8, 24, E, top_k=2, capacity_factor=1.0, hidden_dropout=hidden_dropout)
    ref = copy.deepcopy(layer)
    x = torch.randn(40, 8)
    grads = []
    for m in (ref, torch.compile(layer)):
        xr = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        y, aux = m(xr)
        (y.square().sum() + aux).backward()
        grads.append((y.detach(), xr.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-5)
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)


def test_torch_compile_under_sample_keys_matches_eager():
    """A compiled zoo model inside moesaic.keyed.sample_keys: the keyed draws run eagerly (the
    salt counter is Python state), so each step's masks and noise are the eager ones, and new
    keys give new masks (no salt baked into a graph)."""
    from moesaic import keyed
    from moesaic.models import ViTMoE
    torch._dynamo.reset()
    moesaic.moe_set_seed(0)
    model = ViTMoE(img_size=8, patch_size=4, in_chans=1, num_classes=5, depth=2, d_model=16,
                   num_heads=2, num_experts=4, top_k=2, drop_tokens=False, residual=True,
                   noise_policy="gaussian", drop_rate=0.2, attn_drop=0.1, drop_path=0.3).train()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 1, 8, 8)
    outs = []
    for seed in (1, 2):
        keys = keyed.draw_sample_keys(4, torch.Generator().manual_seed(seed))
        with keyed.sample_keys(keys):
            eager = model(x)[0]
        with keyed.sample_keys(keys):
            outs.append(compiled(x)[0])
        torch.testing.assert_close(outs[-1], eager, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outs[0], outs[1])


def test_routing_stats_are_returned():
    layer = make(top_k=2)
    x = torch.randn(16, D)
    y, aux, stats = layer(x, return_stats=True)
    assert stats is layer.last_stats and int(stats.tokens_per_expert.sum()) == 32
    y2, aux2 = layer(x)
    assert torch.equal(y, y2) and torch.equal(aux, aux2) and layer.last_stats is not stats


def test_group_limited_routing_takes_each_tokens_best_groups():
    """DeepSeek-V3's group limit: a token's experts come from its topk_groups groups with the
    largest sum of their two best scores; with every group allowed, routing is unchanged."""
    T, E, G, TG, K = 200, 16, 4, 2, 4
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(T, E, generator=gen)
    for bias_E in (None, torch.randn(E, generator=gen) * 0.05):
        for score_func in ("softmax", "sigmoid"):
            plan, probs_TE, _ = routing.token_choice(logits_TE, K, None, "position", True, bias_E,
                                                     score_func, (G, TG))
            score_TE = probs_TE if bias_E is None else probs_TE + bias_E
            group_TG = score_TE.view(T, G, E // G).topk(2, -1).values.sum(-1)
            best_TG = group_TG.topk(TG, -1).indices
            chosen_TK = plan.expert_TK // (E // G)  # all k may come from one of the groups
            assert all(set(c.tolist()) <= set(b.tolist()) for c, b in zip(chosen_TK, best_TG))
            by_TE = score_TE if bias_E is not None or score_func == "softmax" else logits_TE
            allowed_TE = (torch.arange(E) // (E // G) == best_TG[:, :1]) | (
                torch.arange(E) // (E // G) == best_TG[:, 1:])
            want_TK = by_TE.masked_fill(~allowed_TE, float("-inf")).topk(K, -1).indices
            assert torch.equal(plan.expert_TK, want_TK)
            free = routing.token_choice(logits_TE, K, None, "position", True, bias_E, score_func)
            same = routing.token_choice(logits_TE, K, None, "position", True, bias_E, score_func,
                                        (G, G))
            assert torch.equal(free[0].expert_TK, same[0].expert_TK)
            if score_func == "softmax":  # some tokens would have left their groups
                assert not torch.equal(free[0].expert_TK.sort(-1).values,
                                       plan.expert_TK.sort(-1).values)
    assert make(num_groups=2).config.group_limit() is None
    assert make(num_groups=2).config.topk_groups is None  # not rewritten: replace() stays right
    assert make(num_groups=2, topk_groups=1, top_k=2).config.group_limit() == (2, 1)


def test_sequence_balance_loss_is_the_mean_over_sequences():
    B, S, K = 3, 10, 2
    logits_TE = torch.randn(B * S, E, generator=torch.Generator().manual_seed(1))
    plan, probs_TE, counts_E = routing.token_choice(logits_TE, K, None, "position", True)
    per_seq = [routing.balance_loss(probs_TE[b * S:(b + 1) * S],
                                    torch.bincount(plan.expert_TK[b * S:(b + 1) * S].reshape(-1),
                                                   minlength=E)) for b in range(B)]
    seq = routing.sequence_balance_loss(probs_TE, plan.expert_TK, B)
    torch.testing.assert_close(seq, torch.stack(per_seq).mean())
    torch.testing.assert_close(routing.sequence_balance_loss(probs_TE, plan.expert_TK, 1),
                               routing.balance_loss(probs_TE, counts_E))
    # the layer reads sequences off its input's shape: [B, S, D] is B of S, [T, D] is one
    batch, per_sequence = make(top_k=2), make(top_k=2, balance_scope="sequence")
    x = torch.randn(B, S, D)
    _, _, s_batch = batch(x, return_stats=True)
    _, aux, s_seq = per_sequence(x, return_stats=True)
    assert not torch.allclose(s_batch.balance_loss, s_seq.balance_loss)
    torch.testing.assert_close(per_sequence(x.reshape(B * S, D))[1], batch(x)[1])
    aux.backward()
    assert per_sequence.router.weight.grad.abs().sum() > 0
    assert "balance_scope=sequence" in repr(per_sequence)
    # "global" in one process (no ranks to count over) is the batch loss
    torch.testing.assert_close(make(top_k=2, balance_scope="global")(x)[1], batch(x)[1])
    with pytest.raises(ValueError, match=r"30 tokens do not split into num_seqs \(4\)"):
        routing.sequence_balance_loss(probs_TE, plan.expert_TK, 4)
    assert "topk_groups=1 of num_groups=2" in repr(make(top_k=2, num_groups=2, topk_groups=1))


def test_tracing_and_export_are_refused_with_a_reason():
    """torch.jit.trace would bake one batch's routing into the graph (and replay it for every
    input); torch.export stops on the data-dependent row counts deep inside. Both get a clear
    error naming the way out instead."""
    layer = make()
    x = torch.randn(6, D)
    with pytest.raises(RuntimeError, match="does not support torch.jit.trace.*torch.compile"):
        torch.jit.trace(lambda t: layer(t)[0], x)
    with pytest.raises(RuntimeError, match="does not support torch.export"):
        torch.export.export(layer, (x,))
    net = nn.Sequential(nn.Linear(D, D), layer)
    with pytest.raises(RuntimeError, match="does not support torch.fx symbolic tracing.*leaf"):
        torch.fx.symbolic_trace(net)

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return (isinstance(m, (moesaic.MoE, moesaic.MoEFeedForward))
                    or super().is_leaf_module(m, name))

    graph = torch.fx.GraphModule(net, LeafTracer().trace(net))  # the named way out works
    torch.testing.assert_close(graph(x)[0], net(x)[0])
    mlp = nn.Sequential(nn.Linear(D, D), moesaic.DenseMLP(D, 2 * D))
    moesaic.moeify_(mlp, 4)  # a moeified model: its MoEFeedForward is the leaf to name
    graph = torch.fx.GraphModule(mlp, LeafTracer().trace(mlp))
    torch.testing.assert_close(graph.eval()(x), mlp.eval()(x))


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=2.0), r"top_k must be an int in \[1, num_experts=4\], got 2.0"),
    (dict(num_groups=2, topk_groups=1.0),
     r"topk_groups must be None or an int in \[1, num_groups=2\], got 1.0")])
def test_a_float_count_is_refused_as_not_an_int(kw, message):
    with pytest.raises(ValueError, match=message):
        moesaic.MoE(D, 16, 4, **kw)


def test_float64_gradcheck_with_a_step_above_float32_routing():
    """A float64 layer routes in float32 (docs/architecture.md, Precision): gradcheck passes
    with a step the float32 combine weights resolve."""
    torch.manual_seed(0)
    layer = moesaic.MoE(4, 6, 3, top_k=2, residual=True).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t)[0], (x,), eps=1e-4, atol=2e-3, rtol=2e-3)
    inputs = (x, *layer.parameters())  # the analytic gradients equal the reference's
    grads = torch.autograd.grad(layer(x)[0].square().sum(), inputs)
    want = torch.autograd.grad(reference_forward(layer, x)[0].square().sum(), inputs)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_fresh_copies_a_functions_output_only_while_compiling(monkeypatch):
    """torch 2.11's dynamo gave zero gradients through a Function returning a tensor written in
    place (the compile tests above failed there); every Function of the layer returns its output
    through ``fresh``, which on torch < 2.13 copies it under torch.compile. The copying path,
    forced here, gives the eager outputs and gradients; in eager mode it is free."""
    from moesaic import autograd
    t = torch.randn(3, 4)
    assert autograd.fresh(t) is t
    monkeypatch.setattr(autograd, "_COPY_UNDER_COMPILE", True)
    assert autograd.fresh(t) is t
    torch._dynamo.reset()
    layer = make(top_k=2, drop_tokens=False)
    x = torch.randn(40, D)
    compiled = torch.compile(layer, backend="aot_eager")
    assert_same(grads_of(layer, x, layer_fn), grads_of(layer, x, lambda m, x: compiled(x)))


def test_every_function_returns_through_fresh():
    """Each custom Function's forward returns its output through ``fresh`` (see above), but
    dispatch's permute, whose output is a new tensor from an out-of-place gather."""
    import ast
    import inspect
    import moesaic.grouped_cuda
    import moesaic.parallel.comm
    modules = [moesaic.dispatch, moesaic.grouped, moesaic.grouped_cuda, moesaic.keyed,
               moesaic.parallel.comm]
    if importlib.util.find_spec("triton") is not None:
        import moesaic.kernels.route
        import moesaic.kernels.rows
        modules += [moesaic.kernels.route, moesaic.kernels.rows]
    found = []
    for mod in modules:
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.ClassDef) and any(
                    ast.unparse(b).endswith("autograd.Function") for b in node.bases):
                forward = next(f for f in node.body if getattr(f, "name", "") == "forward")
                returns = [ast.unparse(r.value) for r in ast.walk(forward)
                           if isinstance(r, ast.Return)]
                found.append(node.name)
                if node.name != "_Permute":
                    assert returns and all("fresh(" in r for r in returns), (mod.__name__,
                                                                             node.name, returns)
    assert len(found) >= (10 if importlib.util.find_spec("triton") else 7), found


def test_clip_grad_norm_takes_torchs_keywords():
    """error_if_nonfinite and foreach as in torch.nn.utils.clip_grad_norm_."""
    layer, ref, x = make(), make(), torch.randn(12, D)
    grads_of(layer, x, layer_fn)
    grads_of(ref, x, layer_fn)
    n = moesaic.clip_grad_norm_(layer, 0.1, foreach=False)
    n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    torch.testing.assert_close(n, n_ref)
    for p, q in zip(layer.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    layer.experts.w1.grad[0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="total norm of order 2.0 of the gradients is nan"):
        moesaic.clip_grad_norm_(layer, 0.1, error_if_nonfinite=True)

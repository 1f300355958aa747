"""Triton kernels against the PyTorch path, on CPU under the Triton interpreter.

Triton decides at decoration time whether a kernel (its own library functions included) is
interpreted, so TRITON_INTERPRET=1 is set before triton is first imported. If some earlier test
module already imported triton without it, this module reruns itself in a subprocess instead.
The original environment is restored when the module finishes, so other modules keep their
PyTorch path.

Legend: T tokens, D model dim, E experts, K top-k, N rows of the expert-major buffer.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

triton = pytest.importorskip("triton")

import moesaic  # noqa: E402
from moesaic import routing  # noqa: E402
from moesaic import grouped_cuda  # noqa: E402
from moesaic.experts import batched_ffn, grouped_ffn  # noqa: E402
from moesaic.ops import TorchOps, select_ops  # noqa: E402


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton.language.standard.cumsum, InterpretedFunction)


IN_PROCESS = _interpreted()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _restore_environment():
    yield
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(scope="module")
def tops():
    """TritonOps compiled for the interpreter."""
    if not IN_PROCESS:
        pytest.skip("triton was imported without TRITON_INTERPRET; run in a subprocess below")
    from moesaic.kernels import TritonOps
    return TritonOps


@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_kernels_in_a_fresh_interpreter_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(Path(__file__).resolve())], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]


def logits_for(T, E, seed, one_expert=False):
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g)
    if one_expert:
        logits_TE[:, E // 2] += 20.0
    return logits_TE.requires_grad_(True)


# (T, E, K, capacity, drop_policy, one_expert)
ROUTE_CASES = [
    (40, 6, 1, 8, "position", False),
    (40, 6, 2, 12, "position", False),
    (40, 6, 2, 12, "score", False),
    (40, 6, 1, 6, "score", False),
    (40, 6, 2, None, "position", False),
    (1, 4, 2, 4, "score", False),
    (1, 1, 1, 4, "position", False),
    (30, 1, 1, 10, "score", False),
    (24, 5, 1, 6, "position", True),
    (24, 5, 2, 6, "score", True),
    (24, 5, 2, None, "score", True),
    (300, 3, 2, 150, "position", False),
    (40, 6, 2, 12, "causal", False),
    (40, 6, 3, None, "causal", False),
    (1, 4, 2, 4, "causal", False),
    (24, 5, 2, 6, "causal", True),
    (300, 3, 2, 150, "causal", False),
]


@pytest.mark.parametrize("T,E,K,cap,policy,one_expert", ROUTE_CASES)
@pytest.mark.parametrize("score_func,biased", [("softmax", False), ("softmax", True),
                                               ("sigmoid", False), ("sigmoid", True)])
def test_token_choice_matches_torch(tops, T, E, K, cap, policy, one_expert, score_func, biased):
    """Also with a selection bias (auxiliary-loss-free balancing) that overrides the
    probabilities for some tokens, and with sigmoid scores (DeepSeek-V3's pairing)."""
    logits_TE = logits_for(T, E, seed=T + E + K, one_expert=one_expert)
    bias_E = (torch.randn(E, generator=torch.Generator().manual_seed(E)) * 0.3 if biased
              else None)
    p1 = assert_same_routing(tops, logits_TE, K, cap, policy, bias_E, score_func)
    if cap is not None and one_expert:
        assert int(p1.counts_E.sum()) < T * K  # the crowded expert dropped assignments


@pytest.mark.parametrize("T,E,K,cap,seq_len", [(40, 6, 2, 12, 8), (40, 6, 3, None, 5),
                                               (300, 3, 2, 150, 50), (6, 4, 1, 1, 1),
                                               (12, 4, 1, 2, 3)])
def test_causal_token_choice_over_sequences_matches_torch(tops, T, E, K, cap, seq_len):
    """drop_policy="causal" on T / seq_len sequences: ranked by position, then choice, then
    sequence, each position up to its share of the capacity, on both paths."""
    logits_TE = logits_for(T, E, seed=T + seq_len)
    plan = assert_same_routing(tops, logits_TE, K, cap, "causal", None, "softmax",
                               seq_len=seq_len)
    token_major = TorchOps.token_choice(logits_TE, K, cap, "causal", K >= 2)[0]
    if cap is not None and seq_len > 1:
        assert not torch.equal(plan.dest_TK, token_major.dest_TK)  # the order mattered


@pytest.mark.parametrize("T,E,K,cap", [(40, 6, 2, 12), (40, 6, 3, None), (7, 4, 1, 2)])
def test_causal_token_choice_at_given_positions_matches_torch(tops, T, E, K, cap):
    """drop_policy="causal" on packed, shuffled sequences (positions given): both paths."""
    gen = torch.Generator().manual_seed(T + E)
    position_T = (torch.arange(T) % 9)[torch.randperm(T, generator=gen)]
    assert_same_routing(tops, logits_for(T, E, seed=T), K, cap, "causal", None, "softmax",
                        seq_len=int(position_T.max()) + 1, position_T=position_T)


# (T, E, K, capacity, drop_policy, num_groups, topk_groups)
GROUP_CASES = [
    (40, 8, 2, None, "position", 4, 2),
    (40, 8, 2, 12, "score", 4, 1),
    (33, 16, 4, 10, "position", 8, 3),
    (20, 6, 1, 5, "score", 6, 2),   # groups of one expert
    (1, 8, 2, 4, "position", 2, 1),
]


@pytest.mark.parametrize("T,E,K,cap,policy,G,TG", GROUP_CASES)
@pytest.mark.parametrize("score_func,biased", [("softmax", False), ("sigmoid", True),
                                               ("sigmoid", False)])
def test_group_limited_token_choice_matches_torch(tops, T, E, K, cap, policy, G, TG, score_func,
                                                  biased):
    """DeepSeek-V3's group limit in the kernel: same groups, experts, slots and gradients."""
    logits_TE = logits_for(T, E, seed=T * G + TG)
    bias_E = torch.randn(E, generator=torch.Generator().manual_seed(E)) * 0.1 if biased else None
    plan = assert_same_routing(tops, logits_TE, K, cap, policy, bias_E, score_func, (G, TG))
    assert ((plan.expert_TK.long() // (E // G)).sort(-1).values.diff(dim=-1) != 0).sum(-1).le(
        TG - 1).all()


def test_group_ties_go_to_the_lower_group_on_both_paths(tops):
    """Equal group scores (all-zero logits; sigmoids saturated at 1.0) pick the lower group ids
    on both paths: a stable sort in PyTorch, the comparison order in the kernel."""
    saturated = torch.tensor([[18.0, 18, -5, -5, -5, -5, 40, 40]])
    for logits_TE, groups, want in ((torch.zeros(3, 8), (4, 2), [0, 1]),
                                    (saturated, (4, 1), [0])):
        for ops in (TorchOps, tops):
            plan = ops.token_choice(logits_TE, 2, None, "position", True, None, "sigmoid",
                                    groups)[0]
            assert set((plan.expert_TK.long() // 2).unique().tolist()) <= set(want), ops


def assert_same_routing(tops, logits_TE, K, cap, policy, bias_E, score_func, groups=None,
                        seq_len=None, position_T=None):
    """The Triton plan equals the PyTorch one, and so do the gradients of weights and scores."""
    T = logits_TE.shape[0]
    outs = {}
    for name, ops in (("torch", TorchOps), ("triton", tops)):
        plan, probs_TE, counts_E = ops.token_choice(logits_TE, K, cap, policy, K >= 2, bias_E,
                                                    score_func, groups, seq_len, position_T)
        g = torch.Generator().manual_seed(1)
        loss = ((plan.row_weight_N * torch.rand(plan.row_weight_N.shape, generator=g)).sum()
                + (plan.weight_TK * torch.rand(plan.weight_TK.shape, generator=g)).sum()
                + (probs_TE * torch.rand(probs_TE.shape, generator=g)).sum())
        (grad,) = torch.autograd.grad(loss, logits_TE)
        outs[name] = (plan, probs_TE.detach(), counts_E, grad)
    (p0, pr0, c0, g0), (p1, pr1, c1, g1) = outs["torch"], outs["triton"]
    for field in ("row_token_N", "counts_E", "dest_TK"):
        a, b = getattr(p0, field), getattr(p1, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert torch.equal(p0.expert_TK.long(), p1.expert_TK.long())
    assert torch.equal(c0, c1) and p1.capacity == cap and p1.num_tokens == T
    torch.testing.assert_close(p1.row_weight_N, p0.row_weight_N, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(p1.weight_TK, p0.weight_TK, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pr1, pr0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)
    return p1


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy
@pytest.mark.parametrize("scale,shift", [(30.0, 0.0), (1.0, -120.0)])
def test_sigmoid_routing_saturated_or_underflowing_scores(tops, scale, shift):
    """Logits far above 17 saturate float32 sigmoids to 1.0 (ties): both paths select by the
    logits and agree; logits below about -104 underflow every score to 0: the normalised
    weights are 0, not NaN."""
    logits_TE = (logits_for(40, 6, seed=3) * scale + shift).requires_grad_(True)
    plans = [ops.token_choice(logits_TE, 2, None, "position", True, None, "sigmoid")[0]
             for ops in (TorchOps, tops)]
    for field in ("row_token_N", "counts_E", "dest_TK"):
        assert torch.equal(getattr(plans[0], field), getattr(plans[1], field)), field
    for plan in plans:
        assert torch.isfinite(plan.weight_TK).all()
        (g,) = torch.autograd.grad(plan.weight_TK.sum(), logits_TE)
        assert torch.isfinite(g).all()
    if shift < 0:
        assert not plans[1].weight_TK.any()


# (T, E, K, capacity, drop_policy, D)
ROW_CASES = [
    (13, 4, 1, 3, "position", 19),
    (13, 4, 2, 5, "score", 19),
    (13, 4, 2, None, "position", 19),
    (1, 3, 2, 4, "position", 7),
    (9, 1, 1, 4, "position", 19),
    (5, 3, 2, 3, "score", 2100),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,K,cap,policy,D", ROW_CASES)
def test_permute_and_combine_match_torch(tops, T, E, K, cap, policy, D, dtype):
    g = torch.Generator().manual_seed(T * D + K)
    plan, _, _ = TorchOps.token_choice(logits_for(T, E, seed=D, one_expert=T > 10), K, cap,
                                       policy, K >= 2)
    x_TD = torch.randn(T, D, generator=g).to(dtype)
    y_ND = torch.randn(plan.row_token_N.numel(), D, generator=g).to(dtype)
    grad_TD = torch.randn(T, D, generator=g).to(dtype)
    w_scale = torch.rand(plan.weight_TK.shape, generator=g)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    res = {}
    for name, ops in (("torch", TorchOps), ("triton", tops)):
        x = x_TD.clone().requires_grad_(True)
        y = y_ND.clone().requires_grad_(True)
        w_TK = (plan.weight_TK.detach() * w_scale).requires_grad_(True)
        p = routing.RoutingPlan(
            row_token_N=plan.row_token_N, num_tokens=T, capacity=cap, counts_E=plan.counts_E,
            row_weight_N=w_TK.reshape(-1).index_select(
                0, _row_assignments(plan.dest_TK, plan.row_token_N.numel())),
            dest_TK=plan.dest_TK, weight_TK=w_TK)
        x_ND = ops.permute(x, p)
        out_TD = ops.combine(y, p)
        (x_ND.float() * y_ND.float()).sum().backward()
        (out_TD.float() * grad_TD.float()).sum().backward()
        res[name] = (x_ND.detach(), out_TD.detach(), x.grad, y.grad, w_TK.grad)
    for name, a, b in zip(("x_ND", "y_TD", "grad_x", "grad_y", "grad_w"), res["torch"],
                          res["triton"]):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(b, a, **tol, msg=name)
    assert torch.equal(res["torch"][0], res["triton"][0])  # dispatch is an exact copy


def _row_assignments(dest_TK, N):
    """Flat assignment id of each row (the inverse of dest_TK on kept assignments)."""
    flat = dest_TK.reshape(-1)
    kept = (flat >= 0).nonzero().squeeze(1)
    row_assign_N = torch.empty(N, dtype=torch.long)
    row_assign_N[flat[kept]] = kept
    return row_assign_N


LAYER_CASES = [
    dict(top_k=1, drop_policy="position", capacity_factor=1.0),
    dict(top_k=2, drop_policy="score", capacity_factor=1.0),
    dict(top_k=2, drop_policy="causal", capacity_factor=0.75, min_capacity=0),
    dict(top_k=2, drop_tokens=False, activation="swiglu"),
    dict(top_k=1, router="expert_choice"),
    dict(top_k=2, residual=True, min_capacity=0, capacity_factor=0.5),
    dict(top_k=2, residual=True, hidden_dropout=0.3, capacity_factor=1.0),
    dict(top_k=2, score_func="sigmoid", bias_update_rate=1e-3, num_shared_experts=1,
         capacity_factor=1.0),
    dict(top_k=2, num_groups=2, topk_groups=1, balance_scope="sequence", capacity_factor=1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", LAYER_CASES)
def test_layer_triton_equals_torch(tops, kw, dtype):
    results = []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        layer = moesaic.MoE(10, 16, 4, kernels=kernels, z_loss_coef=0.01, **kw).to(dtype)
        x = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(3)).to(dtype)
        x.requires_grad_(True)
        y, aux = layer(x)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        ((y * g).sum() + 5 * aux).backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        results.append((y.detach(), aux.detach(), x.grad, grads, layer.last_stats.as_dict()))
    (y0, a0, gx0, gp0, s0), (y1, a1, gx1, gp1, s1) = results
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(a1, a0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, **tol)
    assert gp0.keys() == gp1.keys()
    for name in gp0:
        torch.testing.assert_close(gp1[name], gp0[name], **tol, msg=name)
    assert s0["tokens_per_expert"] == s1["tokens_per_expert"]
    assert s0["tokens_per_expert_kept"] == s1["tokens_per_expert_kept"]


def test_layer_with_positions_triton_equals_torch(tops):
    """A padded batch's real tokens with their positions (x[mask], positions[mask]), causal
    drops: the same outputs, drops and gradients on both paths."""
    mask = torch.arange(7) < torch.tensor([7, 3, 5])[:, None]
    positions = torch.arange(7).expand(3, 7)[mask]
    results = []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        layer = moesaic.MoE(10, 16, 4, top_k=2, drop_policy="causal", capacity_factor=0.75,
                            min_capacity=0, kernels=kernels)
        x = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(3))[mask]
        x.requires_grad_(True)
        y, _ = layer(x, positions=positions)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, layer.last_stats.tokens_per_expert_kept))
    (y0, g0, k0), (y1, g1, k1) = results
    assert torch.equal(k0, k1) and int(k0.sum()) < 2 * int(mask.sum())  # some dropped
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)


def test_triton_layer_under_checkpointing_and_with_a_frozen_router(tops):
    """The Triton routing under activation checkpointing recomputes the same plan (noise from
    the default stream), and a frozen router gets no gradient while x and experts do."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layer = moesaic.MoE(10, 16, 4, top_k=2, capacity_factor=0.75, noise_policy="jitter",
                        kernels="triton")
    x = torch.randn(30, 10, generator=torch.Generator().manual_seed(3))
    grads = []
    for wrap in (lambda f, x: f(x), lambda f, x: checkpoint(f, x, use_reentrant=False)):
        layer.zero_grad()
        torch.manual_seed(5)
        xr = x.clone().requires_grad_(True)
        y, aux = wrap(layer, xr)
        (y.square().sum() + aux).backward()
        grads.append([xr.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)
    layer.zero_grad()
    layer.router.requires_grad_(False)
    y, aux = layer(x.clone().requires_grad_(True))
    (y.square().sum() + aux).backward()
    assert layer.router.weight.grad is None and layer.experts.w1.grad is not None


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_ops("triton", torch.device("cpu"))
    assert select_ops("auto", torch.device("cpu")) is TorchOps


def test_import_and_layer_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, moesaic\n"
            "y, aux = moesaic.MoE(8, 16, 4, kernels='auto')(torch.randn(5, 8))\n"
            "assert 'moesaic.kernels' not in sys.modules and y.shape == (5, 8)\n"
            "try:\n"
            "    moesaic.MoE(8, 16, 4, kernels='triton')(torch.randn(5, 8))\n"
            "except RuntimeError as e:\n"
            "    assert 'pip install' in str(e)\n"
            "else:\n"
            "    raise SystemExit('no error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=ROOT, env=env)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm")
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("path", ["grouped_mm", "grouped_mm_loop_wgrad", "bmm"])
def test_batched_expert_paths_match_the_loop(activation, path, monkeypatch):
    """The CUDA expert paths (checked here on CPU kernels) equal the per-expert loop; also
    with the loop fallback for weight gradients (a torch build that rejects 2-D x 2-D). In
    this process grouped_mm's bias epilogue is the Triton kernel, interpreted."""
    if path == "grouped_mm_loop_wgrad":
        monkeypatch.setattr(grouped_cuda, "_grouped_wgrad_failed", True)
        path = "grouped_mm"
    g = torch.Generator().manual_seed(5)
    E, D, Fdim, counts = 4, 16, 24, [3, 0, 7, 2]
    gated = activation == "swiglu"
    shapes = [(E, D, Fdim), None if gated else (E, Fdim), (E, Fdim, D), None if gated else (E, D),
              (E, D, Fdim) if gated else None]
    params = [None if s is None else torch.randn(s, generator=g).requires_grad_(True)
              for s in shapes]
    x = torch.randn(sum(counts), D, generator=g).requires_grad_(True)
    inputs = [x] + [p for p in params if p is not None]
    assert (grouped_cuda._fused_epilogue(x) is not None) == IN_PROCESS
    y0 = grouped_ffn(x, counts, activation, *params)
    y1 = batched_ffn(x, torch.tensor(counts), activation, *params, path=path)
    gy = torch.randn(y0.shape, generator=g)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(y0, inputs, gy), torch.autograd.grad(y1, inputs, gy)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("path", ["loop", "grouped_mm"])
def test_frozen_expert_weights_get_no_gradient_and_the_rest_are_unchanged(activation, path):
    """Fine-tuning with some expert tensors frozen: the backward skips their products, and the
    input's and trainable weights' gradients equal those of the all-trainable run."""
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    g = torch.Generator().manual_seed(8)
    E, D, Fdim, counts = 3, 8, 12, [4, 0, 5]
    gated = activation == "swiglu"
    params = _ffn_params(g, E, D, Fdim, gated, biases=not gated)
    x = torch.randn(sum(counts), D, generator=g, requires_grad=True)

    def run(p):
        if path == "loop":
            return grouped_ffn(x, counts, activation, *p)
        return batched_ffn(x, torch.tensor(counts), activation, *p, path="grouped_mm")

    gy = torch.randn(sum(counts), D, generator=g)
    full = torch.autograd.grad(run(params), [x] + [p for p in params if p is not None], gy)
    full = dict(zip(["x"] + [i for i, p in enumerate(params) if p is not None], full))
    for frozen in ({0, 3}, {2, 4}, {0, 1, 2, 3, 4}):
        part = [None if p is None else p.detach().requires_grad_(i not in frozen)
                for i, p in enumerate(params)]
        y = run(part)
        trainable = [i for i, p in enumerate(part) if p is not None and p.requires_grad]
        got = torch.autograd.grad(y, [x] + [part[i] for i in trainable], gy)
        for key, grad in zip(["x"] + trainable, got):
            torch.testing.assert_close(grad, full[key], atol=1e-5, rtol=1e-5, msg=str(key))


def _ffn_params(g, E, D, Fdim, with_w3, biases=True):
    """[w1, b1, w2, b2, w3] as the experts hold them (None where absent)."""
    shapes = [(E, D, Fdim), (E, Fdim) if biases else None, (E, Fdim, D),
              (E, D) if biases else None, (E, D, Fdim) if with_w3 else None]
    return [None if s is None else torch.randn(s, generator=g).requires_grad_(True)
            for s in shapes]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm")
def test_grouped_mm_epilogue_swiglu_with_biases_and_fallbacks(monkeypatch):
    """batched_ffn is public: swiglu with biases works on grouped_mm (the epilogue adds the bias,
    the activation stays PyTorch's); epilogue=False never calls Triton; a Triton failure falls
    back to gathering the bias; kernels="torch" layers turn the epilogue off."""
    from moesaic.kernels import bias_act
    g = torch.Generator().manual_seed(4)
    counts = [2, 0, 5, 3]
    x = torch.randn(sum(counts), 16, generator=g)
    for activation, with_w3 in (("swiglu", True), ("gelu", False)):
        params = _ffn_params(g, 4, 16, 24, with_w3)
        want = grouped_ffn(x, counts, activation, *params)
        got = batched_ffn(x, torch.tensor(counts), activation, *params, path="grouped_mm")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

        def boom(*a, **k):
            raise RuntimeError("no Triton here")

        monkeypatch.setattr(bias_act, "bias_act_", boom)
        got = batched_ffn(x, torch.tensor(counts), activation, *params, path="grouped_mm",
                          epilogue=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not grouped_cuda._epilogue_failed
        monkeypatch.setattr(grouped_cuda, "_epilogue_failed", False)
        got = batched_ffn(x, torch.tensor(counts), activation, *params, path="grouped_mm")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert grouped_cuda._epilogue_failed == IN_PROCESS
        monkeypatch.undo()
    assert not moesaic.MoE(16, 24, 4, kernels="torch").experts.triton_epilogue
    assert moesaic.MoE(16, 24, 4).experts.triton_epilogue


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm")
def test_grouped_weight_grads_of_idle_experts_are_zero(monkeypatch):
    """Whatever a grouped kernel leaves in the slices of experts with no rows (NaN here, as a
    Blackwell build can), their weight and bias gradients come out zero."""
    real = torch._grouped_mm

    def garbage_for_empty_groups(a, b, offs=None, **kw):
        out = real(a, b, offs=offs, **kw)
        if out.dim() == 3:  # the weight-gradient form: one [X, Y] slice per group
            counts = torch.diff(offs, prepend=offs.new_zeros(1))
            out[counts == 0] = float("nan")
        return out

    monkeypatch.setattr(torch, "_grouped_mm", garbage_for_empty_groups)
    g = torch.Generator().manual_seed(9)
    E, D, Fdim, counts = 4, 16, 24, [5, 0, 3, 0]
    params = [torch.randn(s, generator=g).requires_grad_(True)
              for s in [(E, D, Fdim), (E, Fdim), (E, Fdim, D), (E, D)]] + [None]
    x = torch.randn(sum(counts), D, generator=g)
    batched_ffn(x, torch.tensor(counts), "gelu", *params, path="grouped_mm").sum().backward()
    for p in params[:4]:
        assert torch.isfinite(p.grad).all() and (p.grad[[1, 3]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu", "relu"])
def test_bias_act_matches_torch(tops, activation, dtype):
    """h += b[e(n)] in place and act(h) in one pass, F not a multiple of the block, an expert
    with no rows, and N = 0."""
    from moesaic.kernels.bias_act import bias_act_
    g = torch.Generator().manual_seed(3)
    N, E, Fdim = 9, 3, 37
    h = (torch.randn(N, Fdim, generator=g) * 2).to(dtype)
    b = torch.randn(E, Fdim, generator=g).to(dtype)
    row_expert = torch.tensor([0, 0, 2, 2, 2, 2, 0, 2, 2])
    want_h = h + b[row_expert]
    a = bias_act_(h, b, row_expert, activation)
    want_a = {"none": None, "gelu": torch.nn.functional.gelu(h), "relu": torch.relu(h)}[activation]
    # the interpreter rounds float32 -> bf16 toward zero (CUDA to nearest): one bf16 ulp
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -7)
    torch.testing.assert_close(h, want_h, **tol)
    if want_a is None:
        assert a is None
    else:
        torch.testing.assert_close(a, want_a, **tol)
    empty = torch.empty(0, Fdim, dtype=dtype)
    out = bias_act_(empty, b, torch.empty(0, dtype=torch.int64), activation)
    assert empty.shape == (0, Fdim) and (out is None or out.shape == (0, Fdim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_dropout_kernel_matches_torch(tops, dtype):
    """The one-pass kernel drops exactly the PyTorch hash's elements (F not a multiple of the
    block, N = 0); its spelled-out constants are moesaic.hash32's."""
    from moesaic import hash32, hidden_dropout as hd
    from moesaic.kernels.dropout import _CONSTANTS, hidden_dropout_
    assert _CONSTANTS == dict(MUL1=hash32.MUL1, MUL2=hash32.MUL2, GOLDEN=hash32.GOLDEN,
                              LOW_BITS=2**hash32.BITS - 1)
    a = torch.randn(23, 301, generator=torch.Generator().manual_seed(8)).to(dtype)
    keys = hd.draw_keys(23, "cpu")
    want, got = hd.drop_(a.clone(), keys, 0.3), hidden_dropout_(a.clone(), keys, 0.3)
    assert torch.equal(got == 0, want == 0)
    # the interpreter rounds float32 -> bf16 toward zero (CUDA to nearest): one bf16 ulp
    tol = dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=2 ** -7)
    torch.testing.assert_close(got, want, **tol)
    assert hidden_dropout_(torch.empty(0, 301, dtype=dtype), keys[:0], 0.3).shape == (0, 301)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no torch._grouped_mm")
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mm_hidden_dropout_equals_the_loop(activation, monkeypatch):
    """grouped_mm with the Triton dropout kernel (interpreted here) and with its PyTorch
    fallback equals the per-expert loop, forward and gradients."""
    from moesaic.kernels import dropout as kdrop
    g = torch.Generator().manual_seed(9)
    E, D, Fdim, counts = 3, 8, 24, [6, 0, 9]
    gated = activation == "swiglu"
    params = _ffn_params(g, E, D, Fdim, gated, biases=not gated)
    x = torch.randn(sum(counts), D, generator=g, requires_grad=True)
    keys = torch.randint(-2**31, 2**31, (sum(counts),), dtype=torch.int32, generator=g)
    inputs = [x] + [p for p in params if p is not None]
    gy = torch.randn(sum(counts), D, generator=g)
    y0 = grouped_ffn(x, counts, activation, *params, keys_N=keys, p=0.4)
    want = torch.autograd.grad(y0, inputs, gy)
    calls = []
    real = kdrop.hidden_dropout_
    monkeypatch.setattr(kdrop, "hidden_dropout_", lambda *a: calls.append(1) or real(*a))
    for fallback in (False, True):
        monkeypatch.setattr(grouped_cuda, "_dropout_kernel_failed", fallback)
        calls.clear()
        y1 = batched_ffn(x, torch.tensor(counts), activation, *params, path="grouped_mm",
                         keys_N=keys, p=0.4)
        got = torch.autograd.grad(y1, inputs, gy)
        assert len(calls) == (0 if fallback or not IN_PROCESS else 3)  # forward, 2 backward
        torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu.py's logic end to end on tiny CPU shapes under the interpreter."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, timeout=240,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    result = json.loads(out.read_text())
    assert not result["errors"], result["errors"]
    assert all(c["ok"] for c in result["checks"]), result["checks"]
    assert sum("causal cap on the device = CPU" in c["name"] for c in result["checks"]) == 8
    ops = {(r["op"], r["kernels"]) for r in result["timings"]}
    for op in ("routing", "dispatch", "combine", "combine_bwd"):
        assert {(op, "torch"), (op, "triton")} <= ops
    assert {("layer_fwd_bwd", "torch+loop"), ("layer_fwd_bwd", "triton+auto")} <= ops
    assert len(result["speedups"]) == 2
    sweep = [r for r in result["timings"] if r["op"].endswith("_sweep")]
    assert {r["op"] for r in sweep} == {"dispatch_sweep", "combine_sweep", "combine_bwd_sweep"}
    assert all(r["same_as_library"] for r in sweep) and sum(r["default"] for r in sweep) == 3
    assert result["grouped_mm_failed"] is False


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_session_script_without_a_gpu(tmp_path):
    """benchmarks/gpu_session.sh still runs end to end here: gpu.py says it needs a GPU, the
    training part runs on the CPU, and the files land under $OUT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(tmp_path), OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert "train exit 0" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"gpu.log", "machine.txt", "train.log", "train_summary.json",
            "train_metrics.jsonl"} <= set(os.listdir(tmp_path))


def test_gpu_benchmark_keeps_its_results_when_killed(tmp_path):
    """``timeout`` sends SIGTERM: gpu.py writes what it has (atomically) and exits 124."""
    out = tmp_path / "gpu.json"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
              f"import gpu; from pathlib import Path; run = gpu.Run(Path({str(out)!r}), {{}}); "
              "run.save_on_sigterm(); run.data['timings'].append({'op': 'done before'}); "
              "os.kill(os.getpid(), signal.SIGTERM)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 124, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["timings"] == [{"op": "done before"}] and "SIGTERM" in data["errors"][0]["error"]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu.json"]  # no temp file left


AOT_SCRIPT = r'''
import sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)
from moesaic.kernels import bias_act, dropout, route, rows

target = GPUTarget("cuda", 90, 32)
ROUTE = dict(logits_ptr="*fp32", probs_ptr="*fp32", idx_ptr="*i32", hist_ptr="*i32", bias_ptr="*fp32",
             order_ptr="*i64", base_ptr="*i32", start_ptr="*i32", dest_ptr="*i64",
             row_token_ptr="*i64", row_assign_ptr="*i64", T="i32", E="i32", num_blocks="i32",
             capacity="i32")
def rows_sig(dt):
    return dict(x_ptr=dt, y_ptr=dt, g_ptr=dt, out_ptr=dt, gy_ptr=dt, dest_ptr="*i64",
                w_ptr="*fp32", gw_ptr="*fp32", D="i32")
def build(fn, sig, consts, warps):
    names = fn.arg_names
    try:
        src = ASTSource(fn=fn, constexprs={(names.index(k),): v for k, v in consts.items()},
                        signature={n: "constexpr" if n in consts else sig[n] for n in names})
    except TypeError:
        sys.exit(3)
    triton.compile(src, target=target, options={"num_warps": warps})
for K in (1, 2):
    for BT, BE in ((32, 64), (128, 8)):
        for bias, sigmoid, G, TOPG in ((False, False, 1, 1), (True, False, 1, 1),
                                       (True, True, 1, 1), (True, True, 4, 2),
                                       (False, False, 8, 1)):
            build(route._softmax_topk_kernel, ROUTE, dict(K=K, BT=BT, BE=BE, WRITE_HIST=True,
                                                          HAS_BIAS=bias, SIGMOID=sigmoid, G=G,
                                                          TOPG=TOPG, GS=BE // G), 8)
        for order in (True, False):
            build(route._ordered_hist_kernel, ROUTE, dict(K=K, BT=BT, BE=BE, HAS_ORDER=order), 8)
        build(route._place_kernel, ROUTE, dict(K=K, BT=BT, BE=BE, HAS_ORDER=True,
                                              HAS_CAPACITY=True), 8)
    for dt in ("*bf16", "*fp32"):
        build(rows._scatter_rows_kernel, rows_sig(dt), dict(K=K, BD=2048, HAS_W=True), 8)
        build(rows._gather_sum_kernel, rows_sig(dt), dict(K=K, BD=1024, HAS_W=True), 4)
        build(rows._combine_backward_kernel, rows_sig(dt), dict(K=K, KP=2, BD=1024, NB=4), 4)
for dt in ("*bf16", "*fp32", "*fp16"):
    for act in (0, 1, 2):
        build(bias_act._bias_act_kernel, dict(h_ptr=dt, b_ptr=dt, row_expert_ptr="*i64",
                                              a_ptr=dt, F="i32"), dict(ACT=act, BF=2048), 8)
    build(dropout._hidden_dropout_kernel, dict(a_ptr=dt, keys_ptr="*i32", F="i32",
                                               threshold="i32", scale="fp32"), dict(BF=2048), 8)
print("compiled")
'''


def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel builds to an sm_90 (H100/H200) binary with Triton's own ptxas: catches
    GPU-only compile errors that the interpreter cannot see, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)
    if proc.returncode == 3:
        pytest.skip("this Triton has no ahead-of-time compile API we know")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_deduplicated_dispatch_through_the_kernels():
    """Expert parallelism's deduplicated dispatch on the Triton path (2 gloo processes, which
    inherit TRITON_INTERPRET=1) equals the plain exchange on the PyTorch path."""
    from _dist_harness import run_ranks
    import _dist_workers as workers

    assert run_ranks(workers.dedup_with_kernels, 2, timeout=240) == [True, True]


def test_gpu_routing_check_tells_rounding_from_bugs():
    """benchmarks/_plans.py (gpu.py's routing check): a choice flipped at a near-tie passes,
    with the slots it shifts; a wrong expert, a wrong slot or kept count elsewhere fails."""
    import dataclasses
    import importlib.util as iu
    spec = iu.spec_from_file_location("_plans", ROOT / "benchmarks" / "_plans.py")
    plans = iu.module_from_spec(spec)
    spec.loader.exec_module(plans)
    T, E, K = 64, 8, 2
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    cap = routing.token_choice_capacity(T, E, K, 1.0, 4)
    route = lambda lg: TorchOps.token_choice(lg, K, cap, "position", True)  # noqa: E731
    p0, pr0, _ = route(logits)
    same = plans.compare_plans(p0, route(logits)[0], [pr0, logits])
    assert same == {"flipped": 0.0, "unexplained": 0, "slot_mismatch": 0.0, "counts_equal": True}
    order = logits[5].argsort(descending=True)  # token 5's second and third experts tie up
    tied, near = logits.clone(), logits.clone()  # to rounding: one plan takes each
    tied[5, order[2]] = tied[5, order[1]] - 1e-7
    near[5, order[2]] = near[5, order[1]] + 1e-7
    t0, tpr0, _ = route(tied)
    flipped = plans.compare_plans(t0, route(near)[0], [tpr0, tied])
    assert flipped["flipped"] == 1 / T and flipped["unexplained"] == 0
    assert flipped["slot_mismatch"] == 0.0 and flipped["counts_equal"]
    wrong = logits.clone()  # token 5 sent to its worst expert: no near-tie explains it
    wrong[5, order[-1]] = 10.0
    assert plans.compare_plans(p0, route(wrong)[0], [pr0, logits])["unexplained"] == 1
    dest = p0.dest_TK.clone()  # two kept assignments of one expert swap slots
    e = int(p0.expert_TK[0, 0])
    a, b = (p0.expert_TK == e).logical_and(dest >= 0).nonzero()[:2].tolist()
    dest[a[0], a[1]], dest[b[0], b[1]] = dest[b[0], b[1]], dest[a[0], a[1]]
    swapped = plans.compare_plans(p0, dataclasses.replace(p0, dest_TK=dest), [pr0, logits])
    assert swapped["slot_mismatch"] > 0 and swapped["unexplained"] == 0
    counts = p0.counts_E.clone()
    counts[e] -= 1
    counts[(e + 1) % E] += 1
    moved = plans.compare_plans(p0, dataclasses.replace(p0, counts_E=counts), [pr0, logits])
    assert not moved["counts_equal"]

"""Hidden dropout inside the experts: the hash, every expert path against an explicit-mask
reference (forward and gradients), and the layer's semantics (training only, checkpointing,
the residual MLP, the zoo's drop_rate).

Legend: N rows of the expert-major buffer, D model dim, F ffn dim, E experts.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import moesaic
import moesaic.models as zoo
from moesaic.grouped import grouped_ffn
from moesaic.grouped_cuda import batched_ffn
from moesaic.hash32 import mix_, mix_int, row_col_hash
from moesaic.hidden_dropout import draw_keys, drop_, kept

E, D, FF = 3, 8, 24


def _lowbias32(x):
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x = x * np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def test_python_int_hash_equals_the_tensor_hash():
    """mix_int (the salts of moesaic.keyed) is lowbias32 as mix_ computes it on int32 tensors."""
    xs = [0, 1, -1, 2**31 - 1, -2**31, 123456789, -987654321]
    assert [mix_int(x) for x in xs] == mix_(torch.tensor(xs, dtype=torch.int32)).tolist()
    assert mix_int(2**40 + 5) == mix_int(5)  # wraps to 32 bits


def test_hash_equals_a_uint32_reference_and_drops_at_the_asked_rate():
    """The int32 hash wraps exactly like uint32 arithmetic (the masks are then the same on every
    device and rank); masks drop p of the entries, uncorrelated across rows and features."""
    keys = draw_keys(4096, "cpu")
    assert keys.dtype == torch.int32
    col = _lowbias32(np.arange(64, dtype=np.uint32) * np.uint32(0x9E3779B9))
    want = _lowbias32(_lowbias32(keys.numpy().view(np.uint32))[:, None] ^ col[None, :])
    assert np.array_equal(row_col_hash(keys, 64).numpy().view(np.uint32), want)
    m = kept(keys, 64, 0.25).float()
    assert abs(m.mean().item() - 0.75) < 0.01
    assert abs(torch.corrcoef(torch.stack([m[:, 0], m[:, 1]]))[0, 1]) < 0.06
    assert abs(torch.corrcoef(m[:64])[0, 1]) < 0.35  # two rows of 64 features
    assert torch.equal(kept(keys, 64, 0.25), m.bool())  # a function of the keys only
    assert kept(keys, 64, 0.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_cpu_dropout_equals_the_whole_mask(dtype):
    """drop_ hashes and masks a block of rows at a time on the CPU (300 rows: two full blocks
    and a partial one): the same as masking with the whole [M, F] mask."""
    a = torch.randn(300, 40, generator=torch.Generator().manual_seed(6)).to(dtype)
    keys = draw_keys(300, "cpu")
    want = (a.float().masked_fill(~kept(keys, 40, 0.3), 0) * (1 / 0.7)).to(dtype)
    torch.testing.assert_close(drop_(a.clone(), keys, 0.3), want, rtol=0, atol=0)
    for device in ("cpu", "meta"):  # no rows (an idle rank), on the CPU and as on GPUs
        empty = torch.empty(0, 40, dtype=dtype, device=device)
        assert drop_(empty, torch.empty(0, dtype=torch.int32, device=device), 0.3).shape == (0, 40)


def test_eager_use_imports_neither_dynamo_nor_triton():
    """The hash is kept out of torch.compile lazily: a CPU training step with hidden dropout
    imports neither torch._dynamo nor Triton (each would cost a second at start-up, and
    Triton imported early defeats the Triton interpreter's set-up)."""
    code = ("import sys, torch, moesaic\n"
            "y, aux = moesaic.MoE(8, 16, 4, hidden_dropout=0.2)(torch.randn(5, 8))\n"
            "y.sum().backward()\n"
            "bad = [m for m in ('torch._dynamo', 'triton') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _params(g, gated):
    shapes = [(E, D, FF), None if gated else (E, FF), (E, FF, D), None if gated else (E, D),
              (E, D, FF) if gated else None]
    return [None if s is None else (torch.randn(s, generator=g) * 0.3).requires_grad_(True)
            for s in shapes]


def _reference(x, counts, activation, params, keys, p):
    """Per expert, act(x w1 + b1) * mask / (1 - p) @ w2 + b2 with plain autograd."""
    w1, b1, w2, b2, w3 = params
    out, s = [], 0
    for e, n in enumerate(counts):
        xe = x[s:s + n]
        h = xe @ w1[e] + (b1[e] if b1 is not None else 0)
        a = F.silu(h) * (xe @ w3[e]) if activation == "swiglu" else (
            F.gelu(h) if activation == "gelu" else F.relu(h))
        a = a * kept(keys[s:s + n], FF, p) / (1 - p)
        out.append(a @ w2[e] + (b2[e] if b2 is not None else 0))
        s += n
    return torch.cat(out)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("path", ["loop", "grouped_mm", "bmm"])
def test_every_expert_path_equals_the_explicit_mask_reference(activation, path):
    """Forward and every gradient, with an idle expert; the backward regenerates the mask."""
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("no torch._grouped_mm")
    g = torch.Generator().manual_seed(3)
    counts, p = [5, 0, 9], 0.4
    params = _params(g, activation == "swiglu")
    x = torch.randn(sum(counts), D, generator=g, requires_grad=True)
    keys = draw_keys(sum(counts), "cpu")
    inputs = [x] + [q for q in params if q is not None]
    want = _reference(x, counts, activation, params, keys, p)
    if path == "loop":
        got = grouped_ffn(x, counts, activation, *params, keys_N=keys, p=p)
    else:
        got = batched_ffn(x, torch.tensor(counts), activation, *params, path=path, keys_N=keys,
                          p=p)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    gy = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad(want, inputs, gy), torch.autograd.grad(got, inputs, gy)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_bf16_rows_scale_in_float():
    """bf16 activations keep exactly a * (1 / (1 - p)) rounded once, not times a rounded scale."""
    g = torch.Generator().manual_seed(4)
    params = [None if q is None else q.detach().bfloat16() for q in _params(g, False)]
    x = torch.randn(6, D, generator=g).bfloat16()
    keys = draw_keys(6, "cpu")
    got = grouped_ffn(x, [6, 0, 0], "gelu", *params, keys_N=keys, p=0.1)
    want = _reference(x.float(), [6, 0, 0], "gelu", [None if q is None else q.float()
                                                     for q in params], keys, 0.1)
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


def _layer(**kw):
    torch.manual_seed(0)
    return moesaic.MoE(D, FF, 4, top_k=2, **kw)


def test_layer_drops_in_training_only_and_p0_changes_nothing():
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(1))
    plain, dropped = _layer(), _layer(hidden_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    torch.manual_seed(5)
    y0 = plain(x)[0]
    torch.manual_seed(5)
    assert not torch.allclose(dropped(x)[0], y0)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x)[0], plain(x)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"hidden_dropout must be in \[0, 1\), got 1.0"):
        moesaic.MoE(D, FF, 4, hidden_dropout=1.0)


def test_layer_equals_a_per_row_reference(monkeypatch):
    """The whole layer in training: the keys are one draw per expert-major row after routing,
    and the experts' output equals the explicit-mask reference on those rows (the Triton path
    is held to the PyTorch one in test_kernels)."""
    layer = _layer(hidden_dropout=0.3)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(2))
    seen = {}
    real = layer.experts.forward

    def spy(x_ND, counts_E, keys_N=None):
        seen.update(x=x_ND.detach(), counts=counts_E.tolist(), keys=keys_N)
        return real(x_ND, counts_E, keys_N)

    monkeypatch.setattr(layer.experts, "forward", spy)
    torch.manual_seed(9)
    layer(x)
    ex = layer.experts
    want = _reference(seen["x"], seen["counts"], "gelu", [ex.w1, ex.b1, ex.w2, ex.b2, None],
                      seen["keys"], 0.3)
    assert seen["keys"].shape == (seen["x"].shape[0],)
    torch.testing.assert_close(real(seen["x"], seen["counts"], seen["keys"]), want)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpoint_recomputes_the_same_masks(use_reentrant):
    """The keys come from torch's default generator, which checkpointing restores: gradients
    through a checkpointed layer equal those of stored activations."""
    layer = _layer(hidden_dropout=0.3, residual=True)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    grads = []
    for ckpt in (False, True):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        y, aux = (checkpoint(layer, x, use_reentrant=use_reentrant) if ckpt else layer(x))
        (y.square().sum() + aux).backward()
        grads.append([x.grad.clone()] + [q.grad.clone() for q in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_residual_mlp_and_zoo_drop_rate():
    """PR-MoE's residual MLP drops after its activation too; a zoo model's drop_rate sets both
    dropouts of every MoE layer (as its dense MLPs drop after the activation and the output)."""
    layer = _layer(hidden_dropout=0.25, residual=True)
    assert layer.residual.drop.p == 0.25 and layer.experts.hidden_dropout == 0.25
    model = zoo.create("vit_moe_tiny", img_size=8, in_chans=1, patch_size=2, depth=2,
                       d_model=16, num_heads=2, num_experts=4, drop_rate=0.1)
    (moe,) = model.moe_layers()
    assert moe.config.hidden_dropout == 0.1 and moe.config.dropout == 0.1
    assert zoo.create("vit_moe_tiny").moe_layers()[0].config.hidden_dropout == 0.0
    own = zoo.create("vit_moe_tiny", drop_rate=0.1, hidden_dropout=0.3).moe_layers()[0].config
    assert own.hidden_dropout == 0.3 and own.dropout == 0.1  # set on its own

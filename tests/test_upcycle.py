"""Sparse upcycling: a dense MLP copied into every expert gives the dense MLP back when the
combine weights sum to 1; p(x) times it with top-1 softmax weights; bad input changes nothing."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moesaic
import moesaic.models as M
from moesaic import DenseMLP, MoE

D, FF = 16, 32


def _dense(activation="gelu", bias=True, seed=0):
    torch.manual_seed(seed)
    mlp = DenseMLP(D, FF, activation, bias)
    for p in mlp.parameters():  # biases away from zero, so copying them is checked
        nn.init.normal_(p, std=0.2)
    return mlp


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", True), ("gelu", False),
                                             ("swiglu", False)])
@pytest.mark.parametrize("residual", [False, True])
def test_upcycled_layer_is_the_dense_mlp(activation, bias, residual):
    """top_k 2, normalised weights, nothing dropped: output and input gradient of the dense
    MLP (the router's share cancels since the weights sum to 1); PR-MoE mixes two copies."""
    mlp = _dense(activation, bias)
    layer = MoE(D, FF, 4, top_k=2, drop_tokens=False, activation=activation, bias=bias,
                residual=residual)
    moesaic.upcycle_layer_(layer, mlp.fc1, mlp.fc2, mlp.fc3)
    x = torch.randn(2, 9, D, requires_grad=True)
    y, _ = layer(x)
    torch.testing.assert_close(y, mlp(x), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(mlp(x).square().sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_dense_mlp_without_biases_gives_zero_expert_biases():
    mlp = _dense(bias=False)
    layer = moesaic.upcycle_layer_(MoE(D, FF, 3, bias=True), mlp.fc1, mlp.fc2)
    assert layer.experts.b1.abs().sum() == 0 and layer.experts.b2.abs().sum() == 0
    for e in range(3):
        torch.testing.assert_close(layer.experts.w1[e], mlp.fc1.weight.t(), rtol=0, atol=0)
        torch.testing.assert_close(layer.experts.w2[e], mlp.fc2.weight.t(), rtol=0, atol=0)


def test_top1_softmax_weights_scale_the_dense_mlp_by_p():
    mlp = _dense()
    layer = moesaic.upcycle_layer_(MoE(D, FF, 4, top_k=1, drop_tokens=False), mlp.fc1, mlp.fc2)
    x = torch.randn(20, D)
    y, _ = layer(x)
    p_top1 = F.softmax(layer.router(x).float(), dim=-1).max(dim=-1).values
    torch.testing.assert_close(y, p_top1[:, None] * mlp(x), rtol=1e-5, atol=1e-6)


def test_bad_dense_mlps_are_refused_and_change_nothing():
    layer = MoE(D, FF, 4)
    before = copy.deepcopy(layer.state_dict())
    wide = DenseMLP(D, 2 * FF)
    gated = DenseMLP(D, FF, "swiglu")
    cases = [((wide.fc1, wide.fc2), r"fc1.weight has shape \(64, 16\), the experts need \(32, 16\)"),
             ((gated.fc1, gated.fc2, gated.fc3), "is gated .it has fc3. but the experts use"),
             ((nn.Conv1d(D, FF, 1), gated.fc2), "fc1 must be an nn.Linear, got Conv1d")]
    for args, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            moesaic.upcycle_layer_(layer, *args)
    mlp = _dense()
    with pytest.raises(ValueError, match="need the dense MLP's up projection fc3"):
        moesaic.upcycle_layer_(MoE(D, FF, 4, activation="swiglu"), mlp.fc1, mlp.fc2)
    with pytest.raises(ValueError, match=r"has fc1.bias but the experts have no biases \(bias=False"):
        moesaic.upcycle_layer_(MoE(D, FF, 4, bias=False), mlp.fc1, mlp.fc2)
    with pytest.raises(TypeError, match="must be a moesaic.MoE"):
        moesaic.upcycle_layer_(mlp, mlp.fc1, mlp.fc2)
    with torch.device("meta"):
        meta = MoE(D, FF, 4)
    with pytest.raises(ValueError, match="meta device"):
        moesaic.upcycle_layer_(meta, mlp.fc1, mlp.fc2)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def _tiny(**kw):
    return M.create("vit_moe_tiny", img_size=16, **kw)


def test_upcycled_zoo_model_gives_the_dense_models_logits():
    """vit_moe_tiny from its dense twin (num_experts=0): every weight but the routers is the
    dense model's, and the logits are the dense model's (top 2, normalised, dropless)."""
    dense = _tiny(num_experts=0).eval()
    moe = _tiny(top_k=2, drop_tokens=False).eval()
    router_before = moe.blocks[1].ffn.router.weight.clone()
    assert moesaic.upcycle_(moe, dense.state_dict()) == ["blocks.1.ffn", "blocks.3.ffn"]
    assert torch.equal(moe.blocks[1].ffn.router.weight, router_before)
    assert torch.equal(moe.head.weight, dense.head.weight)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(moe(x)[0], dense(x)[0], rtol=1e-5, atol=1e-5)
    prmoe = _tiny(num_experts=[2, 4], top_k=2, drop_tokens=False, residual=True).eval()
    moesaic.upcycle_(prmoe, dense.state_dict())
    torch.testing.assert_close(prmoe(x)[0], dense(x)[0], rtol=1e-5, atol=1e-5)


def test_upcycle_of_a_model_names_what_does_not_fit_and_writes_nothing():
    dense = _tiny(num_experts=0)
    moe = _tiny()
    before = copy.deepcopy(moe.state_dict())
    sd = dense.state_dict()
    cases = [({k: v for k, v in sd.items() if k != "blocks.3.ffn.fc2.weight"},
              r"missing in the dense state dict: blocks.3.ffn.fc2.weight \(the dense MLP for "
              r"the MoE layer blocks.3.ffn\)"),
             ({**sd, "extra.weight": torch.zeros(1)}, r"no such entry in this model: extra.weight"),
             ({**sd, "blocks.1.ffn.router.weight": torch.zeros(4, 64)},
              r"not a dense MLP's fc1/fc2 .* at an MoE layer's place: blocks.1.ffn.router.weight"),
             ({**sd, "norm.bias": sd["norm.bias"].numpy()}, r"norm.bias: not a tensor with data "
                                                            r"\(ndarray\)"),
             ({**sd, "norm.weight": torch.ones(3)}, r"norm.weight: \(3,\) in the dense model, "
                                                    r"\(64,\) here"),
             ({**sd, "blocks.3.ffn.fc1.weight": torch.zeros(FF, 64)},
              r"blocks.3.ffn: the dense fc1.weight has shape \(32, 64\)")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            moesaic.upcycle_(moe, bad)
        for k, v in moe.state_dict().items():
            assert torch.equal(v, before[k]), (msg, k)
    with pytest.raises(ValueError) as err:  # another class count: one message, with the way out
        moesaic.upcycle_(moe, _tiny(num_experts=0, num_classes=5).state_dict())
    assert "head.bias: (5,) in the dense model, (10,) here" in str(err.value)
    assert "keep=(NAME, ...)" in str(err.value) and "no such entry" not in str(err.value)
    with pytest.raises(ValueError, match="ViTMoE has no MoE layer to upcycle into"):
        moesaic.upcycle_(_tiny(num_experts=0), sd)
    with pytest.raises(TypeError, match="keep must be a tuple"):
        moesaic.upcycle_(moe, sd, keep="head.weight")
    with pytest.raises(ValueError, match="keep names blocks.1.ffn.router.weight, which are not"):
        moesaic.upcycle_(moe, sd, keep=("blocks.1.ffn.router.weight",))
    head = {k: v for k, v in sd.items() if not k.startswith("head.")}
    for dense_sd in (head, sd):  # kept entries may be in the dense state dict or not
        moesaic.upcycle_(moe, dense_sd, keep=("head.weight", "head.bias"))
        assert torch.equal(moe.head.weight, before["head.weight"])
        assert torch.equal(moe.norm.weight, sd["norm.weight"])


def test_a_layer_on_meta_or_with_shared_experts_is_refused_before_any_is_written():
    mlp = _dense()
    sd = {f"{n}.{k}": v for n in ("a", "b") for k, v in mlp.state_dict().items()}
    with torch.device("meta"):
        meta = MoE(D, FF, 2)
    for second, msg in ((meta, "b: the layer is on the meta device"),
                        (MoE(D, FF, 2, num_shared_experts=1), r"b: the layer has shared experts")):
        net = nn.ModuleDict({"a": MoE(D, FF, 2), "b": second})
        before = net["a"].experts.w1.clone()
        with pytest.raises(ValueError, match=msg):
            moesaic.upcycle_(net, sd)
        assert torch.equal(net["a"].experts.w1, before)


def test_top1_prmoe_starts_at_the_coefficient_mix():
    """PR-MoE, top-1 softmax weights: (c0 * p + c1) * MLP(x)."""
    mlp = _dense()
    layer = moesaic.upcycle_layer_(MoE(D, FF, 4, drop_tokens=False, residual=True),
                                   mlp.fc1, mlp.fc2)
    x = torch.randn(20, D)
    p_top1 = F.softmax(layer.router(x).float(), dim=-1).max(dim=-1).values
    c = F.softmax(layer.residual_coef(x), dim=-1)
    want = (c[:, 0] * p_top1 + c[:, 1])[:, None] * mlp(x)
    torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


def test_shared_layer_upcycles_once_and_checks_its_names_agree():
    moe = MoE(D, FF, 2, top_k=2, drop_tokens=False)
    net = nn.ModuleDict({"a": moe, "b": moe})
    mlp = _dense()
    sd = {f"{n}.{k}": v for n in ("a", "b") for k, v in mlp.state_dict().items()}
    assert moesaic.upcycle_(net, sd) == ["a", "b"]
    torch.testing.assert_close(moe.experts.w1[1], mlp.fc1.weight.t(), rtol=0, atol=0)
    other = _dense(seed=1).state_dict()
    with pytest.raises(ValueError, match=r"shared as a and b has different dense MLPs under "
                                         r"those names \(fc1.weight differs\)"):
        moesaic.upcycle_(net, {**sd, **{f"b.{k}": v for k, v in other.items()}})

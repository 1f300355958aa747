"""moeify_: a model written without MoE layers gets them in place of its MLP modules (upcycled),
keeps calling them as before, and hands their aux losses over through collect_aux_loss."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

import moesaic
from moesaic import DenseMLP, MoEFeedForward

D = 16


class Mlp(nn.Module):
    """timm's Mlp, in shape: fc1, act, drop, fc2."""

    def __init__(self, d, f, bias=True, bias2=None):
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(d, f, bias=bias), nn.GELU(), nn.Dropout(0.0)
        self.fc2 = nn.Linear(f, d, bias=bias if bias2 is None else bias2)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, mlp, checkpointed=False):
        super().__init__()
        self.norm, self.mlp, self.checkpointed = nn.LayerNorm(D), mlp, checkpointed

    def forward(self, x):
        h = self.norm(x)
        if self.checkpointed:
            return x + ckpt.checkpoint(self.mlp, h, use_reentrant=False)
        return x + self.mlp(h)


def net(mlps, checkpointed=False):
    torch.manual_seed(0)
    return nn.Sequential(*[Block(m, checkpointed) for m in mlps], nn.Linear(D, 3))


@pytest.mark.parametrize("make", [lambda: Mlp(D, 4 * D), lambda: Mlp(D, 4 * D, bias=False),
                                  lambda: Mlp(D, 4 * D, bias=False, bias2=True),
                                  lambda: DenseMLP(D, 3 * D, "swiglu")])
def test_upcycled_moeified_model_computes_the_dense_model(make):
    model = net([make(), make()])
    activation = "swiglu" if isinstance(model[0].mlp, DenseMLP) else "gelu"
    x = torch.randn(2, 5, D)
    ref = model.eval()(x)
    names = moesaic.moeify_(model, 4, top_k=2, drop_tokens=False, activation=activation)
    assert names == ["0.mlp", "1.mlp"] and isinstance(model[1].mlp, MoEFeedForward)
    assert model[0].mlp.moe.config.d_ff == model[0].mlp.moe.experts.w1.shape[2]
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert moesaic.collect_aux_loss(model) == 0  # eval keeps no aux losses


class GptMlp(nn.Module):
    """nanoGPT's MLP: c_fc, an nn.GELU named gelu, c_proj, dropout."""

    def __init__(self, d):
        super().__init__()
        self.c_fc, self.gelu = nn.Linear(d, 4 * d), nn.GELU()
        self.c_proj, self.dropout = nn.Linear(4 * d, d), nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SiLUActivation(nn.Module):
    """An activation class of another library (not nn.SiLU): told apart by evaluating it."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class LlamaMlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, 3 * d,
                                                                                   bias=False)
        self.down_proj, self.act_fn = nn.Linear(3 * d, d, bias=False), SiLUActivation()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("make, names", [
    (lambda: GptMlp(D), {"fc1": "c_fc", "fc2": "c_proj"}),
    (lambda: LlamaMlp(D), {"fc1": "gate_proj", "fc3": "up_proj", "fc2": "down_proj",
                           "act": "act_fn"})])
def test_names_map_other_mlp_layouts_and_their_activations_are_evaluated(make, names):
    """nanoGPT's and a Llama-style MLP: ``names`` maps the roles, the activation module is found
    (by name, or as the only parameterless child) and identified by evaluating it; the upcycled
    model computes the dense one."""
    model = net([make(), make()])
    x = torch.randn(2, 5, D)
    ref = model.eval()(x)
    with pytest.raises(ValueError, match=r"no module of Sequential was selected .*pass names="):
        moesaic.moeify_(copy.deepcopy(model), 4)
    assert moesaic.moeify_(model, 4, top_k=2, drop_tokens=False, names=names) == ["0.mlp",
                                                                                   "1.mlp"]
    expected = "swiglu" if "fc3" in names else "gelu"
    assert model[0].mlp.moe.config.activation == expected
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"names has keys \['up'\]"):
        moesaic.moeify_(net([make()]), 4, names={"up": "c_fc"})
    later = net([make(), make()])  # new experts first, then upcycle_ from the state dict
    dense_sd, ref = copy.deepcopy(later.state_dict()), later.eval()(x)
    moesaic.moeify_(later, 4, top_k=2, drop_tokens=False, names=names, upcycle=False)
    assert moesaic.upcycle_(later, dense_sd, names=names) == ["0.mlp.moe", "1.mlp.moe"]
    torch.testing.assert_close(later(x), ref, rtol=1e-5, atol=1e-6)


def test_moeify_keyword_conflicts_are_clear():
    tanh_named = GptMlp(D)
    tanh_named.gelu = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match=r"0.mlp.gelu is GELU\(approximate='tanh'\), which the"):
        moesaic.moeify_(net([tanh_named]), 4, names={"fc1": "c_fc", "fc2": "c_proj"})
    odd = Mlp(D, 32)
    odd.activation = "relu"  # a stale string beside a GELU module
    with pytest.raises(ValueError, match=r"0.mlp says activation='relu' but 0.mlp.act computes "
                                         r"'gelu'"):
        moesaic.moeify_(net([odd]), 4)
    with pytest.raises(ValueError, match=r"bias=False was given but the experts upcycled from "
                                         r"0.mlp have biases"):
        moesaic.moeify_(net([Mlp(D, 32)]), 4, bias=False)
    model = net([Mlp(D, 32)])
    moesaic.moeify_(model, 4, bias=False, upcycle=False)
    assert model[0].mlp.moe.experts.b1 is None
    with pytest.raises(TypeError, match=r"d_ff comes from each MLP"):
        moesaic.moeify_(net([Mlp(D, 32)]), 4, d_ff=64)
    with pytest.raises(ValueError, match=r"nothing to start shared experts from: pass "
                                         r"upcycle=False"):
        moesaic.moeify_(net([Mlp(D, 32)]), 4, num_shared_experts=1)
    model = net([Mlp(D, 32)])
    moesaic.moeify_(model, 4, num_shared_experts=1, upcycle=False)
    assert model[0].mlp.moe.shared is not None


def test_upcycle_fills_a_model_moeified_without_weights_from_the_dense_state_dict():
    """moeify_(upcycle=False), then upcycle_ from the dense model's state dict (the path of
    `moesaic train --set init_from=<dense run> --set upcycle=True` for a moeified model): the
    layer at NAME.moe takes the MLP stored at NAME."""
    dense = net([Mlp(D, 32), Mlp(D, 32)]).eval()
    x = torch.randn(2, 5, D)
    model = net([Mlp(D, 32), Mlp(D, 32)])
    moesaic.moeify_(model, 4, top_k=2, drop_tokens=False, upcycle=False)
    assert moesaic.upcycle_(model, dense.state_dict()) == ["0.mlp.moe", "1.mlp.moe"]
    torch.testing.assert_close(model.eval()(x), dense(x), rtol=1e-5, atol=1e-6)


def test_upcycle_of_a_layer_whose_name_ends_in_moe():
    """Only a feed-forward's own .moe takes its parent's MLP: ffn_moe keeps its own name."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn_moe = moesaic.MoE(D, 32, 4, top_k=2, drop_tokens=False)

    dense = {"ffn_moe.fc1.weight": torch.randn(32, D), "ffn_moe.fc1.bias": torch.randn(32),
             "ffn_moe.fc2.weight": torch.randn(D, 32), "ffn_moe.fc2.bias": torch.randn(D)}
    assert moesaic.upcycle_(Net(), dense) == ["ffn_moe"]


def test_aux_losses_are_collected_once_per_step_and_cleared():
    model = net([Mlp(D, 32), Mlp(D, 32)]).train()
    moesaic.moeify_(model, 4, aux_loss_coef=1.0)
    x = torch.randn(2, 5, D)
    y = model(x)
    aux = moesaic.collect_aux_loss(model)
    want = sum(model[i].mlp.moe.last_stats.balance_loss for i in (0, 1))
    torch.testing.assert_close(aux, want)
    (y.square().mean() + aux).backward()
    assert model[0].mlp.moe.router.weight.grad.abs().sum() > 0
    assert moesaic.collect_aux_loss(model) == 0  # cleared: nothing stale reaches the next step


def test_shared_mlp_becomes_one_moe_that_sums_its_calls():
    shared = Mlp(D, 32)
    model = net([shared, shared]).train()
    assert moesaic.moeify_(model, 2, aux_loss_coef=1.0) == ["0.mlp", "1.mlp"]
    assert model[0].mlp is model[1].mlp
    model(torch.randn(2, 5, D))
    aux = model[0].mlp.aux_loss
    assert aux is not None and aux.grad_fn is not None
    assert len([m for m in model.modules() if isinstance(m, moesaic.MoE)]) == 1


def test_checkpointed_recomputation_adds_no_second_aux_loss():
    model = net([Mlp(D, 32)], checkpointed=True).train()
    moesaic.moeify_(model, 4, aux_loss_coef=1.0)
    x = torch.randn(2, 5, D, requires_grad=True)
    y = model(x)
    first = model[0].mlp.aux_loss.detach().clone()
    y.sum().backward()  # recomputes the MLP
    torch.testing.assert_close(moesaic.collect_aux_loss(model), first)


def test_pending_aux_losses_never_grow_and_misuse_is_told():
    """Training without collect_aux_loss, or collecting once for two backwards, drops the
    stale aux loss with a warning (no graph grows); a forward with gradients off (reentrant
    checkpointing) keeps none and says why; a copy leaves a pending loss behind."""
    import moesaic.moeify as mf
    mf._warned.clear()
    model = net([Mlp(D, 32)]).train()
    moesaic.moeify_(model, 4, aux_loss_coef=1.0)
    x = torch.randn(2, 5, D)
    with pytest.warns(UserWarning, match="not collected before the backward"):
        for _ in range(3):
            model(x).sum().backward()
    aux = model[0].mlp.aux_loss
    torch.testing.assert_close(aux.detach(), model[0].mlp.last_stats.balance_loss)  # one call's
    copy.deepcopy(model)  # the pending loss is not copied
    model[0].mlp.aux_loss = None
    with pytest.warns(UserWarning, match=r"gradients off \(torch.no_grad\(\), or reentrant"):
        with torch.no_grad():
            model(x)
    assert model[0].mlp.aux_loss is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each is said once
        with torch.no_grad():
            model(x)


def test_activation_is_read_from_the_module_and_checked():
    relu = net([DenseMLP(D, 32, "relu")])
    x = torch.randn(2, 5, D)
    ref = relu.eval()(x)
    moesaic.moeify_(relu, 4, top_k=2, drop_tokens=False)
    assert relu[0].mlp.moe.config.activation == "relu"
    torch.testing.assert_close(relu(x), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"0.mlp applies 'relu' but activation='gelu'"):
        moesaic.moeify_(net([DenseMLP(D, 32, "relu")]), 4, activation="gelu")
    odd = Mlp(D, 32)
    odd.act = nn.Tanh()
    with pytest.raises(ValueError, match=r"0.mlp.act is Tanh\(\), which the experts do not"):
        moesaic.moeify_(net([odd]), 4)
    with pytest.raises(ValueError, match=r"cannot tell the activation of 0.mlp .Mlp.; pass"):
        moesaic.moeify_(net([odd]), 4, upcycle=False)
    gated = Mlp(D, 32)
    gated.fc3 = nn.Linear(D, 32, bias=False)
    with pytest.raises(ValueError, match=r"has an fc3 .* but its activation is 'gelu'"):
        moesaic.moeify_(net([gated]), 4)


def test_nested_and_meta_selections():
    outer = Mlp(D, 32)
    outer.inner = Mlp(D, 32)  # the experts would not compute what outer does with it
    with pytest.raises(ValueError, match=r"0.mlp \(Mlp\) holds inner \(Mlp\) besides"):
        moesaic.moeify_(net([outer]), 2)
    model = net([Mlp(D, 32)])
    assert moesaic.moeify_(model, 2) == ["0.mlp"]
    assert len([m for m in model.modules() if isinstance(m, MoEFeedForward)]) == 1
    with torch.device("meta"):
        meta = net([Mlp(D, 32)])
    with pytest.raises(ValueError, match="on the meta device, with no weights to upcycle"):
        moesaic.moeify_(meta, 4)
    moesaic.moeify_(meta, 4, upcycle=False)
    assert meta[0].mlp.moe.experts.w1.is_meta


def test_bad_selections_are_refused_before_anything_changes():
    model = net([Mlp(D, 32)])
    with pytest.raises(ValueError, match="no module of Sequential was selected"):
        moesaic.moeify_(model, 4, where=lambda n, m: False)
    with pytest.raises(ValueError, match=r"0.norm \(LayerNorm\) has no fc1 and fc2"):
        moesaic.moeify_(model, 4, where=lambda n, m: n in ("0.mlp", "0.norm"))
    odd = Mlp(D, 32)
    odd.fc2 = nn.Linear(32, 8)
    with pytest.raises(ValueError, match=r"is not a D -> F -> D MLP: fc1 16 -> 32, fc2 32 -> 8"):
        moesaic.moeify_(net([odd]), 4)
    normed = Mlp(D, 32)
    normed.norm = nn.LayerNorm(32)  # timm's Mlp(norm_layer=...): the experts have no norm
    with pytest.raises(ValueError, match=r"0.mlp \(Mlp\) holds norm \(LayerNorm\) besides"):
        moesaic.moeify_(net([normed]), 4)
    scaled = Mlp(D, 32)
    scaled.gamma = nn.Parameter(torch.ones(D))
    with pytest.raises(ValueError, match=r"holds gamma \(a parameter\)"):
        moesaic.moeify_(net([scaled]), 4, upcycle=False)
    tanh = Mlp(D, 32)
    tanh.act = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match=r"0.mlp.act is GELU\(approximate='tanh'\), which the "
                                         r"experts do not compute"):
        moesaic.moeify_(net([tanh]), 4, activation="gelu")
    assert isinstance(model[0].mlp, Mlp)
    moesaic.moeify_(net([tanh]), 4, activation="gelu", upcycle=False)  # new experts: allowed
    moesaic.moeify_(model, 4)
    with pytest.raises(ValueError, match="no module of Sequential was selected"):
        moesaic.moeify_(model, 4)  # the MoE layers' own MLPs are never selected


def test_moeifying_again_says_the_model_already_holds_moe_layers():
    model = net([Mlp(D, 32), Mlp(D, 32)])
    moesaic.moeify_(model, 4)
    with pytest.raises(ValueError, match=r"no module of Sequential was selected \(it already "
                                         r"holds 2 moesaic.MoE layers, and moeify_ replaces "
                                         r"dense MLPs only.*or where=\)"):
        moesaic.moeify_(model, 4)
    shared = Mlp(D, 32)
    one = net([shared, shared])  # one module under two names: one MoE layer
    moesaic.moeify_(one, 4)
    with pytest.raises(ValueError, match=r"already holds 1 moesaic.MoE layer, and"):
        moesaic.moeify_(one, 4)
    with pytest.raises(ValueError, match=r"was selected \(the default selects") as e:
        moesaic.moeify_(net([Mlp(D, 32)]), 4, where=lambda n, m: False)
    assert "already" not in str(e.value)


MODEL_FILE = '''
import torch
import torch.nn as nn
import moesaic
import moesaic.models as M


class Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TinyViT(nn.Module):
    """A model written without MoE layers: patches, pre-norm MLP blocks, mean pool, head."""

    def __init__(self, img_size, in_chans, num_classes, d=32, depth=2, patch=4):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, d, patch, stride=patch)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.mlps = nn.ModuleList(Mlp(d, 2 * d) for _ in range(depth))
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return self.head(h.mean(1))


def build(img_size, in_chans, num_classes, aux_loss_coef):
    net = TinyViT(img_size, in_chans, num_classes)
    moesaic.moeify_(net, 4, top_k=2, aux_loss_coef=aux_loss_coef)
    return moesaic.WithAuxLoss(net)


if "tiny_vit_moeified" not in M.list_models():
    M.register("tiny_vit_moeified", "a model written without MoE layers, moeified")(build)
'''


def test_a_moeified_model_trains_with_moesaic_train(tmp_path, capsys, monkeypatch):
    """A model from outside the zoo, moeified and wrapped by WithAuxLoss, trains with the
    training system: its aux losses reach the loss, its routing the metrics."""
    from moesaic.__main__ import main
    from moesaic.models import registry
    for table in ("_REGISTRY", "_SUMMARY"):  # the test's model leaves with the test
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    (tmp_path / "tiny_vit_moeified.py").write_text(MODEL_FILE)
    cfg = tmp_path / "c.py"
    cfg.write_text("import tiny_vit_moeified\nMODEL = 'tiny_vit_moeified'\nEPOCHS = 1\n"
                   "STEPS_PER_EPOCH = 3\nPROGRESS = False\nPLOTS = False\nTHREADS = 1\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run)]) == 0
    import json
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["train_aux"] > 0 and len(rec["moe"]) == 2
    assert "MoE layers: 2" in capsys.readouterr().out


def test_collect_aux_loss_says_when_bare_moe_layers_return_theirs():
    class Hand(nn.Module):  # the layer used directly, its aux loss taken from the call
        def __init__(self):
            super().__init__()
            self.moe = moesaic.MoE(D, 32, 4)

        def forward(self, x):
            return self.moe(x)[0]

    moesaic.moeify.__dict__["_warned"].clear()
    model = Hand()
    model(torch.randn(3, D))
    with pytest.warns(UserWarning, match=r"holds moesaic.MoE layers outside them: those return "
                                         r"their aux loss from each call"):
        assert moesaic.collect_aux_loss(model) == 0
    moeified = net([Mlp(D, 32)])
    moesaic.moeify_(moeified, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moesaic.collect_aux_loss(moeified)  # the MoE inside a MoEFeedForward: no warning


class ClampedGelu(nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x).clamp(max=6.5)


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.Hardtanh(0.0, 6.0), nn.LeakyReLU(1e-9),
                                 ClampedGelu()])
def test_look_alike_activations_are_not_upcycled_as_the_real_one(act):
    """Equal to relu or gelu on [-6, 6], not beyond: evaluated out to +-1e4, they are refused
    (the upcycled experts would not compute the MLP)."""
    mlp = Mlp(D, 32)
    mlp.act = act
    with pytest.raises(ValueError, match=r"0.mlp.act is .*which the experts do not compute"):
        moesaic.moeify_(net([mlp]), 4)
    gpt = GptMlp(D)
    gpt.gelu = act  # the only parameterless child: one of torch's activations, or not taken
    with pytest.raises(ValueError, match=r"0.mlp.gelu is .*which the experts do not compute"
                                         r"|holds gelu \(ClampedGelu\) besides c_fc"):
        moesaic.moeify_(net([gpt]), 4, names={"fc1": "c_fc", "fc2": "c_proj"})


def test_a_parameterless_child_that_is_no_activation_is_not_dropped():
    gpt = GptMlp(D)
    gpt.gelu = nn.LayerNorm(4 * D, elementwise_affine=False)
    with pytest.raises(ValueError, match=r"0.mlp \(GptMlp\) holds gelu \(LayerNorm\) besides"):
        moesaic.moeify_(net([gpt]), 4, names={"fc1": "c_fc", "fc2": "c_proj"}, upcycle=False,
                        activation="gelu")
    with pytest.raises(ValueError, match=r"has no module 'act_fn', which names= gives"):
        moesaic.moeify_(net([GptMlp(D)]), 4, names={"fc1": "c_fc", "fc2": "c_proj",
                                                     "act": "act_fn"})
    own = DenseMLP(D, 32, "relu")
    own.act = nn.Tanh()  # its string says relu; new experts may take it
    model = net([own])
    moesaic.moeify_(model, 4, upcycle=False)
    assert model[0].mlp.moe.config.activation == "relu"

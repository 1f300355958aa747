"""moeify_: a model written without MoE layers gets them in place of its MLP modules (upcycled),
keeps calling them as before, and hands their aux losses over through collect_aux_loss."""
import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as ckpt

import moesaic
from moesaic import DenseMLP, MoEFeedForward

D = 16


class Mlp(nn.Module):
    """timm's Mlp, in shape: fc1, act, drop, fc2."""

    def __init__(self, d, f, bias=True):
        super().__init__()
        self.fc1, self.act, self.drop = nn.Linear(d, f, bias=bias), nn.GELU(), nn.Dropout(0.0)
        self.fc2 = nn.Linear(f, d, bias=bias)

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
    assert isinstance(model[0].mlp, Mlp)
    moesaic.moeify_(model, 4)
    with pytest.raises(ValueError, match="no module of Sequential was selected"):
        moesaic.moeify_(model, 4)  # the MoE layers' own MLPs are never selected

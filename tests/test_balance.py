"""Auxiliary-loss-free balancing: the selection bias chooses experts but never weights them,
the update moves each bias by the rate toward balance, counts come from training forwards only
(not eval, not a checkpoint's recomputation), and the biases balance a skewed router.

Legend: T tokens, D model dim, E experts, K top-k.
"""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import moesaic
from moesaic import routing

D, FF, E = 8, 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes, hundreds of steps (conftest)


def _layer(**kw):
    torch.manual_seed(0)
    return moesaic.MoE(D, FF, E, top_k=2, bias_update_rate=0.05, **kw)


def test_bias_chooses_experts_and_probabilities_weight_them():
    logits = torch.randn(30, E, generator=torch.Generator().manual_seed(1), requires_grad=True)
    bias = torch.tensor([0.0, 0.0, 5.0, 5.0])  # experts 2 and 3 win every token
    plan, probs, counts = routing.token_choice(logits, 2, None, "position", False, bias)
    assert counts.tolist() == [0, 0, 30, 30]
    chosen = plan.dest_TK >= 0
    assert chosen.all()
    torch.testing.assert_close(plan.weight_TK.sort(1).values, probs[:, 2:].sort(1).values)
    plan.weight_TK.sum().backward()  # the weights carry the router's gradient, the bias none
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    unbiased, _, _ = routing.token_choice(logits, 2, None, "position", False, torch.zeros(E))
    same, _, _ = routing.token_choice(logits, 2, None, "position", False)
    assert torch.equal(unbiased.row_token_N, same.row_token_N)


def test_update_moves_each_bias_by_the_rate_toward_balance():
    layer = _layer()
    assert layer.router.expert_bias.tolist() == [0.0] * E
    layer.load_counts.copy_(torch.tensor([10, 2, 6, 6]))  # mean 6
    moesaic.update_expert_biases(layer)
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.05, 0.05, 0.0, 0.0]))
    assert layer.load_counts.tolist() == [0] * E
    assert "router.expert_bias" in layer.state_dict() and "load_counts" not in layer.state_dict()
    moesaic.update_expert_biases(torch.nn.Linear(2, 2))  # no such layer: nothing to do


def test_counts_come_from_training_forwards_only():
    layer = _layer()
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y, aux, stats = layer(x, return_stats=True)
    assert torch.equal(layer.load_counts, stats.tokens_per_expert)
    y, aux = checkpoint(layer, x, use_reentrant=False)
    y.sum().backward()  # the recomputation in the backward adds nothing
    assert torch.equal(layer.load_counts, 2 * stats.tokens_per_expert)
    layer.eval()(x)
    assert torch.equal(layer.load_counts, 2 * stats.tokens_per_expert)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_biases_balance_a_skewed_router_and_eval_uses_them(score_func):
    """A router that sends almost every token to expert 0: 300 bias steps (no balance loss, the
    router's weights fixed) bring every expert's load near the mean of 100, and eval routes
    with the learned biases too; with softmax and with sigmoid scores (DeepSeek-V3's)."""
    torch.manual_seed(0)
    layer = moesaic.MoE(D, FF, E, top_k=1, bias_update_rate=0.002, aux_loss_coef=0.0,
                        score_func=score_func)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        layer.router.weight[0] += 0.2  # expert 0's logit grows with x's sum
    x = torch.randn(400, D, generator=torch.Generator().manual_seed(3)).abs()
    busiest = []
    for _ in range(300):
        with torch.no_grad():
            busiest.append(int(layer(x, return_stats=True)[2].tokens_per_expert.max()))
        moesaic.update_expert_biases(layer)
    last = layer.eval()(x, return_stats=True)[2].tokens_per_expert
    assert busiest[0] > 350 and max(busiest[-20:]) < 130 and last.max() < 130, (
        busiest[0], busiest[-20:], last.tolist())


def test_score_priority_is_the_chosen_experts_probability():
    """drop_policy="score" ranks a token by its probability for the expert it chose: when the
    bias moves tokens to expert 1, expert 1 keeps the tokens it is most sure of."""
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    bias = torch.tensor([0.0, 1.0])  # every token chooses expert 1
    plan, probs, _ = routing.token_choice(logits, 1, 4, "score", False, bias)
    kept = plan.row_token_N
    assert plan.counts_E.tolist() == [0, 4]
    assert set(kept.tolist()) == set(probs[:, 1].topk(4).indices.tolist())


def test_checkpoints_without_the_bias_load_as_zero_bias():
    """A state dict from a model without balancing (an older checkpoint to fine-tune) loads
    into one with it, the bias zero; the reverse would drop learned biases: an error. A bf16
    bias loaded with assign=True is cast back to float32."""
    torch.manual_seed(0)
    plain = moesaic.MoE(D, FF, E, top_k=2)
    layer = _layer()
    layer.router.expert_bias.fill_(0.3)
    layer.load_state_dict(plain.state_dict())
    assert not layer.router.expert_bias.any()
    with pytest.raises(RuntimeError, match="Unexpected key.*router.expert_bias"):
        plain.load_state_dict(layer.state_dict())
    sd = {k: (v.bfloat16() if k == "router.expert_bias" else v)
          for k, v in layer.state_dict().items()}
    layer.load_state_dict(sd, assign=True)
    assert layer.router.expert_bias.dtype == torch.float32


@pytest.mark.parametrize("kw", [dict(router="expert_choice"), dict(bias_update_rate=-1.0)])
def test_bad_settings_name_the_field(kw):
    with pytest.raises(ValueError, match="bias_update_rate"):
        moesaic.MoE(D, FF, E, **{"bias_update_rate": 0.1, **kw})


def test_zoo_models_pass_it_through_and_checkpoints_keep_the_bias():
    import moesaic.models as M
    model = M.create("vit_moe_tiny", img_size=8, in_chans=1, patch_size=4, depth=2, d_model=16,
                     num_heads=2, num_experts=4, bias_update_rate=0.01)
    (moe,) = model.moe_layers()
    assert moe.config.bias_update_rate == 0.01
    model(torch.randn(3, 1, 8, 8))
    moesaic.update_expert_biases(model)
    assert moe.router.expert_bias.abs().sum() > 0
    twin = M.create("vit_moe_tiny", img_size=8, in_chans=1, patch_size=4, depth=2, d_model=16,
                    num_heads=2, num_experts=4, bias_update_rate=0.01)
    twin.load_state_dict(model.state_dict())
    assert torch.equal(twin.moe_layers()[0].router.expert_bias, moe.router.expert_bias)
    assert model.to(torch.bfloat16).moe_layers()[0].router.expert_bias.dtype == torch.float32

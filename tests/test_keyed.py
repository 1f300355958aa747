"""Randomness keyed by sample (moesaic.keyed): a batch split into parts, each forward under its
slice of the keys, gives the whole batch's outputs and gradients, every random layer on."""
import pytest
import torch
import torch.nn as nn

import moesaic
from moesaic import keyed
from moesaic.models import ViTMoE, WideNet

RANDOM = dict(drop_rate=0.2, attn_drop=0.1, drop_path=0.3, hidden_dropout=0.2)


def _vit(**kw):
    moesaic.moe_set_seed(0)
    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=5, depth=2, d_model=16,
                num_heads=2, mlp_ratio=2.0, num_experts=4, moe_every=2, top_k=2,
                drop_tokens=False, residual=True, **RANDOM)
    args.update(kw)
    return ViTMoE(**args).train()


def _run(model, x_BCHW, keys_B, parts):
    """Outputs and parameter gradients with the batch cut into ``parts`` slices."""
    model.zero_grad(set_to_none=True)
    outs = []
    for x, k in zip(x_BCHW.tensor_split(parts), keys_B.tensor_split(parts)):
        with keyed.sample_keys(k):
            logits, aux = model(x)
            (logits.square().sum() + 0 * aux).backward()
        outs.append(logits.detach())
    return torch.cat(outs), {n: p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


@pytest.mark.parametrize("noise", ["gaussian", "jitter", "logit_jitter"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_split_batch_equals_whole_batch(noise, checkpointing):
    model = _vit(noise_policy=noise).set_grad_checkpointing(checkpointing)
    x = torch.randn(6, 1, 8, 8)
    keys = keyed.draw_sample_keys(6, torch.Generator().manual_seed(1))
    whole, g_whole = _run(model, x, keys, 1)
    for parts in (2, 3):
        split, g_split = _run(model, x, keys, parts)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
        for n in g_whole:
            torch.testing.assert_close(g_split[n], g_whole[n], rtol=1e-4, atol=1e-6, msg=n)


def test_checkpointing_recomputes_the_same_masks():
    """Grad checkpointing (keyed draws replayed in the recomputation) changes no gradient."""
    model = _vit(noise_policy="gaussian")
    x = torch.randn(4, 1, 8, 8)
    keys = keyed.draw_sample_keys(4, torch.Generator().manual_seed(2))
    plain, g_plain = _run(model, x, keys, 1)
    ckpt, g_ckpt = _run(model.set_grad_checkpointing(True), x, keys, 1)
    torch.testing.assert_close(ckpt, plain)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], msg=n)


def test_widenet_shared_modules_draw_new_masks_per_block():
    """WideNet calls one attention and one MoE at every block: each call takes its own salt,
    and splitting the batch still changes nothing."""
    moesaic.moe_set_seed(0)
    model = WideNet(img_size=8, patch_size=4, in_chans=1, num_classes=5, depth=3, d_model=16,
                    num_heads=2, num_experts=4, drop_tokens=False, **RANDOM).train()
    x = torch.randn(4, 1, 8, 8)
    keys = keyed.draw_sample_keys(4, torch.Generator().manual_seed(3))
    whole, _ = _run(model, x, keys, 1)
    split, _ = _run(model, x, keys, 2)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_different_keys_give_different_masks_and_none_is_torch_dropout():
    model = _vit()
    x = torch.randn(4, 1, 8, 8)
    a, _ = _run(model, x, keyed.draw_sample_keys(4, torch.Generator().manual_seed(4)), 1)
    b, _ = _run(model, x, keyed.draw_sample_keys(4, torch.Generator().manual_seed(5)), 1)
    assert not torch.allclose(a, b)
    with torch.no_grad():  # outside sample_keys: torch's generator, as before
        torch.manual_seed(0)
        c = model(x)[0]
        torch.manual_seed(0)
        assert torch.equal(model(x)[0], c)


def test_keyed_dropout_rate_scale_and_gradient():
    x = torch.ones(64, 1000, requires_grad=True)
    with keyed.sample_keys(keyed.draw_sample_keys(8, torch.Generator().manual_seed(6))):
        y = keyed.dropout(x, 0.25)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, torch.where(kept, 2 / 0.75, 0.0))


def test_keyed_uniform_and_normal_moments():
    keys = keyed.draw_sample_keys(512, torch.Generator().manual_seed(7))
    u = keyed.uniform(keys, 256)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    z = keyed.normal(keys, 256)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert torch.isfinite(z).all()


def test_recomputation_without_the_contexts_raises():
    """torch's checkpoint without context_fn would draw other masks in the backward: refused."""
    drop = keyed.Dropout(0.5).train()
    x = torch.randn(4, 8, requires_grad=True)
    with keyed.sample_keys(keyed.draw_sample_keys(4, torch.Generator().manual_seed(8))):
        y = torch.utils.checkpoint.checkpoint(lambda t: drop(t * 2), x, use_reentrant=False)
        with pytest.raises(RuntimeError, match="context_fn=moesaic.keyed.checkpoint_contexts"):
            y.sum().backward()


def test_rows_that_are_not_a_multiple_of_the_batch_are_refused():
    drop = keyed.Dropout(0.5).train()
    with keyed.sample_keys(torch.zeros(3, dtype=torch.int32)):
        with pytest.raises(ValueError, match="holds 3 sample keys but a random layer got a "
                                             "tensor of 4 rows"):
            drop(torch.ones(4, 2))
    with pytest.raises(TypeError, match="1-D int32 tensor"):
        with keyed.sample_keys(torch.zeros(3)):
            pass


def test_dropout_is_still_nn_dropout():
    """State dicts and repr unchanged: the zoo's dropouts are nn.Dropout subclasses."""
    model = _vit()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(isinstance(m, keyed.Dropout) for m in drops)
    assert "Dropout(p=0.2, inplace=False)" in repr(model)

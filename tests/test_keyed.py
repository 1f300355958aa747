"""Randomness keyed by sample (moesaic.keyed): a batch split into parts, each forward under its
slice of the keys, gives the whole batch's outputs and gradients, every random layer on."""
import threading

import pytest
import torch
import torch.nn as nn

import moesaic
from moesaic import keyed
from moesaic.models import ViTMoE, WideNet
from moesaic.models.layers import DropPath

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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_widenet_shared_modules_draw_new_masks_per_block(checkpointing):
    """WideNet calls one attention and one MoE at every block: each call takes its own salt,
    and splitting the batch still changes no output or gradient."""
    moesaic.moe_set_seed(0)
    model = WideNet(img_size=8, patch_size=4, in_chans=1, num_classes=5, depth=3, d_model=16,
                    num_heads=2, num_experts=4, drop_tokens=False, **RANDOM).train()
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(4, 1, 8, 8)
    keys = keyed.draw_sample_keys(4, torch.Generator().manual_seed(3))
    whole, g_whole = _run(model, x, keys, 1)
    split, g_split = _run(model, x, keys, 2)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    for n in g_whole:
        torch.testing.assert_close(g_split[n], g_whole[n], rtol=1e-4, atol=1e-6, msg=n)


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


def _checkpointed_drop_path(x, context_fn):
    drop = DropPath(0.5).train()
    kw = {} if context_fn is None else {"context_fn": context_fn}
    return torch.utils.checkpoint.checkpoint(lambda t: drop(t * 2), x, use_reentrant=False, **kw)


def _backward_on_a_thread(y):
    """y.sum().backward() on another thread, as CUDA runs backwards (on autograd's threads,
    which do not see the forward thread's sample_keys); returns what it raised, or None."""
    raised = []

    def run():
        try:
            y.sum().backward()
        except RuntimeError as e:
            raised.append(e)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return raised[0] if raised else None


def test_recomputation_without_the_contexts_raises_on_any_thread():
    """torch's checkpoint without context_fn would draw other masks in the backward: refused,
    also when the backward runs on another thread."""
    keys = keyed.draw_sample_keys(4, torch.Generator().manual_seed(8))
    x = torch.randn(4, 8, requires_grad=True)
    with keyed.sample_keys(keys):
        y = _checkpointed_drop_path(x, None)
        with pytest.raises(RuntimeError, match="context_fn=moesaic.keyed.checkpoint_contexts"):
            y.sum().backward()
        y = _checkpointed_drop_path(x, None)
        err = _backward_on_a_thread(y)
    assert err is not None and "checkpoint_contexts" in str(err)


def test_replay_on_another_thread_and_in_a_second_backward():
    """With checkpoint_contexts the recomputation replays the forward's draws on autograd's
    thread, and again in a second backward through the same graph (retain_graph): the
    gradient is the forward's own mask (y != 0 where kept) times 2 / (1 - p)."""
    keys = keyed.draw_sample_keys(4, torch.Generator().manual_seed(9))
    x = torch.randn(4, 8, requires_grad=True)
    with keyed.sample_keys(keys):
        y = _checkpointed_drop_path(x, keyed.checkpoint_contexts)
        expected = (y.detach() != 0).float() * 2 / 0.5
        assert 0 < expected.count_nonzero() < 32
        assert _backward_on_a_thread(y) is None
        assert torch.equal(x.grad, expected)
        x.grad = None
        y = _checkpointed_drop_path(x, keyed.checkpoint_contexts)
        expected = (y.detach() != 0).float() * 2 / 0.5
        y.sum().backward(retain_graph=True)
        y.sum().backward()
    assert torch.equal(x.grad, 2 * expected)


def test_layers_built_with_kernels_torch_keep_triton_out_of_their_dropout():
    for extra in ({"residual": True}, {"num_shared_experts": 1}):
        layer = moesaic.MoE(8, 16, 4, dropout=0.1, hidden_dropout=0.1, kernels="torch", **extra)
        drops = [m for m in layer.modules() if isinstance(m, keyed.Dropout)]
        assert len(drops) == 2 and all(m.kernels == "torch" for m in drops)
    for name in ("vit_moe_lite6_prmoe", "widenet_cifar", "vit_lite6"):
        model = moesaic.models.create(name, drop_rate=0.1, kernels="torch")
        drops = [m for m in model.modules() if isinstance(m, keyed.Dropout)]
        assert len(drops) >= 3 and all(m.kernels == "torch" for m in drops), name


def test_rows_that_are_not_a_multiple_of_the_batch_are_refused():
    drop = keyed.Dropout(0.5).train()
    with keyed.sample_keys(torch.zeros(3, dtype=torch.int32)):
        with pytest.raises(ValueError, match="holds 3 sample keys but a random layer got a "
                                             "tensor of 4 rows"):
            drop(torch.ones(4, 2))
    for bad in (torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.zeros(2, 3,
                                                                          dtype=torch.int32)):
        with pytest.raises(TypeError, match="1-D integer tensor"):
            with keyed.sample_keys(bad):
                pass


def test_masked_rows_draw_the_padded_batch_keys_of_the_real_rows():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    keys = torch.tensor([5, -3, 11], dtype=torch.int32)
    with keyed.sample_keys(keys):
        padded = [keyed.row_keys(12, None), keyed.row_keys(3, None)]
    with keyed.sample_keys(keys):
        with keyed.masked_rows(mask):
            real = keyed.row_keys(4, None)
        assert keyed.row_keys(3, None).equal(padded[1])  # the batch-first rule again after it
    assert real.equal(padded[0][mask.reshape(-1)])
    with keyed.sample_keys(keys[:1]), keyed.masked_rows(torch.ones(1, 1, dtype=torch.bool)):
        one = keyed.row_keys(1, None)
    with keyed.sample_keys(keys[:1]):
        assert one.equal(keyed.row_keys(1, None))


def test_masked_layer_split_by_sample_equals_the_whole_batch():
    """The padded-batch recipe (the layer on x[mask]) under masked_rows: per-sample forwards
    and gradients equal the whole batch's, noise and hidden dropout on, checkpointed too."""
    moesaic.moe_set_seed(0)
    layer = moesaic.MoE(8, 16, 4, top_k=2, drop_tokens=False, noise_policy="gaussian",
                        hidden_dropout=0.3).train()
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    keys = torch.tensor([7, 9, 4], dtype=torch.int32)

    def run(b, checkpointed=False):
        layer.zero_grad(set_to_none=True)
        with keyed.sample_keys(keys[b]), keyed.masked_rows(mask[b]):
            rows = x[b][mask[b]]
            if checkpointed:
                y = torch.utils.checkpoint.checkpoint(
                    lambda r: layer(r)[0], rows, use_reentrant=False,
                    context_fn=keyed.checkpoint_contexts)
            else:
                y = layer(rows)[0]
            (y * torch.arange(1.0, 9.0)).sum().backward()
        return y.detach(), layer.experts.w1.grad.clone()

    whole, g_whole = run(slice(0, 3))
    parts = [run(slice(i, i + 1)) for i in range(3)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sum(p[1] for p in parts), g_whole, rtol=1e-5, atol=1e-6)
    again, g_again = run(slice(0, 3), checkpointed=True)
    torch.testing.assert_close(again, whole, rtol=0, atol=0)
    torch.testing.assert_close(g_again, g_whole, rtol=1e-6, atol=1e-7)


def test_masked_rows_refuses_what_it_cannot_key():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="open sample_keys"):
        with keyed.masked_rows(mask):
            pass
    with keyed.sample_keys(torch.zeros(2, dtype=torch.int32)):
        for bad in (torch.ones(3, 3, dtype=torch.bool), torch.ones(2, 3)):
            with pytest.raises(ValueError, match=r"bool mask whose first dim is the batch \(2"):
                with keyed.masked_rows(bad):
                    pass
        with keyed.masked_rows(mask):
            with pytest.raises(ValueError, match="masked_rows holds 6 real rows but a random "
                                                 "layer got a tensor of 4 rows"):
                keyed.Dropout(0.5).train()(torch.ones(4, 2))


def test_int64_keys_draw_as_their_int32_values():
    """Dataset indices are int64: a key in int32's range draws what the int32 key draws; keys
    beyond it are folded key by key (one key's masks do not depend on the others)."""
    drop = keyed.Dropout(0.5).train()
    x = torch.ones(4, 64)
    small = torch.tensor([0, -1, 2**31 - 1, -2**31], dtype=torch.int64)
    big = torch.tensor([2**40 + 3, -2**40, 2**33, 7], dtype=torch.int64)
    with keyed.sample_keys(small.to(torch.int32)):
        want = drop(x)
    with keyed.sample_keys(small):
        assert torch.equal(drop(x), want)
    with keyed.sample_keys(big):
        whole = drop(x)
    with keyed.sample_keys(big[2:]):
        assert torch.equal(drop(x[2:]), whole[2:])
    assert not torch.equal(whole[0], whole[1])
    with keyed.sample_keys(torch.tensor([3, 5], dtype=torch.uint8)):
        a = drop(x[:2])
    with keyed.sample_keys(torch.tensor([3, 5], dtype=torch.int32)):
        assert torch.equal(drop(x[:2]), a)


def test_dropout_is_still_nn_dropout():
    """State dicts and repr unchanged: the zoo's dropouts are nn.Dropout subclasses."""
    model = _vit()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(isinstance(m, keyed.Dropout) for m in drops)
    assert "Dropout(p=0.2, inplace=False)" in repr(model)


def test_key_dropouts_makes_a_plain_model_split_invariant(monkeypatch):
    """A model written with plain nn.Dropout (shared and nested ones too) is keyed by
    key_dropouts_: the split batch then equals the whole, its state dict unchanged; the
    trainer applies it to registered models."""
    shared = nn.Dropout(0.5)
    net = nn.Sequential(nn.Linear(6, 32), nn.Dropout(0.3), nn.Sequential(nn.ReLU(), shared),
                        shared, nn.Dropout1d(0.0), nn.Linear(32, 3)).train()
    state = net.state_dict()
    assert keyed.key_dropouts_(net) == ["1", "2.1", "3"]
    assert net.state_dict().keys() == state.keys() and keyed.key_dropouts_(net) == []
    assert type(net[4]) is nn.Dropout1d and net[1].p == 0.3 and net[3].p == 0.5
    x, keys = torch.randn(6, 6), torch.arange(6, dtype=torch.int32)
    with keyed.sample_keys(keys):
        whole = net(x)
    parts = []
    for xs, ks in zip(x.tensor_split(3), keys.tensor_split(3)):
        with keyed.sample_keys(ks):
            parts.append(net(xs))
    # a mask that differs changes outputs by O(1); matmuls of 2 and 6 rows may round apart
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)

    from moesaic.models import registry
    from moesaic.train.config import TrainConfig
    from moesaic.train.setup import build_model
    for table in ("_REGISTRY", "_SUMMARY"):  # the test's model leaves with the test
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))

    @moesaic.models.register("test_plain_dropout_net")
    def plain(img_size, in_chans, num_classes, aux_loss_coef):
        return moesaic.WithAuxLoss(nn.Sequential(nn.Flatten(), nn.Dropout(0.2),
                                                 nn.Linear(in_chans * img_size ** 2,
                                                           num_classes)))

    model = build_model(TrainConfig(model="test_plain_dropout_net", model_args={}), (1, 4, 4), 3)
    assert [type(m) for m in model.modules() if isinstance(m, nn.Dropout)] == [keyed.Dropout]

    seq_first = nn.Sequential(nn.Dropout(0.5)).train()  # [S, B, D] with S not a multiple of B
    keyed.key_dropouts_(seq_first)
    with keyed.sample_keys(torch.arange(4, dtype=torch.int32)) as stream:
        with pytest.warns(UserWarning, match="7 rows under 4 sample keys .*torch's generator"):
            assert seq_first(torch.ones(7, 4, 3)).shape == (7, 4, 3)
        assert stream.salt == 1  # the salt it would have taken: later sites keep theirs
    with keyed.sample_keys(torch.arange(4, dtype=torch.int32)):
        with pytest.raises(ValueError, match="holds 4 sample keys"):
            keyed.Dropout(0.5).train()(torch.ones(7, 4, 3))  # the zoo's stay strict

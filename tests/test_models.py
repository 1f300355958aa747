"""Model zoo: every preset builds, runs forward and backward, gives every parameter a gradient;
ViT-Lite parameter counts match the Compact Transformers paper; WideNet shares its weights;
summaries, FLOP counts and config errors; expert parallelism gives single-process logits;
the MoEStack test model."""
import math
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moesaic
import moesaic.models as M
from moesaic.models.layers import Attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_PARAMS = {"vit_lite6": 3.19e6, "vit_lite7": 3.72e6}  # Hassani et al. 2021, Table 1
# Small shapes for speed: 16x16 images (17 tokens); ImageNet WideNet keeps its full width but
# sees 32x32 images (5 tokens) through 2 blocks.
SMALL = {"widenet_imagenet": dict(img_size=32, depth=2)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest)


def _images(model, batch):
    c = model.config
    return torch.randn(batch, c.in_chans, c.img_size, c.img_size)


@pytest.mark.parametrize("name", M.list_models())
def test_forward_backward_every_parameter_gets_gradient(name):
    torch.manual_seed(0)
    model = M.create(name, drop_tokens=False, **SMALL.get(name, dict(img_size=16)))
    model.train()
    logits, aux = model(_images(model, 8))
    assert logits.shape == (8, model.config.num_classes)
    assert aux.shape == () and torch.isfinite(aux)
    assert (aux > 0) == bool(model.moe_layers())
    (logits.square().mean() + aux).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


def test_digits_shape_override():
    model = M.create("vit_moe_tiny", img_size=8, in_chans=1, patch_size=2, num_classes=10)
    logits, aux = model(torch.randn(5, 1, 8, 8))
    assert logits.shape == (5, 10) and aux.dim() == 0
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.randn(5, 3, 8, 8))


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_vit_lite_parameter_count_matches_paper(name):
    total, active = M.count_parameters(M.create(name))
    assert abs(total - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02
    assert active == total


def test_moe_parameter_counts():
    dense, _ = M.count_parameters(M.create("vit_lite6"))
    total, active = M.count_parameters(M.create("vit_moe_lite6"))
    mlp = 2 * 256 * 512 + 512 + 256
    router = 8 * 256
    assert total == dense + 3 * (7 * mlp + router)
    assert active == dense + 3 * router
    assert total >= 2 * dense
    total, active = M.count_parameters(M.create("vit_moe_lite6_prmoe"))
    residual = mlp + 256 * 2 + 2  # PR-MoE dense branch and its mixing coefficients
    assert total == dense + (3 + 3 + 7) * mlp + (4 + 4 + 8) * 256 + 3 * residual
    assert active == dense + (4 + 4 + 8) * 256 + 3 * residual
    total, active = M.count_parameters(M.create("vit_moe_lite6", num_shared_experts=2))
    shared = 2 * 256 * 1024 + 1024 + 256  # width 2 * d_ff, always active
    assert total == dense + 3 * (7 * mlp + router + shared)
    assert active == dense + 3 * (router + shared)


def test_prmoe_pyramid_layout():
    model = M.create("vit_moe_lite6_prmoe")
    layers = model.moe_layers()
    assert [m.config.num_experts for m in layers] == [4, 4, 8]
    assert [i for i, b in enumerate(model.blocks) if b.is_moe] == [1, 3, 5]
    assert all(m.residual is not None and m.config.top_k == 1 and
               m.config.noise_policy == "jitter" for m in layers)


def test_widenet_shares_attention_and_moe_with_per_block_norms():
    model = M.create("widenet_cifar")
    depth = model.config.depth
    assert len([m for m in model.modules() if isinstance(m, Attention)]) == 1
    assert len(model.moe_layers()) == 1
    moe = model.moe_layers()[0]
    assert moe.config.top_k == 2 and moe.config.noise_policy == "gaussian"
    norms = list(model.norms1) + list(model.norms2)
    assert len(norms) == 2 * depth and len({id(n) for n in norms}) == 2 * depth
    # Every tensor appears under exactly one name (safe for safetensors) ...
    sd = model.state_dict()
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)
    # ... and the shared modules are used by every block: their gradient sums over blocks.
    torch.manual_seed(0)
    x = _images(model, 2)
    model.eval()
    logits, _, returned = model(x, return_stats=True)
    assert len(returned) == depth and len(M.routing_stats(model)) == depth
    assert returned[-1] is model.moe.last_stats and returned[0] is not returned[-1]
    logits.sum().backward()
    grads = [n.weight.grad for n in norms]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    attn_params = sum(p.numel() for p in model.attn.parameters())
    D = model.config.d_model
    assert attn_params == 3 * D * D + D * D + D


def test_routing_stats_and_describe():
    model = M.create("vit_moe_lite6_prmoe")
    assert M.routing_stats(model) == []
    logits, aux, returned = model(torch.randn(2, 3, 32, 32), return_stats=True)
    stats = M.routing_stats(model)
    assert [s.as_dict() for s in returned] == stats
    assert len(stats) == 3
    assert [len(s["tokens_per_expert"]) for s in stats] == [4, 4, 8]
    assert all(sum(s["tokens_per_expert"]) == 2 * 65 for s in stats)
    text = M.describe(model)
    for piece in ("vit_moe_lite6_prmoe", "depth 6", "d_model 256", "dense, 4, dense, 4, dense, 8",
                  "total 7.40M", "active per token 3.98M"):
        assert piece in text, (piece, text)


def test_dense_flops_match_flop_counter():
    model = M.create("vit_lite6").eval()
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(1, 3, 32, 32))
    # The counter skips CPU scaled-dot-product attention: add its two S x S x D products.
    S, D = 65, 256
    counted = fc.get_total_flops() + 6 * 4 * S * S * D
    assert abs(model.flops_per_image() - counted) / counted < 0.001


def test_widenet_imagenet_is_widenet_b_shaped():
    model = M.create("widenet_imagenet")
    c = model.config
    assert (c.img_size, c.patch_size, c.depth, c.d_model, c.num_heads, c.d_ff) == \
        (224, 16, 12, 768, 12, 4096)
    assert model.moe_layers()[0].config.num_experts == 4
    total, active = M.count_parameters(model)
    assert abs(total - 29e6) < 0.5e6 and active < total  # Xue et al. 2022, Table 1: 29M


def test_moe_flops_equal_dense_at_top1_plus_router():
    dense = M.create("vit_lite6").flops_per_image()
    moe = M.create("vit_moe_lite6").flops_per_image()
    assert moe == dense + 3 * 2 * 65 * 256 * 8
    shared = M.create("vit_moe_lite6", num_shared_experts=2).flops_per_image()
    assert shared == moe + 3 * 2 * (4 * 65 * 256 * 512)
    gated = M.create("vit_moe_lite6", activation="swiglu").flops_per_image()
    assert gated == moe + 3 * (2 * 65 * 256 * 512)  # a third product per expert


def test_experts_keep_their_own_init():
    model = M.create("vit_moe_lite6")
    w1 = model.moe_layers()[0].experts.w1
    bound = 1 / math.sqrt(256)
    assert w1.abs().max() <= bound
    assert abs(w1.std().item() - bound / math.sqrt(3)) < 0.002
    assert abs(model.blocks[0].ffn.fc1.weight.std().item() - 0.02) < 0.002


def test_same_seed_same_model_and_eval_is_deterministic():
    torch.manual_seed(3)
    a = M.create("vit_moe_lite6_prmoe").eval()
    torch.manual_seed(3)
    b = M.create("vit_moe_lite6_prmoe").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x)[0], b(x)[0])
    assert torch.equal(a(x)[0], a(x)[0])


@pytest.mark.parametrize("name,kw", [
    ("vit_moe_lite6_prmoe", dict(noise_policy="jitter")),
    ("widenet_cifar", dict(noise_policy="gaussian")),
])
def test_grad_checkpointing_gives_the_same_gradients(name, kw):
    """Recomputing each block (router noise, dropout, drop path, capacity drops all on) yields the
    stored-activation gradients and the same routing statistics."""
    torch.manual_seed(0)
    model = M.create(name, img_size=16, drop_rate=0.1, drop_path=0.1, capacity_factor=0.8,
                     **kw).train()
    images = _images(model, 6)

    def run(enable):
        model.set_grad_checkpointing(enable).zero_grad()
        torch.manual_seed(3)
        logits, aux, stats = model(images, return_stats=True)
        (logits.square().mean() + aux).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return logits, [s.as_dict() for s in stats], grads

    ref, ckpt = run(False), run(True)
    torch.testing.assert_close(ckpt[0], ref[0])
    assert ckpt[1] == ref[1] and any(s["dropped_fraction"] > 0 for s in ref[1])
    # the backward's recomputation leaves last_stats as the forward set them (the last call's)
    assert model.moe_layers()[-1].last_stats.as_dict() == ref[1][-1]
    for n, g in ref[2].items():
        torch.testing.assert_close(ckpt[2][n], g, msg=n)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(images)[0], model.set_grad_checkpointing(False)(images)[0])


@pytest.mark.parametrize("name", ["vit_moe_lite6_prmoe", "widenet_cifar", "vit_lite6"])
def test_meta_build_then_reset_parameters_gives_the_eager_model(name):
    import moesaic
    moesaic.moe_set_seed(4)
    eager = M.create(name, img_size=16)
    moesaic.moe_set_seed(4)
    with torch.device("meta"):
        model = M.create(name, img_size=16)
    model.to_empty(device="cpu")
    torch.manual_seed(4)
    model.reset_parameters()
    ref = eager.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_titans_details_for_the_published_recipe():
    """The 90.66% run's model (Titans' ViTMoE): mean pooling into a zero head, LayerNorm eps
    1e-6, truncated-normal routers, dropout on each PR-MoE branch; the recipe config sets
    them."""
    from moesaic.train.config import load_file
    cfg = load_file(os.path.join(ROOT, "configs", "cifar10_vit_moe_lite6_prmoe.py"))
    torch.manual_seed(0)
    model = M.create(cfg.model, img_size=16, **cfg.model_args)
    assert model.config.pool == "mean" and not model.head.weight.any()
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert all(m.config.dropout_branches and m.config.dropout == 0.1 for m in model.moe_layers())
    std = torch.cat([m.router.weight.flatten() for m in model.moe_layers()]).std().item()
    assert std == pytest.approx((0.1 / 256) ** 0.5, rel=0.1)
    model.head.weight.data.normal_()
    seen = {}
    model.norm.register_forward_hook(lambda m, i, o: seen.update(out=o))
    logits, _ = model.eval()(_images(model, 2))
    torch.testing.assert_close(logits, model.head(seen["out"].mean(dim=1)))
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean', got 'max'"):
        M.create("vit_moe_tiny", pool="max")


@pytest.mark.parametrize("name,kw", [("vit_moe_tiny", {}), ("widenet_cifar", dict(pool="mean", depth=2))])
def test_timm_feature_and_head_split_and_reset_classifier(name, kw):
    """forward == forward_head(forward_features); pre_logits gives the pooled features;
    reset_classifier makes a new head (zero with zero_head) that trains (after a one-process
    parallelize too: nothing syncs gradients; refused while ranks do, in test_parallel)."""
    import moesaic
    torch.manual_seed(0)
    model = M.create(name, img_size=16, **kw).eval()
    x = _images(model, 3)
    logits, aux, stats = model(x, return_stats=True)
    feats, aux2, stats2 = model.forward_features(x, return_stats=True)
    assert feats.shape == (3, model.config.num_patches + 1, model.config.d_model)
    torch.testing.assert_close(model.forward_head(feats), logits)
    torch.testing.assert_close(aux2, aux)
    assert len(stats2) == len(stats)
    pooled = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(model.get_classifier()(pooled), logits)
    model.reset_classifier(37)
    assert model.head.out_features == 37 and model.config.num_classes == 37
    assert model.head.bias.abs().sum() == 0 and model.head.weight.std() < 0.03
    logits, aux = model.train()(x)
    assert logits.shape == (3, 37)
    logits.sum().backward()
    assert model.head.weight.grad is not None
    zero = M.create(name, img_size=16, zero_head=True, **kw)
    zero.reset_classifier(5)
    assert not zero.head.weight.any()
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        zero.reset_classifier(0)
    moesaic.parallelize(zero)
    zero.reset_classifier(3)
    assert zero(_images(zero, 2))[0].shape == (2, 3)


def test_numpy_numbers_in_model_configs():
    import numpy as np
    vit = M.create("vit_moe_tiny", depth=np.int64(4), num_experts=[np.int64(4), np.int64(2)],
                   norm_eps=np.float32(1e-6))
    assert vit.config.num_experts == [4, 2] and type(vit.config.num_experts[0]) is int
    assert vit.config.norm_eps == 1e-6 and type(vit.config.depth) is int
    assert M.create("widenet_cifar", num_experts=np.int64(2), depth=2).config.num_experts == 2


def test_docs_models_table_matches_the_presets():
    """docs/models.md's parameter counts are what `moesaic models NAME` computes."""
    import re
    text = open(os.path.join(ROOT, "docs", "models.md")).read()
    rows = re.findall(r"^\| `(\w+)` \|.*\| ([\d,]+) / ([\d,]+|same) \|", text, re.M)
    assert {r[0] for r in rows} == set(M.list_models()) - {"test_custom_vit", "my_vit"}
    for name, total, active in rows:
        got = M.count_parameters(M.create(name))
        want_total = int(total.replace(",", ""))
        want_active = want_total if active == "same" else int(active.replace(",", ""))
        assert got == (want_total, want_active), name


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="did you mean 'vit_moe_lite6'"):
        M.create("vit_moe_lite_6")
    with pytest.raises(ValueError, match=r"img_size \(30\) is not divisible by patch_size \(4\)"):
        M.create("vit_lite6", img_size=30)
    with pytest.raises(ValueError, match="num_experts has 2 entries but the model has 3 MoE blocks"):
        M.create("vit_moe_lite6", num_experts=[4, 8])
    with pytest.raises(ValueError, match="did you mean 'num_heads'"):
        M.create("vit_lite6", num_head=8)
    with pytest.raises(ValueError, match=r"top_k \(9\) exceeds the 8 experts of block 1 "):
        M.create("vit_moe_lite6", top_k=9)
    with pytest.raises(ValueError, match=r"top_k \(3\) exceeds the 2 experts of block 3 "
                                         r"\(num_experts \[4, 2, 8\]\)"):
        M.create("vit_moe_lite6_prmoe", num_experts=[4, 2, 8], top_k=3)
    with pytest.raises(ValueError, match="top_k must be a positive int, got 0"):
        M.create("vit_moe_lite6", top_k=0)
    M.create("vit_lite6", top_k=4)  # dense: no expert count to exceed


def test_register_custom_model():
    @M.register("test_custom_vit")
    def _custom(**kw):
        return M.ViTMoE(depth=2, d_model=32, num_heads=2, num_experts=2, **kw)
    assert "test_custom_vit" in M.list_models()
    model = M.create("test_custom_vit", num_classes=3)
    assert model.name == "test_custom_vit" and model(torch.randn(1, 3, 32, 32))[0].shape == (1, 3)
    with pytest.raises(ValueError, match="already registered"):
        M.register("test_custom_vit")(_custom)


def _ep_worker(rank, world, x_half_per_rank):
    """One rank: build the PR-MoE ViT under expert parallelism, run its half of the batch."""
    import moesaic
    import moesaic.models as zoo

    moesaic.init_distributed(max_ep_size=world, timeout_s=60)
    try:
        out = {}
        for key, kw in (("capacity", {}), ("dropless", {"drop_tokens": False})):
            torch.manual_seed(0)
            model = zoo.create("vit_moe_lite6_prmoe", img_size=16, **kw)
            moesaic.parallelize(model)
            model.eval()
            with torch.no_grad():
                logits, aux = model(x_half_per_rank[rank])
            out[key] = (logits, aux, [m.layout.ep_size for m in model.moe_layers()],
                        zoo.count_parameters(model))
        return out
    finally:
        moesaic.destroy()


def test_expert_parallel_logits_equal_single_process():
    from _dist_harness import run_ranks

    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    halves = [x[:2], x[2:]]
    results = run_ranks(_ep_worker, 2, halves, timeout=120)
    for key, kw in (("capacity", {}), ("dropless", {"drop_tokens": False})):
        torch.manual_seed(0)
        ref = M.create("vit_moe_lite6_prmoe", img_size=16, **kw).eval()
        for rank, half in enumerate(halves):
            logits, aux, ep_sizes, counts = results[rank][key]
            assert ep_sizes == [2, 2, 2]
            assert counts == M.count_parameters(ref)
            with torch.no_grad():
                want, want_aux = ref(half)
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(aux, want_aux, rtol=1e-5, atol=1e-6)


def test_moe_stack_pyramid_caps_top_k_and_sums_aux_losses():
    model = M.MoEStack(8, 16, experts=(1, 4), top_k=2, aux_loss_coef=0.5)
    assert [m.config.top_k for m in model.moes] == [1, 2]
    assert [m.config.num_experts for m in model.moes] == [1, 4]
    x = torch.randn(3, 5, 8, requires_grad=True)
    y, aux = model(x)
    assert y.shape == x.shape
    expected = sum(m.config.aux_loss_coef * m.last_stats.balance_loss for m in model.moes)
    torch.testing.assert_close(aux, expected)
    (y.sum() + aux).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_expert_choice_counts_capacity_factor_experts_per_token():
    ec = M.create("vit_moe_lite6", router="expert_choice", capacity_factor=2.0)
    top2 = M.create("vit_moe_lite6", top_k=2)
    assert M.count_parameters(ec) == M.count_parameters(top2)
    assert ec.flops_per_image() == top2.flops_per_image()


def _widenet_ep_worker(rank, world, x, target):
    """One rank: the shared-weight WideNet (one MoE called by every block) under expert
    parallelism, 2 SGD steps with clipping on its half of the batch; returns the full state."""
    import moesaic
    import moesaic.models as zoo

    moesaic.init_distributed(max_ep_size=world, timeout_s=60)
    try:
        moesaic.moe_set_seed(0)
        model = moesaic.parallelize(zoo.create("widenet_cifar", **WIDENET_TINY))
        assert model.moe.layout.ep_size == world
        _widenet_steps(model, x[rank::world], target[rank::world], moesaic.clip_grad_norm_)
        return moesaic.full_state_dict(model, all_ranks=True)
    finally:
        moesaic.destroy()


# no balance loss: each rank's is over its own tokens (as in data parallelism), so it is not the
# one-process loss of the whole batch (tests/_dist_workers.check_aux_loss covers it)
WIDENET_TINY = dict(img_size=16, depth=3, d_model=32, num_heads=2, noise_policy=None,
                    drop_tokens=False, aux_loss_coef=0.0)


def _widenet_steps(model, x, target, clip):
    # SGD: Adam's first step turns float noise in near-zero gradients into full-size updates
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        logits, aux = model(x)
        (torch.nn.functional.cross_entropy(logits, target) + aux).backward()
        clip(model, 0.5)
        opt.step()
        opt.zero_grad()


def test_widenet_shared_moe_trains_the_same_under_expert_parallelism():
    import moesaic
    from _dist_harness import run_ranks

    g = torch.Generator().manual_seed(2)
    x, target = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    states = run_ranks(_widenet_ep_worker, 2, x, target, timeout=120)
    moesaic.moe_set_seed(0)
    ref = M.create("widenet_cifar", **WIDENET_TINY)
    # one process on the whole batch, rows in the ranks' order (rank r holds x[r::2])
    order = torch.tensor([0, 2, 1, 3])
    _widenet_steps(ref, x[order], target[order],
                   lambda m, c: torch.nn.utils.clip_grad_norm_(m.parameters(), c))
    for state in states:
        assert state.keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_group_limit_and_sequence_balance_reach_every_moe_layer():
    """DeepSeek-V3's group limit and sequence-wise balance loss pass through the zoo's
    ``moe_kwargs``; each image is one sequence."""
    model = M.create("vit_moe_tiny", num_experts=4, top_k=2, num_groups=2, topk_groups=1,
                     balance_scope="sequence")
    layers = [m for m in model.modules() if isinstance(m, moesaic.MoE)]
    assert layers and all(m.config.group_limit() == (2, 1) for m in layers)
    assert all(m.config.balance_scope == "sequence" for m in layers)
    logits, aux, stats = model(torch.randn(3, 3, 32, 32), return_stats=True)
    assert logits.shape[0] == 3 and torch.isfinite(aux)


def test_zoo_and_trainer_are_attributes_of_the_package():
    """``import moesaic`` then ``moesaic.models.create``, as models.md writes it; the zoo and
    the trainer load on first use."""
    import subprocess
    import sys
    code = ("import sys, moesaic\n"
            "assert 'moesaic.train' not in sys.modules\n"
            "print(type(moesaic.models.create('vit_moe_tiny')).__name__, "
            "moesaic.train.Trainer.__name__)\n"
            "try:\n    moesaic.nope\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["ViTMoE Trainer", "module 'moesaic' has no attribute "
                                                          "'nope'"]

"""Rank functions for the expert-parallel tests (run by tests/_dist_harness.run_ranks).

Each compares a model run on the ranks, every rank on its slice of the batch, with the same
model run in one process (no parallel context) on the concatenated batch.

Legend: W world size, B sequences per rank, S sequence length, D model dim.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch
import torch.distributed as dist

import moesaic
from moesaic.models import MoEStack
from moesaic.parallel import comm_stats
from moesaic.parallel.layout import set_context
from moesaic.train.dist import grad_scaler

D, F, B, S = 8, 16, 2, 6
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_net(experts=(4, 2), top_k=2, drop_tokens=False, capacity_factor=1.25, aux_loss_coef=0.0,
             **moe_kwargs):
    """Linear -> a stack of residual MoE layers -> Linear, at the test's tiny sizes."""
    return MoEStack(D, F, experts, top_k=top_k, drop_tokens=drop_tokens,
                    capacity_factor=capacity_factor, min_capacity=0, aux_loss_coef=aux_loss_coef,
                    **moe_kwargs)


def _data(world, seed=123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(world * B, S, D, generator=g), torch.randn(world * B, S, D, generator=g)


def _build_pair(ctx, seed, dedup_tokens=False, **kw):
    """(single-process reference, model built under ctx and parallelized), same seed."""
    set_context(None)
    moesaic.moe_set_seed(seed)
    ref = tiny_net(**kw)
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    model = moesaic.parallelize(tiny_net(**kw), dedup_tokens=dedup_tokens)
    return ref, model


def check_dedup_dispatch(rank, world, ctx, seed):
    """Deduplicated dropless dispatch against the plain exchange (the one-process equivalence
    is the check_equivalence calls with dedup_tokens=True): the same outputs and gradients with
    hidden dropout, fewer bytes when each token's experts share a rank (groups = ranks, one
    group per token), the same float32 router gradient in bf16, top-1 left alone."""
    kw = dict(experts=(4,), top_k=2, num_groups=2, topk_groups=1, hidden_dropout=0.3)
    x, target = _data(world)
    lo, hi = rank * B, (rank + 1) * B
    sent, outs = [], []
    for dedup_tokens in (False, True):
        set_context(ctx)
        moesaic.moe_set_seed(seed)
        model = moesaic.parallelize(tiny_net(**kw), dedup_tokens=dedup_tokens)
        comm_stats(model).reset()
        torch.manual_seed(seed + rank)  # the same hidden-dropout keys in both runs
        out, _ = model.train()(x[lo:hi])
        (out - target[lo:hi]).square().mean().backward()
        sent.append(comm_stats(model).bytes_sent)
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, **TOL, msg=name)
    assert sent[1] < 0.75 * sent[0], sent  # rows: half of them both ways, plus small columns
    # bf16: the router's gradient stays a float32 dot product, as on the plain path
    grads = []
    for dedup_tokens in (False, True):
        moesaic.moe_set_seed(seed)
        model = moesaic.parallelize(tiny_net(experts=(4,), top_k=3).to(torch.bfloat16),
                                    dedup_tokens=dedup_tokens)
        out, _ = model(x[lo:hi].bfloat16())
        (out.float() - target[lo:hi]).square().mean().backward()
        grads.append(model.moes[0].router.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
    # top-1: nothing to deduplicate, the plain exchange runs (same bytes), and parallelize says so
    sent = []
    for dedup_tokens in (False, True):
        moesaic.moe_set_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = moesaic.parallelize(tiny_net(experts=(4,), top_k=1),
                                        dedup_tokens=dedup_tokens)
        assert any("has no effect" in str(w.message) for w in caught) == dedup_tokens, caught
        comm_stats(model).reset()
        model(x[lo:hi])[0].sum().backward()
        sent.append(comm_stats(model).bytes_sent)
    assert sent[0] == sent[1], sent
    with _raises(ValueError, "already parallelized with dedup_tokens=True"):
        moesaic.parallelize(model, dedup_tokens=False)
    # capacity_scope="global" keeps ragged rows in training: deduplicated too, and no warning
    kw = dict(experts=(4,), top_k=2, num_groups=2, topk_groups=1, drop_tokens=True,
              capacity_factor=0.75, capacity_scope="global")
    sent, outs = [], []
    for dedup_tokens in (False, True):
        moesaic.moe_set_seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = moesaic.parallelize(tiny_net(**kw), dedup_tokens=dedup_tokens)
        assert not any("has no effect" in str(w.message) for w in caught), caught
        comm_stats(model).reset()
        out, _ = model.train()(x[lo:hi])
        (out - target[lo:hi]).square().mean().backward()
        sent.append(comm_stats(model).bytes_sent)
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert float(model.moes[0].last_stats.dropped_fraction) > 0
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, **TOL, msg=name)
    assert sent[1] < sent[0], sent


def check_global_balance(rank, world, ctx, seed):
    """balance_scope="global": the loads are counted over both ranks' tokens, so the mean of the
    ranks' aux losses is the one-process loss of the whole batch and the synchronised router
    gradient is its gradient; eval forwards do not sum counts (ranks' eval shards may differ
    in number)."""
    set_context(None)
    moesaic.moe_set_seed(seed)
    ref = moesaic.MoE(D, F, 4, top_k=2, drop_tokens=False, balance_scope="global")
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    layer = moesaic.parallelize(moesaic.MoE(D, F, 4, top_k=2, drop_tokens=False,
                                            balance_scope="global"))
    x, _ = _data(world, seed=9)
    _, aux = layer(x[rank * B:(rank + 1) * B])
    aux.backward()
    _, aux_ref = ref(x)  # one process: global is the whole batch
    aux_ref.backward()
    mean = aux.detach().clone()
    dist.all_reduce(mean)
    torch.testing.assert_close(mean / world, aux_ref.detach(), **TOL)
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad, **TOL)
    def no_sum_in_eval(counts_E):
        raise AssertionError("counts summed over ranks in eval")

    layer.count_sum = no_sum_in_eval
    layer.eval()(x[rank * B:(rank + 1) * B])


def check_global_capacity(rank, world, ctx, seed, drop_policy="position"):
    """capacity_scope="global": the ranks drop exactly the assignments one process drops on
    the whole batch (outputs, gradients, optimizer steps), where per-rank capacity drops
    others; eval keeps per-rank capacity (no collective)."""
    kw = dict(experts=(4, 2), top_k=2, drop_tokens=True, capacity_factor=0.5,
              drop_policy=drop_policy)
    model = check_equivalence(rank, world, ctx, seed, steps=2, capacity_scope="global", **kw)
    dropped = torch.stack([m.last_stats.dropped_fraction.detach().float() for m in model.moes])
    dist.all_reduce(dropped)  # causal ranking puts rank 0's tokens first: it may drop none
    assert bool((dropped > 0).all()), dropped
    ref, local = _build_pair(ctx, seed, **kw)
    x, _ = _data(world)
    lo, hi = rank * B, (rank + 1) * B
    differs = torch.tensor(float(not torch.allclose(local(x[lo:hi])[0], ref(x)[0][lo:hi])))
    dist.all_reduce(differs)
    assert differs > 0, "per-rank capacity dropped as the whole batch does: the test is void"

    if drop_policy == "causal":  # tokens on rank 1: both ranks raise after the first gather
        x_in = x[lo:hi] if rank == 0 else x[lo:hi].reshape(-1, D)
        try:
            model(x_in)
        except ValueError as e:
            assert "got a [T, D] input on rank(s) [1]" in str(e), e
        else:
            raise AssertionError("causal global capacity took a [T, D] input")

    def no_gather_in_eval(counts):
        raise AssertionError("counts gathered over ranks in eval")

    for m in model.moes:
        m.count_sum.gather = no_gather_in_eval
    model.eval()(x[lo:hi])


def dedup_with_kernels(rank, world):
    """Deduplicated dispatch through the Triton kernels (the interpreter, on CPU) equals the
    plain exchange on the PyTorch path: outputs and every gradient."""
    ctx = moesaic.init_distributed(timeout_s=60)
    x, target = _data(world)
    lo, hi = rank * B, (rank + 1) * B
    results = []
    for kernels, dedup_tokens in (("torch", False), ("triton", True)):
        set_context(ctx)
        moesaic.moe_set_seed(5)
        model = moesaic.parallelize(tiny_net(experts=(4,), top_k=2, kernels=kernels),
                                    dedup_tokens=dedup_tokens)
        out, _ = model(x[lo:hi])
        (out - target[lo:hi]).square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, **TOL, msg=name)
    moesaic.destroy()
    return True


@contextlib.contextmanager
def _raises(exc_type, *texts):
    """The block must raise ``exc_type`` with every one of ``texts`` in its message (the rank
    processes do without pytest)."""
    try:
        yield
    except exc_type as e:
        assert all(t in str(e) for t in texts), e
    else:
        raise AssertionError(f"no {exc_type.__name__} mentioning {texts}")


def _assert_state_equal(ref, model, what):
    full = moesaic.full_state_dict(model, all_ranks=True)
    ref_sd = ref.state_dict()
    assert full.keys() == ref_sd.keys(), what
    for k, v in ref_sd.items():
        torch.testing.assert_close(full[k], v, **TOL, msg=lambda m: f"{what}: {k}: {m}")


def _assert_grads_equal(ref, model, what):
    ref_p = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_p[name].grad
        if name.split(".")[-2] == "experts":
            layer = model.get_submodule(name.rsplit(".", 2)[0])
            g_ref = g_ref[layer.experts.global_ids[0]:layer.experts.global_ids[-1] + 1]
        torch.testing.assert_close(p.grad, g_ref, **TOL, msg=lambda m: f"{what}: grad {name}: {m}")


def check_equivalence(rank, world, ctx, seed, steps=3, clip=None, **kw):
    """Outputs, every gradient and ``steps`` AdamW steps equal the one-process run."""
    ref, model = _build_pair(ctx, seed, **kw)
    _assert_state_equal(ref, model, f"{kw} init")
    x, target = _data(world)
    lo, hi = rank * B, (rank + 1) * B
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        out_ref, _ = ref(x)
        (out_ref - target).square().mean().backward()
        out, _ = model(x[lo:hi])
        torch.testing.assert_close(out, out_ref[lo:hi], **TOL, msg=lambda m: f"{kw} out: {m}")
        (out - target[lo:hi]).square().mean().backward()
        _assert_grads_equal(ref, model, f"{kw} step {step}")
        if clip is not None:
            n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            n = moesaic.clip_grad_norm_(model, clip)
            torch.testing.assert_close(n, n_ref, **TOL)
            _assert_grads_equal(ref, model, f"{kw} step {step} clipped")
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        _assert_state_equal(ref, model, f"{kw} after step {step}")
    return model


def check_no_sync(rank, world, ctx, seed):
    """Two micro-batches, the first under no_sync: the gradients equal the one-process
    gradients of both micro-batches together."""
    ref, model = _build_pair(ctx, seed, experts=(4,))
    x, target = _data(world)
    lo, hi = rank * B, (rank + 1) * B
    for part in (slice(0, S // 2), slice(S // 2, S)):
        out_ref, _ = ref(x[:, part])
        ((out_ref - target[:, part]).square().mean() / 2).backward()
    with moesaic.no_sync(model):
        out, _ = model(x[lo:hi, :S // 2])
        ((out - target[lo:hi, :S // 2]).square().mean() / 2).backward()
    out, _ = model(x[lo:hi, S // 2:])
    ((out - target[lo:hi, S // 2:]).square().mean() / 2).backward()
    _assert_grads_equal(ref, model, "no_sync accumulation")
    assert moesaic.parallelize(model) is model


def check_aux_loss(rank, world, ctx, seed, **kw):
    """The balance loss is per rank: each rank's aux loss equals the one-process layer's on
    that rank's slice, and the synchronised router gradient is the mean over the ranks' slices.
    Per sequence (``balance_scope="sequence"``) the ranks' mean is the whole batch's loss."""
    set_context(None)
    moesaic.moe_set_seed(seed)
    ref = moesaic.MoE(D, F, 4, top_k=2, drop_tokens=False, z_loss_coef=0.1, **kw)
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    layer = moesaic.parallelize(moesaic.MoE(D, F, 4, top_k=2, drop_tokens=False, z_loss_coef=0.1,
                                            **kw))
    x, _ = _data(world, seed=7)
    _, aux = layer(x[rank * B:(rank + 1) * B])
    aux.backward()
    grads, auxes = [], []
    for r in range(world):
        ref.zero_grad()
        _, aux_r = ref(x[r * B:(r + 1) * B])
        aux_r.backward()
        if r == rank:
            torch.testing.assert_close(aux, aux_r, **TOL)
        grads.append(ref.router.weight.grad.clone())
        auxes.append(aux_r.detach())
    torch.testing.assert_close(layer.router.weight.grad, torch.stack(grads).mean(0), **TOL)
    if kw.get("balance_scope") == "sequence":
        torch.testing.assert_close(torch.stack(auxes).mean(), ref(x)[1].detach(), **TOL)


def check_uneven_capacity(rank, world, ctx, seed):
    """Capacity mode with drops, ranks routing different token counts (18 and 6): each rank's
    outputs equal the one-process model on its own slice (C is per rank), and the gradients
    equal the mean of the ranks' losses in one process. Under equal_batches (equal counts) the
    capacity exchange is skipped."""
    ref, model = _build_pair(ctx, seed, experts=(4, 2), drop_tokens=True, capacity_factor=0.75)
    x, target = _data(world)
    slices = [slice(0, 3), slice(3, 4)]
    total, out_ref = 0.0, None
    for r, sl in enumerate(slices):
        out_r, _ = ref(x[sl])
        out_ref = out_r if r == rank else out_ref
        total = total + (out_r - target[sl]).square().mean()
    (total / world).backward()
    assert any(float(m.last_stats.dropped_fraction) > 0 for m in ref.moes)
    out, _ = model(x[slices[rank]])
    torch.testing.assert_close(out, out_ref.detach(), **TOL)
    (out - target[slices[rank]]).square().mean().backward()
    _assert_grads_equal(ref, model, "uneven capacity")
    stats = comm_stats(model)
    calls = stats.calls
    model(x[:2])
    with moesaic.equal_batches(model):
        model(x[:2])
        assert all(m.dispatcher.equal_batches for m in model.moes)
    assert not any(m.dispatcher.equal_batches for m in model.moes)
    per_call = stats.calls - calls  # [with exchange, without]: 2 layers x 3 vs 2 layers x 2
    assert per_call == 2 * 3 + 2 * 2, per_call


def check_unused_parameters(rank, world, ctx, seed):
    """A parameter no rank uses keeps grad None (AdamW then skips it, as in one process); one
    used on rank 0 only gets rank 0's gradient / world."""
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    model = torch.nn.ModuleDict({"moe": moesaic.MoE(D, F, 4, drop_tokens=False),
                                 "unused": torch.nn.Linear(D, D), "rank0": torch.nn.Linear(D, 1)})
    model = moesaic.parallelize(model)
    x, _ = _data(world)
    y, _ = model["moe"](x[rank])
    loss = y.square().mean() + (model["rank0"](x[rank]).sum() if rank == 0 else 0.0)
    loss.backward()
    assert model["unused"].weight.grad is None and model["unused"].bias.grad is None
    want = torch.ones(()) * (x[0].shape[0] / world)
    torch.testing.assert_close(model["rank0"].bias.grad.sum(), want, **TOL)


def check_layout_independence(rank, world, seed):
    """At a fixed world size, jitter noise, dropout and the experts' hidden dropout draw the
    same numbers whether the experts are split over the ranks (max_ep_size 2) or replicated
    (1), and the selection biases of auxiliary-loss-free balancing take the same steps: 3 AdamW
    steps end equal, dropless and with capacity drops."""
    x, target = _data(world)
    lo, hi = rank * B, (rank + 1) * B
    for routing_kw in (dict(drop_tokens=False),
                       dict(drop_tokens=True, capacity_factor=0.8, dropout_branches=True)):
        finals = []
        for max_ep in (1, 2):
            moesaic.init_distributed(max_ep_size=max_ep, timeout_s=30)
            moesaic.moe_set_seed(seed)
            model = moesaic.parallelize(tiny_net(noise_policy="jitter", dropout=0.2, residual=True,
                                                 hidden_dropout=0.3, bias_update_rate=0.01,
                                                 **routing_kw))
            assert model.moes[0].layout.ep_size == max_ep
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for _ in range(3):
                out, aux = model(x[lo:hi])
                ((out - target[lo:hi]).square().mean() + aux).backward()
                opt.step()
                moesaic.update_expert_biases(model)
                opt.zero_grad()
            bias = model.moes[0].router.expert_bias
            everywhere = [torch.empty_like(bias) for _ in range(world)]
            dist.all_gather(everywhere, bias)  # counts summed over ranks: one bias everywhere
            assert bias.abs().sum() > 0 and all(torch.equal(b, bias) for b in everywhere)
            finals.append(moesaic.full_state_dict(model, all_ranks=True))
        assert finals[0].keys() == finals[1].keys()
        for k in finals[0]:
            torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{routing_kw} {k}: {m}")


def check_hidden_dropout_layouts(rank, world, seed):
    """Hidden dropout's keys follow their rows through every exchange: one layer's outputs and
    input gradients at max_ep_size 1 and 2 agree with uneven token counts (dropless, capacity
    with different C per rank, expert choice), padded capacity blocks and equal_batches."""
    cases = [(dict(top_k=2, drop_tokens=False), (7, 12), False),
             (dict(top_k=2, capacity_factor=0.8), (7, 13), False),
             (dict(top_k=2, capacity_factor=1.5), (12, 12), True),
             (dict(router="expert_choice", capacity_factor=1.0), (8, 12), False),
             (dict(top_k=1, capacity_factor=1.0, residual=True), (9, 12), False)]
    for kw, tokens, equal in cases:
        x = torch.randn(tokens[rank], D, generator=torch.Generator().manual_seed(100 + rank))
        g = torch.randn(tokens[rank], D, generator=torch.Generator().manual_seed(200 + rank))
        results = []
        for max_ep in (1, 2):
            moesaic.init_distributed(max_ep_size=max_ep, timeout_s=30)
            moesaic.moe_set_seed(seed)
            model = moesaic.parallelize(moesaic.MoE(D, F, 4, hidden_dropout=0.5, min_capacity=0,
                                                    **kw))
            assert model.layout.ep_size == max_ep
            xr = x.clone().requires_grad_(True)
            with moesaic.equal_batches(model) if equal else contextlib.nullcontext():
                y, _ = model(xr)
            (y * g).sum().backward()
            results.append((y.detach(), xr.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{kw}: {m}")


def check_upcycle_layouts(rank, world, ctx, seed):
    """Upcycling copies into the experts each rank holds: the full state dict equals the
    one-process upcycled model's, and each rank's output is the dense MLP's for its tokens."""
    torch.manual_seed(seed)
    dense = torch.nn.ModuleDict({"ffn": moesaic.DenseMLP(D, F)})
    set_context(None)
    moesaic.moe_set_seed(seed)
    ref = torch.nn.ModuleDict({"ffn": moesaic.MoE(D, F, 4, top_k=2, drop_tokens=False)})
    moesaic.upcycle_(ref, dense.state_dict())
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    model = moesaic.parallelize(torch.nn.ModuleDict(
        {"ffn": moesaic.MoE(D, F, 4, top_k=2, drop_tokens=False)}))
    assert model["ffn"].layout.ep_size == 2
    assert moesaic.upcycle_(model, dense.state_dict()) == ["ffn"]
    _assert_state_equal(ref, model, "upcycled")
    x = _data(world, seed)[0][rank * B:(rank + 1) * B]
    torch.testing.assert_close(model["ffn"](x)[0], dense["ffn"](x), **TOL)


def check_moeify_layouts(rank, world, ctx, seed):
    """A model moeified before parallelize splits its new experts over the ranks: the full
    state dict is the one-process model's, and each rank's output and aux loss are that
    model's for its tokens."""
    def build():
        torch.manual_seed(seed)
        dense = torch.nn.Sequential(torch.nn.Linear(D, D), moesaic.DenseMLP(D, F))
        moesaic.moe_set_seed(seed)
        moesaic.moeify_(dense, 4, top_k=2, drop_tokens=False, aux_loss_coef=1.0)
        return dense

    set_context(None)
    ref = build()
    set_context(ctx)
    model = moesaic.parallelize(build())
    assert model[1].moe.layout.ep_size == 2
    _assert_state_equal(ref, model, "moeified")
    x = _data(world, seed)[0][rank * B:(rank + 1) * B]
    torch.testing.assert_close(model(x), ref(x), **TOL)
    torch.testing.assert_close(moesaic.collect_aux_loss(model), moesaic.collect_aux_loss(ref),
                               **TOL)
    late = moesaic.parallelize(torch.nn.Sequential(torch.nn.Linear(D, D), moesaic.DenseMLP(D, F)))
    with _raises(ValueError, "already synchronises over ranks: moeify before parallelize"):
        moesaic.moeify_(late, 4)


def check_init_from_fails_on_every_rank(rank):
    """A checkpoint that fails to load on one rank stops every rank before the run dir is
    chosen, the others naming the failing rank."""
    from moesaic.train import checkpoint, dist as train_dist

    def load():
        if rank == 1:
            raise checkpoint.CheckpointError("checkpoint X is damaged")
        return "loaded"

    with _raises(checkpoint.CheckpointError,
                 *(["init_from failed on rank 1: checkpoint X is damaged"] if rank == 0
                   else ["checkpoint X is damaged"])):
        train_dist.on_every_rank(load)
    assert train_dist.on_every_rank(lambda: rank) == rank


def check_reset_classifier_refused_while_synced(rank, world, ctx, seed):
    """A zoo model inside a parallelized wrapper: replacing its head would leave the new head's
    gradients unsynchronised, so reset_classifier refuses; returns the wrapper."""
    import moesaic.models as zoo
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    wrapper = torch.nn.ModuleDict({"net": zoo.create(
        "vit_moe_tiny", img_size=8, in_chans=1, patch_size=4, depth=2, d_model=16, num_heads=2,
        num_experts=2)})
    moesaic.parallelize(wrapper)
    with _raises(RuntimeError, "reset the head first, then parallelize"):
        wrapper["net"].reset_classifier(3)
    return wrapper


def check_zero_tokens(rank, world, ctx, seed):
    """No tokens on any rank (capacity 0), or on one rank only: an empty output there, in both
    modes and policies, and with deduplicated dispatch."""
    set_context(ctx)
    for kw, dedup_tokens in ((dict(), False), (dict(drop_tokens=False), False),
                             (dict(drop_tokens=False, top_k=2), True)):
        moesaic.moe_set_seed(seed)
        moe = moesaic.parallelize(moesaic.MoE(D, F, 4, **kw), dedup_tokens=dedup_tokens)
        for training in (True, False):
            for n in (0, 5 * (rank == 0)):
                x = torch.randn(n, D, requires_grad=True)
                y, aux = moe.train(training)(x)
                assert y.shape == (n, D), (kw, training, y.shape)
                if training:
                    (y.sum() + aux).backward()


def check_grad_checkpointing(rank, world, ctx, seed):
    """Recomputed blocks repeat their all-to-alls in the backward: gradients (noise, dropout and
    capacity drops on) equal those of stored activations on every rank."""
    import moesaic.models as zoo
    moesaic.moe_set_seed(seed)
    model = moesaic.parallelize(zoo.create(
        "vit_moe_tiny", img_size=8, in_chans=1, patch_size=2, depth=2, d_model=16, num_heads=2,
        num_experts=4, top_k=2, noise_policy="gaussian", drop_rate=0.1, capacity_factor=0.8))
    images = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(rank))
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable).zero_grad()
        torch.manual_seed(seed + rank)
        logits, aux = model(images)
        (logits.square().mean() + aux).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, **TOL, msg=lambda m: f"checkpointed {n}: {m}")


class _SharedBlocks(torch.nn.Module):
    """One MoE layer called by two blocks (WideNet-style), each under reentrant checkpointing:
    its weights' gradients accumulate once per block's inner backward, after the head's (whose
    hook queues the end-of-backward callback on the outer backward)."""

    def __init__(self):
        super().__init__()
        self.inp, self.moe = torch.nn.Linear(D, D), moesaic.MoE(D, F, 4, drop_tokens=False)
        self.head = torch.nn.Linear(D, D)

    def block(self, h):
        y, aux = self.moe(h)
        return h + y, aux

    def forward(self, x):
        h = self.inp(x)
        for _ in range(2):
            h, _ = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=True)
        return self.head(h)


def check_shared_weights_under_reentrant_checkpointing(rank, world, ctx, seed):
    """A bucket all-reduced after the first block's accumulation is all-reduced again with the
    whole sum (tiny buckets, so it launches early): gradients equal one process's."""
    x, _ = _data(world, seed)
    set_context(None)
    moesaic.moe_set_seed(seed)
    ref = _SharedBlocks()
    sum(ref(x[r * B:(r + 1) * B]).square().mean() for r in range(world)).div(world).backward()
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    model = moesaic.parallelize(_SharedBlocks(), bucket_mb=1e-6)
    model(x[rank * B:(rank + 1) * B]).square().mean().backward()
    ref_p = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_p[name].grad
        if ".experts." in name:
            g_ref = g_ref[model.moe.experts.global_ids[0]:model.moe.experts.global_ids[-1] + 1]
        torch.testing.assert_close(p.grad, g_ref, **TOL, msg=lambda m: f"shared {name}: {m}")


def check_unfrozen_after_parallelize_is_refused(rank, world, ctx, seed):
    """Nothing averages a parameter frozen when parallelize ran: its gradient is an error that
    names it, on every rank."""
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    net = tiny_net(experts=(4,))
    for p in net.moes[0].experts.parameters():
        p.requires_grad_(False)
    model = moesaic.parallelize(net)
    for p in model.parameters():
        p.requires_grad_(True)
    x, _ = _data(world, seed)
    out, aux = model(x[rank * B:(rank + 1) * B])
    with _raises(RuntimeError, "'moes.0.experts.w1' did not require grad when "
                 "moesaic.parallelize ran"):
        out.square().mean().backward()


def check_deepcopy_and_pickle(rank, world, ctx, seed):
    """A deep copy of a parallelized model (EMA, AveragedModel) runs the same forward through
    the shared all-to-all groups; parallelize(copy) trains it like the original; pickling the
    module says what to save instead."""
    import copy
    import pickle
    from torch.optim.swa_utils import AveragedModel
    ref, model = _build_pair(ctx, seed, experts=(4,))
    x, target = _data(world)
    lo, hi = rank * B, (rank + 1) * B
    twin = copy.deepcopy(model)
    assert moesaic.parallel.model.parallel_state(twin) is None
    ema = AveragedModel(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(x[lo:hi])[0], model(x[lo:hi])[0])
        torch.testing.assert_close(ema.module(x[lo:hi])[0], model(x[lo:hi])[0])
    moesaic.parallelize(twin)
    for m in (model, twin):
        out, _ = m(x[lo:hi])
        (out - target[lo:hi]).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m: f"copy grad {n}: {m}")
    with _raises(TypeError, "full_state_dict"):
        pickle.dumps(model)


def check_backward_that_raised_does_not_stop_sync(rank, world, ctx, seed):
    """A backward that raises on every rank (a batch a loop skips) leaves half-filled buckets;
    the next forward drops them with a warning and the next step synchronises as usual."""
    import warnings
    ref, model = _build_pair(ctx, seed, experts=(4,))
    x, target = _data(world)
    lo, hi = rank * B, (rank + 1) * B

    def boom(module, grad_output):
        raise RuntimeError("simulated failure in backward")

    handle = model.moes[0].register_full_backward_pre_hook(boom)  # after `out`'s gradients
    out, _ = model(x[lo:hi])
    try:
        (out - target[lo:hi]).square().mean().backward()
    except RuntimeError as e:
        assert "simulated failure" in str(e), e
    handle.remove()
    model.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = model(x[lo:hi])
    assert any("previous backward did not finish" in str(w.message) for w in caught), caught
    (out - target[lo:hi]).square().mean().backward()
    out_ref, _ = ref(x)
    (out_ref - target).square().mean().backward()
    _assert_grads_equal(ref, model, "after a backward that raised")


def check_parallelize_setup_rules(rank, world, ctx, seed):
    """Replicated experts start equal whatever each rank built; a model holding an already
    parallelized submodule is refused; a second parallelize keeps the random streams going."""
    from moesaic.parallel.layout import set_layer_seed_base

    def gathered(model):
        w1 = model.moes[0].experts.w1.detach().contiguous()
        copies = [torch.empty_like(w1) for _ in range(world)]
        dist.all_gather(copies, w1)
        return copies

    set_layer_seed_base(None)  # no moe_set_seed: each rank's seed draws the expert seed
    torch.manual_seed(100 + rank)
    model = tiny_net(experts=(1,), top_k=1)
    assert not torch.equal(*gathered(model)[:2])
    moesaic.parallelize(model)
    assert all(torch.equal(c, gathered(model)[0]) for c in gathered(model))
    with _raises(ValueError, "submodule 'body' is already parallelized"):
        moesaic.parallelize(torch.nn.ModuleDict({"body": model}))
    moesaic.moe_set_seed(seed)
    moesaic.parallelize(tiny_net(experts=(4,)))
    first = torch.rand(4)
    moesaic.parallelize(tiny_net(experts=(4,)))  # e.g. an EMA copy
    assert not torch.equal(torch.rand(4), first)


def check_grad_scaler_skips_together(rank, world, ctx, seed):
    """fp16 loss scaling: an overflow in an expert gradient that only rank 0 holds makes every
    rank skip the step and back off the scale."""
    set_context(ctx)
    moesaic.moe_set_seed(seed)
    model = moesaic.parallelize(tiny_net(experts=(4,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = grad_scaler(True, "cpu")
    x, target = _data(world)
    out, _ = model(x[rank * B:(rank + 1) * B])
    scaler.scale((out - target[rank * B:(rank + 1) * B]).square().mean()).backward()
    if rank == 0:
        model.moes[0].experts.w1.grad[0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    scaler.unscale_(opt)
    moesaic.clip_grad_norm_(model, 1.0)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), rank
    assert scaler.get_scale() == scale / 2


def two_ranks(rank, world):
    ctx = moesaic.init_distributed(max_ep_size=2, timeout_s=30)
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (rank, 2, rank == 0)
    model = check_equivalence(rank, world, ctx, 1, clip=0.05, experts=(4, 2))
    assert model.moes[0].experts.global_ids == [[0, 1], [2, 3]][rank]
    assert model.moes[1].experts.global_ids == [rank]
    assert comm_stats(model).bytes_sent > 0
    check_equivalence(rank, world, ctx, 2, experts=(4,), drop_tokens=True, capacity_factor=4.0)
    check_uneven_capacity(rank, world, ctx, 9)
    check_unused_parameters(rank, world, ctx, 10)
    check_aux_loss(rank, world, ctx, 3)
    check_no_sync(rank, world, ctx, 8)
    check_equivalence(rank, world, ctx, 12, experts=(4, 2), residual=True)
    check_equivalence(rank, world, ctx, 21, steps=2, experts=(4, 2), num_shared_experts=1)
    check_equivalence(rank, world, ctx, 23, steps=2, experts=(4,), num_groups=2, topk_groups=1)
    check_aux_loss(rank, world, ctx, 24, balance_scope="sequence", num_groups=2, topk_groups=1)
    check_equivalence(rank, world, ctx, 25, steps=2, experts=(4, 2), dedup_tokens=True)
    check_equivalence(rank, world, ctx, 26, steps=2, experts=(4,), num_groups=2, topk_groups=1,
                      dedup_tokens=True)
    check_dedup_dispatch(rank, world, ctx, 27)
    check_global_balance(rank, world, ctx, 28)
    check_global_capacity(rank, world, ctx, 31)
    check_global_capacity(rank, world, ctx, 32, drop_policy="score")
    check_global_capacity(rank, world, ctx, 34, drop_policy="causal")
    model = check_equivalence(rank, world, ctx, 33, steps=2, experts=(4, 2), top_k=1,
                              router="expert_choice", drop_tokens=True, capacity_factor=1.0,
                              capacity_scope="global")
    assert all(m.last_stats.tokens_per_expert_kept.sum() > 0 for m in model.moes)
    check_grad_scaler_skips_together(rank, world, ctx, 13)
    check_zero_tokens(rank, world, ctx, 15)
    check_grad_checkpointing(rank, world, ctx, 16)
    check_shared_weights_under_reentrant_checkpointing(rank, world, ctx, 29)
    check_unfrozen_after_parallelize_is_refused(rank, world, ctx, 30)
    check_deepcopy_and_pickle(rank, world, ctx, 17)
    check_backward_that_raised_does_not_stop_sync(rank, world, ctx, 18)
    check_parallelize_setup_rules(rank, world, ctx, 19)
    check_upcycle_layouts(rank, world, ctx, 20)
    check_init_from_fails_on_every_rank(rank)
    check_moeify_layouts(rank, world, ctx, 22)
    # one expert, two ranks: replicated, synchronised over the two ranks
    check_equivalence(rank, world, ctx, 4, steps=1, experts=(1,), top_k=1)
    # per-rank noise streams: same router, same input, different noise on each rank
    moesaic.moe_set_seed(5)
    noisy = moesaic.parallelize(moesaic.MoE(D, F, 4, noise_policy="gaussian")).train()
    logits = noisy.router(torch.zeros(8, D))
    gathered = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits)
    assert not torch.equal(gathered[0], gathered[1])
    # ranks that disagree on the model fail at set-up, on every rank
    moesaic.moe_set_seed(6)
    with _raises(ValueError, "ranks disagree on the model", "num_experts=8"):
        moesaic.parallelize(moesaic.MoE(D, F, 4 if rank == 0 else 8))
    moesaic.moe_set_seed(6)
    with _raises(ValueError, "ranks disagree on the model", "top_k=2"):
        moesaic.parallelize(moesaic.MoE(D, F, 4, top_k=1 + rank))
    # one MoE layer under two names: both keys hold all experts in the full state dict
    moesaic.moe_set_seed(7)
    moe = moesaic.MoE(D, F, 4)
    shared = moesaic.parallelize(torch.nn.ModuleDict({"a": moe, "b": moe}))
    full = moesaic.full_state_dict(shared, all_ranks=True)
    assert full["a.experts.w1"].shape[0] == full["b.experts.w1"].shape[0] == 4
    moesaic.load_full_state_dict(shared, full)
    check_layout_independence(rank, world, 14)
    check_hidden_dropout_layouts(rank, world, 15)
    wrapper = check_reset_classifier_refused_while_synced(rank, world, ctx, 16)
    set_context(ctx)
    y_kept, _ = shared["a"](torch.randn(3, D, requires_grad=True))  # a graph kept past destroy
    moesaic.destroy()
    # destroy lets go of every process group (held to exit, gloo's threads could abort it),
    # also the ones a kept autograd graph refers to
    assert ctx._groups == {} and ctx._grad_group is None and not ctx.distributed
    assert shared.moesaic_parallel.grad_sync.buckets[0].group is None
    for run in (lambda: shared["a"](torch.randn(3, D)), lambda: y_kept.sum().backward()):
        with _raises(RuntimeError, "moesaic.destroy() has torn the process group down"):
            run()
    for installed in (None, ctx):  # no context, or the released one re-installed
        set_context(installed)
        with _raises(ValueError, "init_distributed"):
            moesaic.parallelize(shared)
    wrapper["net"].reset_classifier(3)  # released by destroy: nothing syncs the head any more
    set_context(None)
    return True


def four_ranks(rank, world):
    ctx = moesaic.init_distributed(max_ep_size=2, timeout_s=60)
    model = check_equivalence(rank, world, ctx, 11, steps=2, experts=(4, 2))
    check_equivalence(rank, world, ctx, 13, steps=1, experts=(4, 8), top_k=3, dedup_tokens=True)
    layout = model.moes[0].layout
    assert (layout.ep_size, layout.edp_size) == (2, 2)
    assert model.moes[0].experts.global_ids == [[0, 1], [2, 3]][rank % 2]
    # PR-MoE pyramid [2, 4] on 4 ranks: the 2-expert layer is replicated twice
    ctx = moesaic.init_distributed(max_ep_size=4, timeout_s=60)
    check_equivalence(rank, world, ctx, 14, steps=1, experts=(8,), top_k=3, dedup_tokens=True)
    model = check_equivalence(rank, world, ctx, 12, steps=2, experts=(2, 4), top_k=1,
                              drop_tokens=True, capacity_factor=8.0)
    assert [m.layout.ep_size for m in model.moes] == [2, 4]
    for seed, policy in ((15, "position"), (16, "score"), (17, "causal")):
        check_equivalence(rank, world, ctx, seed, steps=1, experts=(2, 4), top_k=2,
                          drop_tokens=True, capacity_factor=0.5, capacity_scope="global",
                          drop_policy=policy)
    check_equivalence(rank, world, ctx, 18, steps=1, experts=(2, 4), top_k=1, drop_tokens=True,
                      router="expert_choice", capacity_factor=0.75, capacity_scope="global",
                      score_func="sigmoid")
    assert model.moes[0].experts.global_ids == [rank % 2]
    assert model.moes[1].experts.global_ids == [rank]
    # a model built with max_ep_size 1, 2 or 4 holds the same experts
    states = []
    for m in (1, 2, 4):
        moesaic.init_distributed(max_ep_size=m, timeout_s=60)
        moesaic.moe_set_seed(21)
        states.append(moesaic.full_state_dict(tiny_net(experts=(4, 8)), all_ranks=True))
    for s in states[1:]:
        assert s.keys() == states[0].keys()
        for k in s:
            assert torch.equal(s[k], states[0][k]), k
    moesaic.destroy()
    return True


def dies_mid_step(rank, world, mode="raise", timeout_s=20.0):
    """Rank 1 raises (``mode="raise"``) or stalls past the timeout (``"hang"``) in its second
    step; rank 0 must leave its collective with a CommError."""
    ctx = moesaic.init_distributed(timeout_s=timeout_s)
    moesaic.moe_set_seed(0)
    model = moesaic.parallelize(tiny_net(experts=(4,)))
    x, _ = _data(world)
    for step in range(2):
        if rank == 1 and step == 1:
            if mode == "hang":
                time.sleep(2 * timeout_s)
                return ("slept", "", 0.0, ctx.timeout_s)
            raise RuntimeError("rank 1 fails on purpose")
        t0 = time.monotonic()
        try:
            out, _ = model(x[rank * B:(rank + 1) * B])
            out.sum().backward()
        except moesaic.parallel.CommError as e:
            return ("CommError", str(e), time.monotonic() - t0, ctx.timeout_s)
    return ("finished", "", 0.0, ctx.timeout_s)


def triton_ops_match_torch(rank, world):
    """The all-to-all dispatcher gathers and combines with the backend's ops: the Triton kernels
    (under the interpreter on CPU) give the PyTorch path's outputs and gradients."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    moesaic.init_distributed(timeout_s=60)
    runs = []
    for kernels in ("torch", "triton"):
        for drop, scope, policy in ((False, "batch", "position"), (True, "batch", "position"),
                                    (True, "global", "position"), (True, "global", "score")):
            moesaic.moe_set_seed(0)
            m = moesaic.parallelize(moesaic.MoE(D, F, 4, top_k=2, drop_tokens=drop,
                                                capacity_factor=1.0, kernels=kernels,
                                                capacity_scope=scope, drop_policy=policy))
            x = torch.randn(12, D, generator=torch.Generator().manual_seed(rank),
                            requires_grad=True)
            y, _ = m(x)
            y.square().sum().backward()
            runs.append((y.detach(), x.grad, m.experts.w1.grad, m.router.weight.grad))
    for i in range(4):
        for a, b in zip(runs[i], runs[i + 4]):
            torch.testing.assert_close(a, b, **TOL)
    moesaic.destroy()
    return True

"""Expert parallelism in one process: layout rules, seeding across layouts, reorder indices,
full state dicts across layouts, the volume formula. (< 5 s)"""
import pytest
import torch

import moesaic
from moesaic.parallel import volume
from moesaic.parallel.dispatcher import block_order
from moesaic.parallel.layout import ExpertLayout, layout_for, set_context


class FakeContext:
    """A layout-only context: rank ``rank`` of ``world`` without any process group."""

    def __init__(self, max_ep_size, rank, world):
        self.max_ep_size, self.rank, self.world = max_ep_size, rank, world

    def layout_for(self, num_experts):
        return layout_for(num_experts, self.max_ep_size, self.rank, self.world)


@pytest.fixture(autouse=True)
def no_context():
    set_context(None)
    yield
    set_context(None)


def test_layout_rules():
    assert layout_for(8, 4, 5, 8) == ExpertLayout(8, 4, 1, 2)
    assert layout_for(8, 4, 5, 8).global_ids == [2, 3]
    replicated = layout_for(2, 4, 3, 4)  # fewer experts than max_ep_size: each held twice
    assert (replicated.ep_size, replicated.edp_size, replicated.global_ids) == (2, 2, [1])
    with pytest.raises(ValueError, match=r"num_experts \(6\) and max_ep_size \(4; the world size.*max_ep_size=1"):
        layout_for(6, 4, 0, 4)


def test_init_distributed_single_process_and_bad_sizes():
    ctx = moesaic.init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    with pytest.raises(ValueError, match=r"world size \(1\) is not divisible by max_ep_size \(2\)"):
        moesaic.init_distributed(max_ep_size=2)
    with pytest.raises(ValueError, match="timeout_s"):
        moesaic.init_distributed(timeout_s=0)
    moesaic.destroy()


def _experts_of(max_ep, world, experts=(4, 8)):
    """Concatenate, over the ranks of one ep group, the experts each rank would build."""
    per_layer = [[] for _ in experts]
    ep = max(layout_for(e, max_ep, 0, world).ep_size for e in experts)
    for rank in range(ep):
        set_context(FakeContext(max_ep, rank, world))
        moesaic.moe_set_seed(42)
        torch.randn(3)  # other draws from the default generator must not matter
        layers = [moesaic.MoE(8, 16, e) for e in experts]
        for i, layer in enumerate(layers):
            ids = layer.experts.global_ids
            if not per_layer[i] or ids[0] == len(per_layer[i]):
                per_layer[i].extend(zip(ids, layer.experts.w1.detach()))
    set_context(None)
    return [torch.stack([w for _, w in sorted(lay, key=lambda t: t[0])]) for lay in per_layer]


def test_same_experts_for_max_ep_1_2_4():
    ref = _experts_of(1, 4)
    for m in (2, 4):
        for a, b in zip(_experts_of(m, 4), ref):
            assert torch.equal(a, b)


def test_block_order_regroups_source_major_to_expert_major():
    counts_SL = torch.tensor([[2, 0, 1], [1, 3, 0]])  # 2 sources, 3 local experts
    labels = [(s, l) for s in range(2) for l in range(3) for _ in range(int(counts_SL[s, l]))]
    order = block_order(counts_SL)
    assert [labels[i] for i in order] == sorted(labels, key=lambda t: (t[1], t[0]))


def test_full_state_dict_loads_into_any_layout():
    moesaic.moe_set_seed(0)
    full_model = torch.nn.Sequential(moesaic.MoE(8, 16, 4), moesaic.MoE(8, 16, 2))
    full = moesaic.full_state_dict(full_model)
    set_context(FakeContext(4, 3, 4))
    moesaic.moe_set_seed(1)  # different init, overwritten by the load
    local = torch.nn.Sequential(moesaic.MoE(8, 16, 4), moesaic.MoE(8, 16, 2))
    moesaic.load_full_state_dict(local, full)
    assert local[0].experts.global_ids == [3] and local[1].experts.global_ids == [1]
    assert torch.equal(local[0].experts.w1[0], full["0.experts.w1"][3])
    assert torch.equal(local[1].experts.b2[0], full["1.experts.b2"][1])
    assert torch.equal(local[0].router.weight, full["0.router.weight"])
    with pytest.raises(ValueError, match=r"holds 2 experts \(shape \(2, .*\)\), the model 4"):
        moesaic.load_full_state_dict(local, {**full, "0.experts.w1": full["0.experts.w1"][:2]})


def test_clip_grad_norm_single_process_matches_torch():
    moesaic.moe_set_seed(0)
    a = moesaic.MoE(8, 16, 4)
    moesaic.moe_set_seed(0)
    b = moesaic.MoE(8, 16, 4)
    x = torch.randn(10, 8)
    for m in (a, b):
        y, aux = m(x)
        (y.square().mean() + aux).backward()
    n_ref = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.01)
    n = moesaic.clip_grad_norm_(b, 0.01)
    torch.testing.assert_close(n, n_ref)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(TypeError, match="pass the model rather than model.parameters"):
        moesaic.clip_grad_norm_(b.parameters(), 0.01)


def test_one_process_parallelized_model_pickles():
    """Only process groups cannot be pickled: torch.save of a one-process run's model works."""
    import io
    model = moesaic.parallelize(moesaic.MoE(8, 16, 4))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    x = torch.randn(5, 8)
    torch.testing.assert_close(again(x)[0], model(x)[0])


def test_alltoall_volume_formula():
    # dropless: k * T * D * bytes * (ep - 1) / ep
    assert volume.alltoall_bytes_per_rank(1000, 512, 2, 4, 2) == 2 * 1000 * 512 * 2 * 3 / 4
    # capacity: E * ceil(cf * k * T / E) rows
    assert volume.alltoall_bytes_per_rank(1000, 512, 1, 8, 4, 8, 1.25) == 8 * 157 * 512 * 4 * 7 / 8
    assert volume.predicted_alltoall_seconds(1e9, 1) == 0.0
    t8 = volume.predicted_alltoall_seconds(150e9, 8, latency_s=0)  # all on one node
    assert t8 == pytest.approx(1.0)


def test_dedup_volume_model():
    """Distinct ranks per token under balanced routing, checked against counting every choice
    of k experts; with one group per rank and per token, a token crosses once."""
    from itertools import combinations

    for E, ep, k in ((8, 2, 2), (8, 4, 3), (16, 4, 4)):
        per = E // ep
        choices = list(combinations(range(E), k))
        mean = sum(len({e // per for e in c}) for c in choices) / len(choices)
        assert volume.ranks_per_token(E, ep, k) == pytest.approx(mean)
    assert volume.ranks_per_token(8, 2, 2, topk_groups=1) == 1.0
    assert volume.ranks_per_token(64, 8, 1) == pytest.approx(1.0)
    for bad in ((8, 8, 2, 1), (8, 2, 9, None), (8, 4, 2, 9), (10, 4, 2, None)):
        with pytest.raises(ValueError, match="no such routing"):
            volume.ranks_per_token(*bad)
    plain = volume.alltoall_bytes_per_rank(2048, 256, 4, 2, 4)
    ratio = volume.dedup_bytes_per_rank(2048, 256, 4, 2, 8, 4, topk_groups=1) / plain
    assert ratio == pytest.approx(0.25 + 4 * 4 / (4 * 256 * 4), rel=1e-6)  # 1/k + columns


def test_parallelize_attaches_again_after_release():
    """After destroy() released a model's parallel state, parallelize installs a new one (it
    used to return early and would have left the model without gradient sync)."""
    model = moesaic.MoE(8, 16, 2)
    first = moesaic.parallelize(model).moesaic_parallel
    assert moesaic.parallelize(model).moesaic_parallel is first
    moesaic.destroy()
    assert first.released
    second = moesaic.parallelize(model).moesaic_parallel
    assert second is not first and not second.released


def test_volume_command_plans_a_layer(capsys):
    """``python -m moesaic.parallel.volume --tokens ...`` prints one layer's bytes and times,
    plain and deduplicated; without sizes, the docs' tables; bad sizes are an error."""
    volume.main(["--tokens", "8192", "--experts", "256", "--top-k", "8", "--ep", "64",
                 "--topk-groups", "4"])
    out = capsys.readouterr().out
    plain = volume.alltoall_bytes_per_rank(8192, 4096, 8, 64, 2)
    assert f"{plain / 1e6:9.2f} MB" in out and "dedup_tokens" in out and "4 of 64 groups" in out
    volume.main(["--tokens", "8192", "--capacity-factor", "1.25"])
    assert "dedup_tokens" not in capsys.readouterr().out  # capacity mode: not deduplicated
    volume.main([])
    assert capsys.readouterr().out.startswith("| GPUs (= ep = E) |")
    with pytest.raises(SystemExit):
        volume.main(["--tokens", "10", "--experts", "10", "--ep", "4"])
    assert "--experts (10) is not divisible by --ep (4)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        volume.main(["--tokens", "100", "--experts", "8", "--ep", "8", "--topk-groups", "1"])
    assert "--top-k (2) must be at most the experts of --topk-groups (1)" in capsys.readouterr().err


def test_global_count_sum_after_destroy_says_what_to_do():
    """A released CountSum (moesaic.destroy) names the option and the way out, instead of the
    split-experts message."""
    from moesaic.parallel.comm import CountSum

    count_sum = CountSum(object(), (0, 1))
    count_sum.release()
    for call in (lambda: count_sum(torch.zeros(4, dtype=torch.int64)),
                 lambda: count_sum.gather(torch.zeros(2, 4, dtype=torch.int64))):
        with pytest.raises(RuntimeError, match="capacity_scope='global' count expert loads.*"
                           "scope 'batch'"):
            call()


def test_failed_collective_names_the_likely_causes():
    """A failed collective says what and among which ranks; under equal_batches it names the
    second cause (unequal token counts) after the first (a peer that died or stalled)."""
    from moesaic.parallel.comm import CommError, run_collective

    def broken():
        raise RuntimeError("Connection closed by peer\nmore")

    for what, also in (("MoE dispatch all-to-all", False),
                       ("MoE dispatch all-to-all (capacity block) under equal_batches", True)):
        with pytest.raises(CommError) as e:
            run_collective(what, [0, 1], broken)
        msg = str(e.value)
        assert msg.startswith(f"moesaic: {what} among ranks [0, 1] failed on rank 0: a peer rank "
                              "probably died")
        assert "(RuntimeError: Connection closed by peer)" in msg
        assert ("leave equal_batches for ragged batches" in msg) == also

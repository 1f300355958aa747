"""Memory stays O(T * K * D): no one-hot or dense [T, E, C] dispatch tensors anywhere; the
experts keep one [N, F] activation and work in blocks of one expert's rows."""
import pytest
import torch

import moesaic
from moesaic.memtrack import LiveMemory, peak_extra_bytes

# Legend: T tokens, D model dim, F ffn dim, E experts, C capacity.


def peak_extra(layer, x):
    def step():
        y, aux = layer(x)
        (y.square().mean() + aux).backward()
    return peak_extra_bytes(layer, step)


def test_live_memory_counts_tensors():
    with LiveMemory() as mem:
        a = torch.empty(1024, 256)
        b = a * 2
        del a, b
        torch.empty(10)
    assert mem.peak_bytes == 2 * 1024 * 256 * 4


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_memory_does_not_grow_with_experts_times_capacity(router):
    T, D, F, E = 2048, 32, 64, 64
    torch.manual_seed(0)
    top_k = 2 if router == "token_choice" else 1  # expert choice: cf 2.0 is 2 experts per token
    layer = moesaic.MoE(D, F, E, top_k=top_k, capacity_factor=2.0, router=router)
    extra = peak_extra(layer, torch.randn(T, D))
    one_hot_TEC = T * E * (2 * 2 * T // E) * 4
    per_assignment = 2 * T * (3 * D + 2 * F) * 4
    router_TE = 8 * T * E * 4  # logits, probabilities and their gradients
    assert extra < per_assignment + router_TE
    assert extra < one_hot_TEC / 10


def test_memory_linear_in_tokens():
    torch.manual_seed(0)
    layer = moesaic.MoE(32, 64, 8, top_k=2, drop_tokens=False)
    small, large = (peak_extra(layer, torch.randn(T, 32)) for T in (1024, 4096))
    assert large < 4.5 * small


@pytest.mark.parametrize("activation, saved_NF, work_MF", [("gelu", 1, 2), ("swiglu", 2, 4)])
def test_experts_hold_one_ffn_activation_plus_one_expert_of_work(activation, saved_NF, work_MF):
    """The grouped FFN saves the pre-activation ([N, F], twice for swiglu) and otherwise works in
    [M, F] buffers of the busiest expert, reused by every expert: no further [N, F] tensor."""
    T, D, F, E = 1024, 16, 1024, 4
    torch.manual_seed(0)
    layer = moesaic.MoE(D, F, E, drop_tokens=False, activation=activation)
    x = torch.randn(T, D, requires_grad=True)
    extra = peak_extra(layer, x)
    max_M = int(layer.last_stats.tokens_per_expert_kept.max())
    bound = (saved_NF * T + work_MF * max_M) * F * 4 + 16 * T * D * 4
    assert extra < bound
    assert extra > saved_NF * T * F * 4


def test_live_memory_does_not_count_views_or_in_place_results_of_older_tensors():
    w = torch.randn(256, 256)
    with LiveMemory() as mem:
        w.t()
        w[0]
        w.add_(1.0)
        torch.add(w, 1.0, out=w)
        torch.randn(16, 16).max(dim=0)  # a tuple of fresh results
    assert mem.peak_bytes == 16 * 16 * 4 + 16 * 4 + 16 * 8


def test_batched_ffn_skewed_counts_do_not_pad_every_expert():
    """The CUDA paths' padded bmm would hold E x max rows: with every row on one of 32 experts
    ``batched_ffn`` takes the loop instead (run here on CPU tensors, same code)."""
    from moesaic.experts import batched_ffn, grouped_ffn
    E, N, D, F = 32, 2048, 16, 64
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(E, D, F, generator=g), torch.randn(E, F, generator=g),
              torch.randn(E, F, D, generator=g), torch.randn(E, D, generator=g), None]
    for p in params[:4]:
        p.requires_grad_(True)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    counts = torch.tensor([N] + [0] * (E - 1))
    with LiveMemory() as mem:
        y = batched_ffn(x, counts, "gelu", *params)
        y.sum().backward()
    padded_EMF = E * N * F * 4
    assert mem.peak_bytes < padded_EMF / 4
    torch.testing.assert_close(y, grouped_ffn(x, [N] + [0] * (E - 1), "gelu", *params))

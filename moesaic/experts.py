"""Batched expert weights and the grouped feed-forward over an expert-major buffer.

``Experts`` holds the weights of this process's experts as stacked tensors ``w1_EDF`` etc.
The grouped FFN is one autograd function: forward runs each expert's two matrix products on its
contiguous rows; backward recomputes the activation from the saved pre-activation instead of
storing it, so the saved state is x_ND and h_NF only.

On CUDA the experts run as grouped matrix products instead of a loop over experts:
``torch._grouped_mm`` (one launch per product for all experts; bf16 on compute capability 9.0+,
feature dimensions multiples of 8), otherwise a padded ``bmm`` over [E, max rows, D]. The CPU
path is the loop above.

Legend: E local experts, D model dim, F ffn dim, N rows of the expert-major buffer.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def _act(name: str, h: Tensor, u: Optional[Tensor]) -> Tensor:
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return F.relu(h)
    return F.silu(h) * u


def _act_backward(name: str, grad_a: Tensor, h: Tensor, u: Optional[Tensor]):
    """Gradients of the activation w.r.t. h (and u for swiglu)."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad_a, h), None
    if name == "relu":
        return grad_a * (h > 0).to(grad_a.dtype), None
    sig = torch.sigmoid(h)
    silu = h * sig
    grad_h = grad_a * u * (sig * (1 + h * (1 - sig)))
    return grad_h, grad_a * silu


def _bounds(counts_E: Sequence[int]):
    start = 0
    for e, n in enumerate(counts_E):
        yield e, start, start + n
        start += n


class _GroupedFFN(torch.autograd.Function):
    """y_ND rows of expert e = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e] (swiglu: gated by w3)."""

    @staticmethod
    def forward(ctx, x_ND, counts, activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF):
        N = x_ND.shape[0]
        E, D, Fdim = w1_EDF.shape
        h_NF = x_ND.new_empty(N, Fdim)
        u_NF = x_ND.new_empty(N, Fdim) if w3_EDF is not None else None
        y_ND = x_ND.new_empty(N, w2_EFD.shape[2])
        for e, s, t in _bounds(counts):
            if s == t:
                continue
            x = x_ND[s:t]
            if b1_EF is not None:
                torch.addmm(b1_EF[e], x, w1_EDF[e], out=h_NF[s:t])
            else:
                torch.mm(x, w1_EDF[e], out=h_NF[s:t])
            if u_NF is not None:
                torch.mm(x, w3_EDF[e], out=u_NF[s:t])
            a = _act(activation, h_NF[s:t], None if u_NF is None else u_NF[s:t])
            if b2_ED is not None:
                torch.addmm(b2_ED[e], a, w2_EFD[e], out=y_ND[s:t])
            else:
                torch.mm(a, w2_EFD[e], out=y_ND[s:t])
        ctx.counts, ctx.activation = counts, activation
        ctx.has_b1, ctx.has_b2 = b1_EF is not None, b2_ED is not None
        ctx.save_for_backward(x_ND, h_NF, u_NF, w1_EDF, w2_EFD, w3_EDF)
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, h_NF, u_NF, w1_EDF, w2_EFD, w3_EDF = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        grad_x = torch.empty_like(x_ND)
        g_w1, g_w2 = torch.empty_like(w1_EDF), torch.empty_like(w2_EFD)
        g_w3 = torch.empty_like(w3_EDF) if w3_EDF is not None else None
        E, Fdim = w1_EDF.shape[0], w1_EDF.shape[2]
        g_b1 = x_ND.new_empty(E, Fdim) if ctx.has_b1 else None
        g_b2 = x_ND.new_empty(E, w2_EFD.shape[2]) if ctx.has_b2 else None
        for e, s, t in _bounds(ctx.counts):
            if s == t:
                for g in (g_w1, g_w2, g_w3, g_b1, g_b2):
                    if g is not None:
                        g[e].zero_()
                continue
            gy, h = grad_ND[s:t], h_NF[s:t]
            u = None if u_NF is None else u_NF[s:t]
            a = _act(ctx.activation, h, u)
            torch.mm(a.t(), gy, out=g_w2[e])
            if g_b2 is not None:
                torch.sum(gy, 0, out=g_b2[e])
            grad_h, grad_u = _act_backward(ctx.activation, gy @ w2_EFD[e].t(), h, u)
            x = x_ND[s:t]
            torch.mm(x.t(), grad_h, out=g_w1[e])
            if g_b1 is not None:
                torch.sum(grad_h, 0, out=g_b1[e])
            torch.mm(grad_h, w1_EDF[e].t(), out=grad_x[s:t])
            if grad_u is not None:
                torch.mm(x.t(), grad_u, out=g_w3[e])
                grad_x[s:t].addmm_(grad_u, w3_EDF[e].t())
        return grad_x, None, None, g_w1, g_b1, g_w2, g_b2, g_w3


def grouped_ffn(x_ND: Tensor, counts: Sequence[int], activation: str, w1_EDF: Tensor,
                b1_EF: Optional[Tensor], w2_EFD: Tensor, b2_ED: Optional[Tensor],
                w3_EDF: Optional[Tensor] = None) -> Tensor:
    """The experts' FFN on an expert-major buffer with ``counts[e]`` rows for expert e."""
    return _GroupedFFN.apply(x_ND, list(counts), activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF)


def _segment_sum(v_NX: Tensor, counts_E: Tensor) -> Tensor:
    """Per-expert sums of consecutive rows, in float32 (deterministic, no atomics)."""
    return torch.segment_reduce(v_NX.float(), "sum", lengths=counts_E, axis=0)


def _zero_empty(g_EXY: Tensor, counts_E: Tensor) -> Tensor:
    """Weight gradients of experts with no rows are zero whatever the grouped kernel left."""
    return g_EXY.masked_fill_((counts_E == 0).view(-1, 1, 1), 0)


_grouped_wgrad_failed = False


def _weight_grad(a_NX: Tensor, g_NY: Tensor, offs_E: Tensor, counts_E: Tensor) -> Tensor:
    """Per-expert a_e^T @ g_e as [E, X, Y]: one grouped product splitting the contraction
    dimension, or a loop over experts where this torch build rejects that form."""
    global _grouped_wgrad_failed
    if not _grouped_wgrad_failed:
        try:
            return _zero_empty(torch._grouped_mm(a_NX.t(), g_NY, offs=offs_E), counts_E)
        except RuntimeError:
            _grouped_wgrad_failed = True
    out = a_NX.new_zeros(counts_E.numel(), a_NX.shape[1], g_NY.shape[1])
    for e, s, t in _bounds(counts_E.tolist()):
        if s < t:
            torch.mm(a_NX[s:t].t(), g_NY[s:t], out=out[e])
    return out


class _GroupedMMFFN(torch.autograd.Function):
    """The grouped FFN with every product one ``torch._grouped_mm`` over all experts."""

    @staticmethod
    def forward(ctx, x_ND, counts_E, activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF):
        mm = torch._grouped_mm
        E = w1_EDF.shape[0]
        x_ND = x_ND.contiguous()
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        row_expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E,
                                               output_size=x_ND.shape[0])
        h_NF = mm(x_ND, w1_EDF, offs=offs_E)
        if b1_EF is not None:
            h_NF = h_NF + b1_EF.index_select(0, row_expert_N)
        u_NF = mm(x_ND, w3_EDF, offs=offs_E) if w3_EDF is not None else None
        y_ND = mm(_act(activation, h_NF, u_NF), w2_EFD, offs=offs_E)
        if b2_ED is not None:
            y_ND = y_ND + b2_ED.index_select(0, row_expert_N)
        ctx.activation = activation
        ctx.has_b1, ctx.has_b2 = b1_EF is not None, b2_ED is not None
        ctx.save_for_backward(x_ND, h_NF, u_NF, counts_E, offs_E, w1_EDF, w2_EFD, w3_EDF)
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        mm = torch._grouped_mm
        x_ND, h_NF, u_NF, counts_E, offs_E, w1_EDF, w2_EFD, w3_EDF = ctx.saved_tensors
        gy_ND = grad_ND.contiguous()
        a_NF = _act(ctx.activation, h_NF, u_NF)
        g_w2 = _weight_grad(a_NF, gy_ND, offs_E, counts_E)
        g_b2 = _segment_sum(gy_ND, counts_E).to(gy_ND.dtype) if ctx.has_b2 else None
        grad_a = mm(gy_ND, w2_EFD.transpose(1, 2), offs=offs_E)
        grad_h, grad_u = _act_backward(ctx.activation, grad_a, h_NF, u_NF)
        grad_h = grad_h.contiguous()
        g_w1 = _weight_grad(x_ND, grad_h, offs_E, counts_E)
        g_b1 = _segment_sum(grad_h, counts_E).to(grad_h.dtype) if ctx.has_b1 else None
        grad_x = mm(grad_h, w1_EDF.transpose(1, 2), offs=offs_E)
        g_w3 = None
        if grad_u is not None:
            grad_u = grad_u.contiguous()
            g_w3 = _weight_grad(x_ND, grad_u, offs_E, counts_E)
            grad_x = grad_x + mm(grad_u, w3_EDF.transpose(1, 2), offs=offs_E)
        return grad_x, None, None, g_w1, g_b1, g_w2, g_b2, g_w3


def padded_bmm_ffn(x_ND: Tensor, counts_E: Tensor, activation: str, w1_EDF: Tensor,
                   b1_EF: Optional[Tensor], w2_EFD: Tensor, b2_ED: Optional[Tensor],
                   w3_EDF: Optional[Tensor] = None) -> Tensor:
    """The grouped FFN as batched products over rows padded to the busiest expert's count.

    Padding rows are zero inputs whose outputs are never read, so they add no gradient.
    """
    E = w1_EDF.shape[0]
    N, D = x_ND.shape
    M = int(counts_E.max()) if N else 0
    row_expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E,
                                           output_size=N)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    pos_N = torch.arange(N, device=x_ND.device) - start_E.index_select(0, row_expert_N)
    x_EMD = x_ND.new_zeros(E, M, D).index_put((row_expert_N, pos_N), x_ND)
    h_EMF = torch.bmm(x_EMD, w1_EDF)
    if b1_EF is not None:
        h_EMF = h_EMF + b1_EF.unsqueeze(1)
    u_EMF = torch.bmm(x_EMD, w3_EDF) if w3_EDF is not None else None
    y_EMD = torch.bmm(_act(activation, h_EMF, u_EMF), w2_EFD)
    if b2_ED is not None:
        y_EMD = y_EMD + b2_ED.unsqueeze(1)
    return y_EMD[row_expert_N, pos_N]


_grouped_mm_failed = False


def grouped_mm_supported(x_ND: Tensor, w1_EDF: Tensor) -> bool:
    """``torch._grouped_mm`` runs fast here: bf16 on a CUDA card of capability 9.0 or newer."""
    if _grouped_mm_failed or not hasattr(torch, "_grouped_mm") or not x_ND.is_cuda:
        return False
    D, Fdim = w1_EDF.shape[1], w1_EDF.shape[2]
    return (x_ND.dtype == torch.bfloat16 and D % 8 == 0 and Fdim % 8 == 0
            and torch.cuda.get_device_capability(x_ND.device) >= (9, 0))


def batched_ffn(x_ND: Tensor, counts_E: Tensor, activation: str, w1_EDF: Tensor,
                b1_EF: Optional[Tensor], w2_EFD: Tensor, b2_ED: Optional[Tensor],
                w3_EDF: Optional[Tensor] = None, path: str = "auto") -> Tensor:
    """The grouped FFN through ``torch._grouped_mm`` (``path="grouped_mm"``) or padded
    ``bmm`` (``"bmm"``); ``"auto"`` takes grouped_mm where supported and falls back to bmm
    if it raises."""
    global _grouped_mm_failed
    args = (x_ND, counts_E, activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF)
    if path == "grouped_mm":
        return _GroupedMMFFN.apply(*args)
    if path == "auto" and grouped_mm_supported(x_ND, w1_EDF):
        try:
            return _GroupedMMFFN.apply(*args)
        except RuntimeError:
            _grouped_mm_failed = True
    return padded_bmm_ffn(*args)


def _expert_generator(layer_seed: int, global_id: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((layer_seed * 1_000_003 + global_id * 7_919 + 1) % (2**63 - 1))
    return g


class Experts(nn.Module):
    """The local experts' weights, stacked: ``w1`` [E, D, F], ``b1`` [E, F], ``w2`` [E, F, D],
    ``b2`` [E, D]; swiglu adds ``w3`` [E, D, F] and has no biases.

    Each expert is initialised from its own generator, seeded by (layer seed, global expert id),
    so a global expert has the same weights whichever rank holds it.
    """

    def __init__(self, d_model: int, d_ff: int, global_ids: Sequence[int], activation: str = "gelu",
                 bias: bool = True, layer_seed: int = 0):
        super().__init__()
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.cuda_path = "auto"
        self.global_ids = list(global_ids)
        E = len(self.global_ids)
        bias = bias and activation != "swiglu"
        self.w1 = nn.Parameter(torch.empty(E, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(E, d_ff, d_model))
        self.b1 = nn.Parameter(torch.empty(E, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, d_model)) if bias else None
        self.w3 = nn.Parameter(torch.empty(E, d_model, d_ff)) if activation == "swiglu" else None
        self.reset_parameters(layer_seed)

    @property
    def num_local_experts(self) -> int:
        return len(self.global_ids)

    @torch.no_grad()
    def reset_parameters(self, layer_seed: int) -> None:
        """nn.Linear's default init, expert by expert, from per-expert generators."""
        bound_in, bound_hidden = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        for e, gid in enumerate(self.global_ids):
            g = _expert_generator(layer_seed, gid)
            pairs = [(self.w1, bound_in), (self.b1, bound_in), (self.w3, bound_in),
                     (self.w2, bound_hidden), (self.b2, bound_hidden)]
            for p, bound in pairs:
                if p is not None:
                    vals = torch.rand(p[e].shape, generator=g, dtype=torch.float32)
                    p[e].copy_((vals * 2 - 1) * bound)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Run expert e on its ``counts_E[e]`` contiguous rows; weights cast to x's dtype.

        CUDA tensors take the batched path chosen by ``self.cuda_path`` ("auto", "grouped_mm",
        "bmm", or "loop" for the per-expert loop)."""
        dtype = x_ND.dtype
        params = [None if p is None else p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2, self.w3)]
        if x_ND.is_cuda and self.cuda_path != "loop":
            counts_t = torch.as_tensor(counts_E, dtype=torch.int64, device=x_ND.device)
            return batched_ffn(x_ND, counts_t, self.activation, *params, path=self.cuda_path)
        counts = counts_E.tolist() if isinstance(counts_E, Tensor) else list(counts_E)
        return grouped_ffn(x_ND, counts, self.activation, *params)

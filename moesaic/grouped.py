"""The grouped feed-forward over an expert-major buffer: a loop of per-expert products.

One autograd function: forward runs each expert's two matrix products on its contiguous rows;
backward recomputes the activation from the saved pre-activation instead of storing it, so the
saved state is x_ND and h_NF only (and the gate's u_NF for swiglu). This is the CPU path and the reference for the CUDA paths.

Legend: E local experts, D model dim, F ffn dim, N rows of the expert-major buffer,
M rows of one expert.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _act(name: str, h: Tensor, u: Optional[Tensor]) -> Tensor:
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return F.relu(h)
    return F.silu(h) * u


def _act_backward(name: str, grad_a: Tensor, h: Tensor, u: Optional[Tensor],
                  silu_h: Optional[Tensor] = None):
    """Gradients of the activation w.r.t. h (and u for swiglu), with fused aten kernels.

    For swiglu, ``silu_h`` (silu(h), if the caller already has it) is reused, and ``grad_a`` is
    overwritten with the gradient of u.
    """
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad_a, h), None
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad_a, h, 0), None
    grad_h = torch.ops.aten.silu_backward(grad_a * u, h)
    return grad_h, grad_a.mul_(F.silu(h) if silu_h is None else silu_h)


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
        Fdim = w1_EDF.shape[2]
        h_NF = x_ND.new_empty(N, Fdim)
        u_NF = x_ND.new_empty(N, Fdim) if w3_EDF is not None else None
        y_ND = x_ND.new_empty(N, w2_EFD.shape[2])
        for e, s, t in _bounds(counts):
            if s == t:
                continue
            x_MD = x_ND[s:t]
            if b1_EF is not None:
                torch.addmm(b1_EF[e], x_MD, w1_EDF[e], out=h_NF[s:t])
            else:
                torch.mm(x_MD, w1_EDF[e], out=h_NF[s:t])
            if u_NF is not None:
                torch.mm(x_MD, w3_EDF[e], out=u_NF[s:t])
            a_MF = _act(activation, h_NF[s:t], None if u_NF is None else u_NF[s:t])
            if b2_ED is not None:
                torch.addmm(b2_ED[e], a_MF, w2_EFD[e], out=y_ND[s:t])
            else:
                torch.mm(a_MF, w2_EFD[e], out=y_ND[s:t])
        ctx.counts, ctx.activation = counts, activation
        ctx.has_b1, ctx.has_b2 = b1_EF is not None, b2_ED is not None
        ctx.save_for_backward(x_ND, h_NF, u_NF, w1_EDF, w2_EFD, w3_EDF)
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, h_NF, u_NF, w1_EDF, w2_EFD, w3_EDF = ctx.saved_tensors
        grad_ND = grad_ND.contiguous()
        grad_x_ND = torch.empty_like(x_ND) if ctx.needs_input_grad[0] else None
        g_w1_EDF, g_w2_EFD = torch.empty_like(w1_EDF), torch.empty_like(w2_EFD)
        g_w3_EDF = torch.empty_like(w3_EDF) if w3_EDF is not None else None
        E, Fdim = w1_EDF.shape[0], w1_EDF.shape[2]
        g_b1_EF = x_ND.new_empty(E, Fdim) if ctx.has_b1 else None
        g_b2_ED = x_ND.new_empty(E, w2_EFD.shape[2]) if ctx.has_b2 else None
        for e, s, t in _bounds(ctx.counts):
            if s == t:
                for g in (g_w1_EDF, g_w2_EFD, g_w3_EDF, g_b1_EF, g_b2_ED):
                    if g is not None:
                        g[e].zero_()
                continue
            gy_MD, h_MF = grad_ND[s:t], h_NF[s:t]
            u_MF = None if u_NF is None else u_NF[s:t]
            silu_h_MF = F.silu(h_MF) if u_MF is not None else None
            a_MF = silu_h_MF * u_MF if u_MF is not None else _act(ctx.activation, h_MF, None)
            torch.mm(a_MF.t(), gy_MD, out=g_w2_EFD[e])
            if g_b2_ED is not None:
                torch.sum(gy_MD, 0, out=g_b2_ED[e])
            grad_h_MF, grad_u_MF = _act_backward(ctx.activation, gy_MD @ w2_EFD[e].t(), h_MF, u_MF,
                                                 silu_h_MF)
            x_MD = x_ND[s:t]
            torch.mm(x_MD.t(), grad_h_MF, out=g_w1_EDF[e])
            if g_b1_EF is not None:
                torch.sum(grad_h_MF, 0, out=g_b1_EF[e])
            if grad_x_ND is not None:
                torch.mm(grad_h_MF, w1_EDF[e].t(), out=grad_x_ND[s:t])
            if grad_u_MF is not None:
                torch.mm(x_MD.t(), grad_u_MF, out=g_w3_EDF[e])
                if grad_x_ND is not None:
                    grad_x_ND[s:t].addmm_(grad_u_MF, w3_EDF[e].t())
        return grad_x_ND, None, None, g_w1_EDF, g_b1_EF, g_w2_EFD, g_b2_ED, g_w3_EDF


def grouped_ffn(x_ND: Tensor, counts: Sequence[int], activation: str, w1_EDF: Tensor,
                b1_EF: Optional[Tensor], w2_EFD: Tensor, b2_ED: Optional[Tensor],
                w3_EDF: Optional[Tensor] = None) -> Tensor:
    """The experts' FFN on an expert-major buffer with ``counts[e]`` rows for expert e."""
    return _GroupedFFN.apply(x_ND, list(counts), activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF)

"""The grouped feed-forward over an expert-major buffer: a loop of per-expert products.

One autograd function: forward runs each expert's two matrix products on its contiguous rows;
backward recomputes the activation from the saved pre-activation instead of storing it, so the
saved state is x_ND and the pre-activation h (and the up-projection u for swiglu), one [M, F]
tensor per expert. The activation and its gradient live in one [M, F] work buffer reused by
every expert (swiglu's backward adds a second, for the gradient of u). Hidden dropout
(``keys_N`` given, probability ``p``) scales the activation by a mask that the backward
regenerates from the rows' keys (:mod:`moesaic.hidden_dropout`).
Why blocks of one expert's rows: the allocator recycles blocks of that size, while every fresh
[T, F] tensor of tens of MiB is mapped and page-faulted anew (the dense FFN allocates four per
step), and elementwise passes over one expert's rows stay in cache. This is the CPU path and
the reference for the CUDA paths.

Legend: E local experts, D model dim, F ffn dim, N rows of the expert-major buffer,
M rows of one expert.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import first_order, fresh
from .hidden_dropout import drop_


def _act(name: str, h: Tensor, u: Optional[Tensor]) -> Tensor:
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return F.relu(h)
    return F.silu(h) * u


def _act_into(name: str, h: Tensor, u: Optional[Tensor], out: Tensor) -> Tensor:
    """act(h) (swiglu: silu(h) * u) written into ``out``, which has h's shape."""
    if name == "gelu":
        return torch.ops.aten.gelu.out(h, out=out)
    if name == "relu":
        return torch.clamp_min(h, 0, out=out)
    return torch.ops.aten.silu.out(h, out=out).mul_(u)


def _act_backward_(name: str, grad_a: Tensor, h: Tensor, u: Optional[Tensor],
                   grad_u_out: Optional[Tensor] = None):
    """Gradients of the activation w.r.t. h (and u for swiglu) with fused aten kernels; the
    gradient of h is written over ``grad_a``, the gradient of u into ``grad_u_out`` if given."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad_a, h, grad_input=grad_a), None
    if name == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad_a, h, 0, grad_input=grad_a), None
    if grad_u_out is None:
        grad_u_out = torch.empty_like(h)
    grad_u = torch.ops.aten.silu.out(h, out=grad_u_out).mul_(grad_a)
    return torch.ops.aten.silu_backward.grad_input(grad_a.mul_(u), h, grad_input=grad_a), grad_u


def _bounds(counts_E: Sequence[int]):
    start = 0
    for e, n in enumerate(counts_E):
        yield e, start, start + n
        start += n


def _drop_(a_MF: Tensor, keys_N: Optional[Tensor], p: float, s: int, t: int) -> Tensor:
    """Hidden dropout of a_MF (rows s:t of the buffer) in place; a_MF itself without keys."""
    return a_MF if keys_N is None else drop_(a_MF, keys_N[s:t], p)


class _GroupedFFN(torch.autograd.Function):
    """y_ND rows of expert e = drop(act(x @ w1[e] + b1[e])) @ w2[e] + b2[e]; swiglu: the
    activation is silu(x @ w1[e]) * (x @ w3[e]), without biases; drop: hidden dropout when
    ``keys_N`` is given."""

    @staticmethod
    def forward(ctx, x_ND, counts, activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF, keys_N, p):
        N, Fdim = x_ND.shape[0], w1_EDF.shape[2]
        h_chunks = [x_ND.new_empty(n, Fdim) for n in counts]
        u_chunks = [x_ND.new_empty(n, Fdim) for n in counts] if w3_EDF is not None else []
        y_ND = x_ND.new_empty(N, w2_EFD.shape[2])
        work_MF = x_ND.new_empty(max(counts) if counts else 0, Fdim)  # activation, expert by expert
        for e, s, t in _bounds(counts):
            if s == t:
                continue
            x_MD = x_ND[s:t]
            h_MF, u_MF = h_chunks[e], u_chunks[e] if u_chunks else None
            if b1_EF is not None:
                torch.addmm(b1_EF[e], x_MD, w1_EDF[e], out=h_MF)
            else:
                torch.mm(x_MD, w1_EDF[e], out=h_MF)
            if u_MF is not None:
                torch.mm(x_MD, w3_EDF[e], out=u_MF)
            a_MF = _drop_(_act_into(activation, h_MF, u_MF, work_MF[:t - s]), keys_N, p, s, t)
            if b2_ED is not None:
                torch.addmm(b2_ED[e], a_MF, w2_EFD[e], out=y_ND[s:t])
            else:
                torch.mm(a_MF, w2_EFD[e], out=y_ND[s:t])
        ctx.counts, ctx.activation, ctx.p = counts, activation, p
        ctx.has_b1, ctx.has_b2 = b1_EF is not None, b2_ED is not None
        ctx.save_for_backward(x_ND, w1_EDF, w2_EFD, w3_EDF, keys_N, *h_chunks, *u_chunks)
        return fresh(y_ND)

    @staticmethod
    @first_order
    def backward(ctx, grad_ND):
        x_ND, w1_EDF, w2_EFD, w3_EDF, keys_N, *chunks = ctx.saved_tensors
        E = len(ctx.counts)
        h_chunks, u_chunks = chunks[:E], chunks[E:]
        grad_ND = grad_ND.contiguous()
        need = ctx.needs_input_grad  # frozen weights (requires_grad False) get no products
        grad_x_ND = torch.empty_like(x_ND) if need[0] else None
        g_w1_EDF = torch.empty_like(w1_EDF) if need[3] else None
        g_w2_EFD = torch.empty_like(w2_EFD) if need[5] else None
        g_w3_EDF = torch.empty_like(w3_EDF) if w3_EDF is not None and need[7] else None
        Fdim = w1_EDF.shape[2]
        g_b1_EF = x_ND.new_empty(E, Fdim) if ctx.has_b1 and need[4] else None
        g_b2_ED = x_ND.new_empty(E, w2_EFD.shape[2]) if ctx.has_b2 and need[6] else None
        work_MF = x_ND.new_empty(max(ctx.counts) if ctx.counts else 0, Fdim)  # a, then its gradient
        work_u_MF = torch.empty_like(work_MF) if w3_EDF is not None else None  # u's gradient
        for e, s, t in _bounds(ctx.counts):
            if s == t:
                for g in (g_w1_EDF, g_w2_EFD, g_w3_EDF, g_b1_EF, g_b2_ED):
                    if g is not None:
                        g[e].zero_()
                continue
            gy_MD, h_MF, x_MD = grad_ND[s:t], h_chunks[e], x_ND[s:t]
            u_MF = u_chunks[e] if u_chunks else None
            if g_w2_EFD is not None:
                a_MF = _act_into(ctx.activation, h_MF, u_MF, work_MF[:t - s])
                torch.mm(_drop_(a_MF, keys_N, ctx.p, s, t).t(), gy_MD, out=g_w2_EFD[e])
            if g_b2_ED is not None:
                torch.sum(gy_MD, 0, out=g_b2_ED[e])
            grad_a_MF = torch.mm(gy_MD, w2_EFD[e].t(), out=work_MF[:t - s])
            grad_a_MF = _drop_(grad_a_MF, keys_N, ctx.p, s, t)  # the same mask, regenerated
            grad_h_MF, grad_u_MF = _act_backward_(ctx.activation, grad_a_MF, h_MF, u_MF,
                                                  None if work_u_MF is None else work_u_MF[:t - s])
            if g_w1_EDF is not None:
                torch.mm(x_MD.t(), grad_h_MF, out=g_w1_EDF[e])
            if g_b1_EF is not None:
                torch.sum(grad_h_MF, 0, out=g_b1_EF[e])
            if grad_x_ND is not None:
                torch.mm(grad_h_MF, w1_EDF[e].t(), out=grad_x_ND[s:t])
            if grad_u_MF is not None:
                if g_w3_EDF is not None:
                    torch.mm(x_MD.t(), grad_u_MF, out=g_w3_EDF[e])
                if grad_x_ND is not None:
                    grad_x_ND[s:t].addmm_(grad_u_MF, w3_EDF[e].t())
        return grad_x_ND, None, None, g_w1_EDF, g_b1_EF, g_w2_EFD, g_b2_ED, g_w3_EDF, None, None


def grouped_ffn(x_ND: Tensor, counts: Sequence[int], activation: str, w1_EDF: Tensor,
                b1_EF: Optional[Tensor], w2_EFD: Tensor, b2_ED: Optional[Tensor],
                w3_EDF: Optional[Tensor] = None, keys_N: Optional[Tensor] = None,
                p: float = 0.0) -> Tensor:
    """The experts' FFN on an expert-major buffer with ``counts[e]`` rows for expert e; with
    ``keys_N`` (one int32 per row), hidden dropout of probability ``p`` after the activation."""
    return _GroupedFFN.apply(x_ND, list(counts), activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF,
                             keys_N if p > 0 else None, p)

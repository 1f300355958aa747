"""Dispatch and combine as token-centric Triton kernels (no atomics, deterministic).

Every kernel walks tokens: token t's K assignments sit at rows ``dest_TK[t]`` of the
expert-major buffer (-1 where dropped). Each kept row belongs to exactly one assignment, so
scatters never collide and gathers need no atomics.

- ``scatter_rows``: out_ND[dest_TK[t, k]] = x_TD[t] (* weight_TK[t, k]) -- dispatch forward and
  combine's gradient w.r.t. the expert outputs. Reads x once: T*D + N*D elements moved.
- ``gather_sum``: out_TD[t] = sum_k (weight_TK[t, k] *) y_ND[dest_TK[t, k]] -- combine forward
  and dispatch's backward, accumulated in float32. N*D + T*D elements moved.
- ``combine_backward``: both gradients of combine in one pass over grad_TD and y_ND:
  grad_y_ND[dest] = w * grad_TD[t] and grad_weight_TK[t, k] = <grad_TD[t], y_ND[dest]>.

Legend: T tokens, D model dim, K top-k, N rows of the expert-major buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..autograd import first_order, fresh

@triton.jit
def _scatter_rows_kernel(x_ptr, dest_ptr, w_ptr, out_ptr, D,
                         K: tl.constexpr, BD: tl.constexpr, HAS_W: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = cols < D
    x = tl.load(x_ptr + t * D + cols, mask=col_ok, other=0.0)
    for k in tl.static_range(K):
        d = tl.load(dest_ptr + t * K + k)
        v = x
        if HAS_W:
            v = (x.to(tl.float32) * tl.load(w_ptr + t * K + k)).to(x.dtype)
        kept = (tl.zeros([BD], dtype=tl.int64) + d) >= 0
        tl.store(out_ptr + tl.maximum(d, 0) * D + cols, v, mask=col_ok & kept)


@triton.jit
def _gather_sum_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, D,
                       K: tl.constexpr, BD: tl.constexpr, HAS_W: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = cols < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for k in tl.static_range(K):
        d = tl.load(dest_ptr + t * K + k)
        kept = (tl.zeros([BD], dtype=tl.int64) + d) >= 0
        row = tl.load(y_ptr + tl.maximum(d, 0) * D + cols, mask=col_ok & kept, other=0.0)
        row = row.to(tl.float32)
        if HAS_W:
            row = row * tl.load(w_ptr + t * K + k)
        acc += row
    tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _combine_backward_kernel(g_ptr, y_ptr, dest_ptr, w_ptr, gy_ptr, gw_ptr, D,
                             K: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr,
                             NB: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, KP)
    dots = tl.zeros([KP], dtype=tl.float32)
    for b in range(NB):  # NB = cdiv(D, BD) column blocks; a constexpr trip count
        cols = b * BD + tl.arange(0, BD)
        col_ok = cols < D
        g = tl.load(g_ptr + t * D + cols, mask=col_ok, other=0.0)
        g32 = g.to(tl.float32)
        for k in tl.static_range(K):
            d = tl.load(dest_ptr + t * K + k)
            w = tl.load(w_ptr + t * K + k)
            ok = col_ok & ((tl.zeros([BD], dtype=tl.int64) + d) >= 0)
            y = tl.load(y_ptr + tl.maximum(d, 0) * D + cols, mask=ok, other=0.0).to(tl.float32)
            dots = tl.where(ks == k, dots + tl.sum(g32 * y, 0), dots)
            tl.store(gy_ptr + tl.maximum(d, 0) * D + cols, (g32 * w).to(g.dtype), mask=ok)
    tl.store(gw_ptr + t * K + ks, dots, mask=ks < K)


def _row_launch(D: int, cap: int = 2048):
    BD = min(triton.next_power_of_2(max(D, 16)), cap)
    return BD, triton.cdiv(D, BD), (4 if BD <= 1024 else 8)


def scatter_rows(x_TD: Tensor, dest_TK: Tensor, weight_TK, num_rows: int) -> Tensor:
    T, D = x_TD.shape
    K = dest_TK.shape[1]
    out_ND = x_TD.new_empty(num_rows, D)
    if T == 0 or num_rows == 0:
        return out_ND
    BD, nd, warps = _row_launch(D)
    w = weight_TK if weight_TK is not None else dest_TK
    _scatter_rows_kernel[(T, nd)](x_TD, dest_TK, w, out_ND, D, K=K, BD=BD,
                                  HAS_W=weight_TK is not None, num_warps=warps)
    return out_ND


def gather_sum(y_ND: Tensor, dest_TK: Tensor, weight_TK) -> Tensor:
    T, K = dest_TK.shape
    D = y_ND.shape[1]
    out_TD = y_ND.new_empty(T, D)
    if T == 0:
        return out_TD
    BD, nd, warps = _row_launch(D)
    w = weight_TK if weight_TK is not None else dest_TK
    _gather_sum_kernel[(T, nd)](y_ND, dest_TK, w, out_TD, D, K=K, BD=BD,
                                HAS_W=weight_TK is not None, num_warps=warps)
    return out_TD


def combine_backward(grad_TD: Tensor, y_ND: Tensor, dest_TK: Tensor, weight_TK: Tensor):
    T, K = dest_TK.shape
    D = y_ND.shape[1]
    grad_y_ND = torch.empty_like(y_ND)
    grad_w_TK = torch.empty(T, K, dtype=torch.float32, device=y_ND.device)
    if T == 0:
        return grad_y_ND, grad_w_TK
    BD, nb, warps = _row_launch(D, cap=1024)
    _combine_backward_kernel[(T,)](grad_TD, y_ND, dest_TK, weight_TK, grad_y_ND, grad_w_TK, D,
                                   K=K, KP=triton.next_power_of_2(max(K, 2)), BD=BD, NB=nb,
                                   num_warps=warps)
    return grad_y_ND, grad_w_TK


class Permute(torch.autograd.Function):
    """x_ND[dest_TK[t, k]] = x_TD[t]; backward sums each token's rows back."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, dest_TK: Tensor, num_rows: int):
        ctx.save_for_backward(dest_TK)
        return fresh(scatter_rows(x_TD.contiguous(), dest_TK, None, num_rows))

    @staticmethod
    @first_order
    def backward(ctx, grad_ND: Tensor):
        (dest_TK,) = ctx.saved_tensors
        return gather_sum(grad_ND.contiguous(), dest_TK, None), None, None


class Combine(torch.autograd.Function):
    """y_TD[t] = sum_k weight_TK[t, k] * y_ND[dest_TK[t, k]] (dropped assignments skipped)."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_TK: Tensor, dest_TK: Tensor):
        y_ND = y_ND.contiguous()
        weight_TK = weight_TK.contiguous().float()
        ctx.save_for_backward(y_ND, weight_TK, dest_TK)
        return fresh(gather_sum(y_ND, dest_TK, weight_TK))

    @staticmethod
    @first_order
    def backward(ctx, grad_TD: Tensor):
        y_ND, weight_TK, dest_TK = ctx.saved_tensors
        grad_y, grad_w = combine_backward(grad_TD.contiguous(), y_ND, dest_TK, weight_TK)
        return (grad_y if ctx.needs_input_grad[0] else None,
                grad_w if ctx.needs_input_grad[1] else None, None)

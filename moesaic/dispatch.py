"""Dispatch tokens into expert-major order and combine expert outputs back (the PyTorch path).

``permute`` gathers token rows into the buffer the experts consume; ``combine`` adds each row,
times its combine weight, back to its token. Both move O(N * D) bytes; nothing is one-hot.
:class:`LocalDispatcher` is the single-process dispatcher; ``moesaic.parallel`` provides the
all-to-all one with the same interface, so layer code never changes with the parallel layout.

Legend: T tokens, D model dim, E experts, N rows of the expert-major buffer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .autograd import fresh
from .routing import RoutingPlan


def gather_sum(v_ND: Tensor, dest_TK: Tensor, scale_TK: Optional[Tensor] = None) -> Tensor:
    """out_TD[t] = sum_k scale_TK[t, k] * v_ND[dest_TK[t, k]], skipping dest = -1 (dropped).

    Token-centric: K row gathers, no scatter. On CPUs this is several times faster than the
    scatter-add (``index_add_``) over rows that it replaces, and it is deterministic. Without
    scales, the rows of dropped assignments are zeroed (one ``index_fill_`` per choice on the
    CPU, a mask on GPUs, where finding the rows would synchronise) instead of multiplying the
    whole gather by a 0/1 mask.
    """
    T, K = dest_TK.shape
    if v_ND.shape[0] == 0:
        return v_ND.new_zeros(T, v_ND.shape[1])
    idx_TK = dest_TK.clamp(min=0)
    if scale_TK is not None:
        scale_TK = torch.where(dest_TK >= 0, scale_TK, 0).to(v_ND.dtype)
    out_TD = None
    for k in range(K):
        part_TD = v_ND.index_select(0, idx_TK[:, k])
        if scale_TK is not None:
            part_TD.mul_(scale_TK[:, k:k + 1])
        elif v_ND.device.type == "cpu":
            part_TD.index_fill_(0, (dest_TK[:, k] < 0).nonzero().squeeze(1), 0)
        else:
            part_TD.masked_fill_(dest_TK[:, k:k + 1] < 0, 0)
        out_TD = part_TD if out_TD is None else out_TD.add_(part_TD)
    return out_TD


def row_dot(a_ND: Tensor, b_ND: Tensor, block: int = 512) -> Tensor:
    """out_N[n] = <a_ND[n], b_ND[n]> in float32 (float64 for float64 rows), a block of rows at a
    time on the CPU so that the elementwise product stays in cache instead of filling an [N, D]
    temporary (one block on GPUs, where each block costs kernel launches). When autograd records
    (e.g. a backward under ``create_graph``) it is one differentiable product and sum."""
    acc = torch.promote_types(a_ND.dtype, torch.float32)
    if torch.is_grad_enabled() and (a_ND.requires_grad or b_ND.requires_grad):
        return (a_ND.to(acc) * b_ND.to(acc)).sum(1)
    out_N = torch.empty(a_ND.shape[0], dtype=acc, device=a_ND.device)
    if a_ND.device.type != "cpu":
        block = max(a_ND.shape[0], 1)
    for s in range(0, a_ND.shape[0], block):
        torch.sum(a_ND[s:s + block].to(acc) * b_ND[s:s + block].to(acc), 1, out=out_N[s:s + block])
    return out_N


class _Permute(torch.autograd.Function):
    """x_ND[n] = x_TD[row_token_N[n]]; backward sums each token's rows back by gathering."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, row_token_N: Tensor, dest_TK: Optional[Tensor]):
        ctx.save_for_backward(row_token_N, dest_TK)
        ctx.num_tokens = x_TD.shape[0]
        return x_TD.index_select(0, row_token_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        row_token_N, dest_TK = ctx.saved_tensors
        if dest_TK is not None:
            return gather_sum(grad_ND, dest_TK), None, None
        grad_TD = grad_ND.new_zeros(ctx.num_tokens, grad_ND.shape[1])
        return grad_TD.index_add_(0, row_token_N, grad_ND), None, None


def permute(x_TD: Tensor, row_token_N: Tensor, dest_TK: Optional[Tensor] = None) -> Tensor:
    """Gather token rows into expert-major order: x_ND[n] = x_TD[row_token_N[n]].

    With ``dest_TK`` (token choice) the backward gathers instead of scatter-adding."""
    return _Permute.apply(x_TD, row_token_N, dest_TK)


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum over rows n of token t of weight_N[n] * y_ND[n] (weights in float32).

    Forward is token-centric when ``dest_TK``/``weight_TK`` are given (token choice), a
    scatter-add over rows otherwise (expert choice); backward gathers per row either way. The
    backward works in place for speed, and out of place (so it can itself be differentiated,
    e.g. for a gradient penalty) when it runs with ``create_graph=True``.
    """

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_N: Tensor, row_token_N: Tensor, num_tokens: int,
                dest_TK: Optional[Tensor], weight_TK: Optional[Tensor]):
        ctx.save_for_backward(y_ND, weight_N, row_token_N)
        if dest_TK is not None:
            return fresh(gather_sum(y_ND, dest_TK, weight_TK))
        out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
        return fresh(out_TD.index_add_(0, row_token_N, y_ND * weight_N.to(y_ND.dtype)
                                       .unsqueeze(1)))

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        y_ND, weight_N, row_token_N = ctx.saved_tensors
        grad_ND = grad_TD.index_select(0, row_token_N)
        grad_y = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = row_dot(grad_ND, y_ND).to(weight_N.dtype)
        if ctx.needs_input_grad[0]:
            w_N1 = weight_N.to(grad_ND.dtype).unsqueeze(1)
            # In place (grad_ND is ours) unless autograd records this backward.
            grad_y = grad_ND * w_N1 if torch.is_grad_enabled() else grad_ND.mul_(w_N1)
        return grad_y, grad_weight, None, None, None, None


def combine(y_ND: Tensor, plan: RoutingPlan) -> Tensor:
    """Weighted sum of each token's expert outputs, in token order ([T, D], y_ND's dtype)."""
    weight_TK = None if plan.weight_TK is None else plan.weight_TK.detach()
    return _Combine.apply(y_ND, plan.row_weight_N, plan.row_token_N, plan.num_tokens,
                          plan.dest_TK, weight_TK)


class LocalDispatcher:
    """Every expert lives in this process: dispatch and combine are a gather and a scatter.

    ``dispatch`` returns (x_ND, counts_E, handle); ``combine`` takes the handle back. The
    all-to-all dispatcher keeps its exchange sizes in the handle.
    """

    def dispatch(self, x_TD: Tensor, plan: RoutingPlan, ops):
        return ops.permute(x_TD, plan), plan.counts_E, None

    def send_keys(self, keys_N: Tensor, handle) -> Tensor:
        """Per-row keys (hidden dropout) where ``dispatch`` put the rows: already there."""
        return keys_N

    def combine(self, y_ND: Tensor, plan: RoutingPlan, handle, ops) -> Tensor:
        return ops.combine(y_ND, plan)

"""Dispatch tokens into expert-major order and combine expert outputs back (the PyTorch path).

``permute`` gathers token rows into the buffer the experts consume; ``combine`` adds each row,
times its combine weight, back to its token. Both move O(N * D) bytes; nothing is one-hot.
:class:`LocalDispatcher` is the single-process dispatcher; ``moesaic.parallel`` provides the
all-to-all one with the same interface, so layer code never changes with the parallel layout.

Legend: T tokens, D model dim, E experts, N rows of the expert-major buffer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .routing import RoutingPlan


def permute(x_TD: Tensor, row_token_N: Tensor) -> Tensor:
    """Gather token rows into expert-major order: x_ND[n] = x_TD[row_token_N[n]]."""
    return x_TD.index_select(0, row_token_N)


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum over rows n of token t of weight_N[n] * y_ND[n] (weights in float32)."""

    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_N: Tensor, row_token_N: Tensor, num_tokens: int):
        ctx.save_for_backward(y_ND, weight_N, row_token_N)
        out_TD = y_ND.new_zeros(num_tokens, y_ND.shape[1])
        return out_TD.index_add_(0, row_token_N, y_ND * weight_N.to(y_ND.dtype).unsqueeze(1))

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        y_ND, weight_N, row_token_N = ctx.saved_tensors
        grad_ND = grad_TD.index_select(0, row_token_N)
        grad_y = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_ND * weight_N.to(grad_ND.dtype).unsqueeze(1)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.linalg.vecdot(grad_ND.float(), y_ND.float()).to(weight_N.dtype)
        return grad_y, grad_weight, None, None


def combine(y_ND: Tensor, plan: RoutingPlan) -> Tensor:
    """Weighted sum of each token's expert outputs, in token order ([T, D], y_ND's dtype)."""
    return _Combine.apply(y_ND, plan.row_weight_N, plan.row_token_N, plan.num_tokens)


class LocalDispatcher:
    """Every expert lives in this process: dispatch and combine are a gather and a scatter.

    ``dispatch`` returns (x_ND, counts_E, handle); ``combine`` takes the handle back. The
    all-to-all dispatcher keeps its exchange sizes in the handle.
    """

    def dispatch(self, x_TD: Tensor, plan: RoutingPlan, ops):
        return ops.permute(x_TD, plan), plan.counts_E, None

    def combine(self, y_ND: Tensor, plan: RoutingPlan, handle, ops) -> Tensor:
        return ops.combine(y_ND, plan)

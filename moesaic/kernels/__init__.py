"""Fused Triton kernels for routing, dispatch and combine (an optional extra: needs Triton),
and :mod:`.bias_act`, the bias (+ activation) epilogue that :mod:`moesaic.grouped_cuda` adds to
its grouped products.

:class:`TritonOps` has the interface of :class:`moesaic.ops.TorchOps` and the same results:
the same plans (same row order) and the same gradients, up to float rounding. Expert-choice
plans (no ``dest_TK``) use the PyTorch dispatch and combine. On CPU tensors the kernels run
only under the Triton interpreter (``TRITON_INTERPRET=1``, set before this module is imported).
"""
from __future__ import annotations

from .. import dispatch
from .route import token_choice as _token_choice
from .rows import Combine, Permute


class TritonOps:
    name = "triton"

    @staticmethod
    def token_choice(logits_TE, top_k, capacity, drop_policy, normalize, bias_E=None,
                     score_func="softmax", groups=None, seq_len=None, position_T=None):
        return _token_choice(logits_TE, top_k, capacity, drop_policy, normalize, bias_E,
                             score_func, groups, seq_len, position_T)

    @staticmethod
    def permute(x_TD, plan):
        if plan.dest_TK is None:
            return dispatch.permute(x_TD, plan.row_token_N)
        return Permute.apply(x_TD, plan.dest_TK.contiguous(), plan.row_token_N.numel())

    @staticmethod
    def combine(y_ND, plan):
        if plan.dest_TK is None:
            return dispatch.combine(y_ND, plan)
        return Combine.apply(y_ND, plan.weight_TK, plan.dest_TK.contiguous())


__all__ = ["TritonOps"]

"""Backend selection: the PyTorch path or the fused Triton kernels, behind one interface.

An ops object has ``token_choice(logits_TE, top_k, capacity, drop_policy, normalize, bias_E,
score_func, groups, seq_len, position_T)``,
``permute(x_TD, plan)`` and ``combine(y_ND, plan)``, with the semantics of the PyTorch
functions in :mod:`moesaic.routing` and :mod:`moesaic.dispatch`.

Legend: T tokens, D model dim, E experts, N rows of the expert-major buffer.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import dispatch, routing


class TorchOps:
    name = "torch"

    @staticmethod
    def token_choice(logits_TE, top_k, capacity, drop_policy, normalize, bias_E=None,
                     score_func="softmax", groups=None, seq_len=None, position_T=None):
        return routing.token_choice(logits_TE, top_k, capacity, drop_policy, normalize, bias_E,
                                    score_func, groups, seq_len, position_T)

    @staticmethod
    def permute(x_TD, plan):
        return dispatch.permute(x_TD, plan.row_token_N, plan.dest_TK)

    @staticmethod
    def combine(y_ND, plan):
        return dispatch.combine(y_ND, plan)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_ops(kernels: str, device: torch.device):
    """``auto``: Triton on CUDA tensors when installed, PyTorch elsewhere."""
    if kernels == "torch":
        return TorchOps
    if kernels == "auto" and not (device.type == "cuda" and triton_available()):
        return TorchOps
    if not triton_available():
        raise RuntimeError("kernels='triton' needs Triton: pip install 'moesaic[kernels]'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"kernels='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
            "(the Triton interpreter); use kernels='torch' or 'auto' on CPUs")
    from .kernels import TritonOps
    return TritonOps

"""Each row's expert bias, and the activation, in one pass: the epilogue that
``torch._grouped_mm`` lacks.

Adding ``b_EF[e(n)]`` with ``index_select`` writes an [N, F] copy of the bias and then adds it,
and the activation reads h again: 6 N F elements moved. Here one program per (row, column
block) reads h once, writes h + b in place (backward needs it) and, for gelu or relu, writes
act(h + b) to a second buffer: 3 N F. The activation is taken of the rounded h + b, as
the PyTorch path computes it.

Legend: N rows of the expert-major buffer, F feature width, E experts.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rows import _row_launch

ACTS = {"none": 0, "gelu": 1, "relu": 2}


@triton.jit
def _bias_act_kernel(h_ptr, b_ptr, row_expert_ptr, a_ptr, F,
                     ACT: tl.constexpr, BF: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    ok = cols < F
    e = tl.load(row_expert_ptr + n).to(tl.int64)
    h = tl.load(h_ptr + n * F + cols, mask=ok, other=0.0)
    b = tl.load(b_ptr + e * F + cols, mask=ok, other=0.0)
    hb = (h.to(tl.float32) + b.to(tl.float32)).to(h.dtype)
    tl.store(h_ptr + n * F + cols, hb, mask=ok)
    if ACT != 0:
        x = hb.to(tl.float32)
        if ACT == 1:
            a = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
        else:
            a = tl.maximum(x, 0.0)
        tl.store(a_ptr + n * F + cols, a.to(hb.dtype), mask=ok)


def usable(t: Tensor) -> bool:
    """The kernel runs on ``t``: a CUDA tensor, or any tensor when Triton interprets."""
    if t.is_cuda:
        return True
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_bias_act_kernel, InterpretedFunction)


def bias_act_(h_NF: Tensor, b_EF: Tensor, row_expert_N: Tensor,
              activation: str = "none") -> Optional[Tensor]:
    """h_NF += b_EF[row_expert_N] in place; returns act(h_NF) for gelu / relu, else None."""
    N, F = h_NF.shape
    act = ACTS[activation]
    a_NF = torch.empty_like(h_NF) if act else None
    if N == 0:
        return a_NF
    BF, nb, warps = _row_launch(F)
    _bias_act_kernel[(N, nb)](h_NF, b_EF.contiguous(), row_expert_N,
                              a_NF if act else h_NF, F, ACT=act, BF=BF, num_warps=warps)
    return a_NF

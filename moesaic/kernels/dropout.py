"""Hidden dropout in one pass: each element's mask hashed in registers from its row's key.

The PyTorch form (:func:`moesaic.hidden_dropout.drop_`) runs the hash as some fifteen
elementwise passes over an [N, F] int32 tensor; on a GPU that traffic would outweigh the
expert products around it. Here one program per (row, column block) hashes (row key, column)
with the same int32 arithmetic, then reads a, scales or zeroes it, and writes it back: 2 N F
elements moved, no mask stored. Bit-for-bit the same masks as the PyTorch form.

Legend: N rows of the expert-major buffer, F feature width.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..hash32 import BITS
from .rows import _row_launch


# The constants of moesaic.hash32, spelled out (a test holds them equal).
_CONSTANTS = dict(MUL1=0x7FEB352D, MUL2=-2073254261, GOLDEN=-1640531527, LOW_BITS=0xFFFFFF)


@triton.jit
def _mix32(x):
    """lowbias32 on int32 (wrapping multiplies; logical shifts by masking), as moesaic.hash32.mix_."""
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= -2073254261
    x ^= (x >> 16) & 0xFFFF
    return x


@triton.jit
def _hidden_dropout_kernel(a_ptr, keys_ptr, F, threshold, scale, BF: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    ok = cols < F
    row = _mix32(tl.load(keys_ptr + n))
    col = _mix32(cols.to(tl.int32) * -1640531527)
    h = _mix32(col ^ row) & 0xFFFFFF
    a = tl.load(a_ptr + n * F + cols, mask=ok, other=0.0)
    out = tl.where(h >= threshold, a.to(tl.float32) * scale, 0.0)
    tl.store(a_ptr + n * F + cols, out.to(a.dtype), mask=ok)


def hidden_dropout_(a_NF: Tensor, keys_N: Tensor, p: float) -> Tensor:
    """a_NF (contiguous) zeroed where dropped and scaled by 1 / (1 - p) elsewhere, in place."""
    N, F = a_NF.shape
    if N == 0:
        return a_NF
    BF, nb, warps = _row_launch(F)
    _hidden_dropout_kernel[(N, nb)](a_NF, keys_N.to(a_NF.device).int().contiguous(), F,
                                    round(p * 2**BITS), 1.0 / (1.0 - p), BF=BF, num_warps=warps)
    return a_NF

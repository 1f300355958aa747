"""Dropout on the experts' hidden activations, with masks that any rank can regenerate.

A row of the expert-major buffer is computed on whichever rank holds its expert, so a mask
drawn there from that rank's generator would change with the parallel layout. Instead the
rank that owns the token draws one int32 key per row (from torch's default generator, so
``moe_set_seed`` and activation checkpointing cover it), the key travels with the row, and the
mask is a hash of (key, feature): the same whichever rank computes it, and recomputed in the
backward rather than stored (O(N) saved, not O(N * F)). int32 arithmetic wraps on CPU and
CUDA alike; tests pin the hash to a numpy uint32 reference.

Legend: N rows of the expert-major buffer, M rows of one expert, F ffn dim.
"""
from __future__ import annotations

import torch
from torch import Tensor

# lowbias32 (Chris Wellons' hash prospector): two multiply-xorshift rounds, as signed int32.
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - 2**32
_GOLDEN = 0x9E3779B9 - 2**32  # spreads consecutive feature indices before mixing
_BITS = 24  # keep iff the hash's low 24 bits >= p * 2**24


def draw_keys(num_rows: int, device) -> Tensor:
    """One random int32 key per row, from torch's default generator for ``device``."""
    return torch.randint(-2**31, 2**31, (num_rows,), dtype=torch.int32, device=device)


def _mix_(x: Tensor) -> Tensor:
    """lowbias32 in place on an int32 tensor (logical right shifts by masking)."""
    x ^= (x >> 16) & 0xFFFF
    x *= _MUL1
    x ^= (x >> 15) & 0x1FFFF
    x *= _MUL2
    x ^= (x >> 16) & 0xFFFF
    return x


def keep_mask(keys_M: Tensor, width: int) -> Tensor:
    """The int32 hash [M, width] of (row key, feature) whose low bits decide keeping."""
    col_F = _mix_(torch.arange(width, dtype=torch.int32, device=keys_M.device) * _GOLDEN)
    x_MF = _mix_(keys_M.to(torch.int32).clone()).unsqueeze(1) ^ col_F
    return _mix_(x_MF)


def kept(keys_M: Tensor, width: int, p: float) -> Tensor:
    """[M, width] bool: False where dropped (probability p)."""
    return (keep_mask(keys_M, width) & (2**_BITS - 1)) >= round(p * 2**_BITS)


def drop_(a_MF: Tensor, kept_MF: Tensor, p: float) -> Tensor:
    """Hidden dropout of a_MF in place: zero where not ``kept_MF``, the rest times 1 / (1 - p)
    (a float scale, also for bf16 rows)."""
    return a_MF.masked_fill_(~kept_MF, 0).mul_(1.0 / (1.0 - p))

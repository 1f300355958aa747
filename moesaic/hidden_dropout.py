"""Dropout on the experts' hidden activations, with masks that any rank can regenerate.

A row of the expert-major buffer is computed on whichever rank holds its expert, so a mask
drawn there from that rank's generator would change with the parallel layout. Instead the
rank that owns the token draws one int32 key per row (from torch's default generator, so
``moe_set_seed`` and activation checkpointing cover it; under :func:`moesaic.sample_keys` the
hash of the token's key and the expert instead), the key travels with the row, and the
mask is a hash of (key, feature): the same whichever rank computes it, and recomputed in the
backward rather than stored (O(N) saved, not O(N * F)). The hash is :mod:`moesaic.hash32`'s,
kept out of ``torch.compile``'s graphs.

Legend: N rows of the expert-major buffer, M rows of one expert, F ffn dim.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .hash32 import BITS, mix_, outside_compile, row_col, row_col_hash

_CPU_BLOCK = 128  # rows hashed at a time on the CPU: [128, F] int32 stays in cache


def draw_keys(num_rows: int, device) -> Tensor:
    """One random int32 key per row, from torch's default generator for ``device``."""
    return torch.randint(-2**31, 2**31, (num_rows,), dtype=torch.int32, device=device)


@outside_compile
def kept(keys_M: Tensor, width: int, p: float) -> Tensor:
    """[M, width] bool: False where dropped (probability p). The whole mask at once: the
    reference that ``drop_`` and the Triton kernel are checked against (tests, gpu.py)."""
    return (row_col_hash(keys_M, width) & (2**BITS - 1)) >= round(p * 2**BITS)


@outside_compile
def drop_(a_MF: Tensor, keys_M: Tensor, p: float) -> Tensor:
    """Hidden dropout of a_MF in place: zero where dropped, the rest times 1 / (1 - p) (a
    float scale, also for bf16 rows). On the CPU a block of rows at a time, hashing and masking
    while the block is in cache, and in int32 arithmetic (``(h - threshold) >> 31`` is -1 where
    dropped), which runs several times faster there than comparisons and ``masked_fill_``."""
    M, width = a_MF.shape
    block = max(M, 1) if a_MF.device.type != "cpu" else _CPU_BLOCK
    row_M, col_F = row_col(keys_M, width)
    x_BF = torch.empty(min(block, M), width, dtype=torch.int32, device=a_MF.device)
    tmp_BF = torch.empty_like(x_BF)
    threshold, scale = round(p * 2**BITS), 1.0 / (1.0 - p)
    for s in range(0, M, block):
        n = min(block, M - s)
        x = torch.bitwise_xor(row_M[s:s + n].unsqueeze(1), col_F, out=x_BF[:n])
        mix_(x, tmp_BF[:n]).bitwise_and_(2**BITS - 1).sub_(threshold)
        x.bitwise_right_shift_(31).add_(1)  # 1 where kept, 0 where dropped
        a_MF[s:s + n].mul_(x).mul_(scale)
    return a_MF

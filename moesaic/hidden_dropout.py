"""Dropout on the experts' hidden activations, with masks that any rank can regenerate.

A row of the expert-major buffer is computed on whichever rank holds its expert, so a mask
drawn there from that rank's generator would change with the parallel layout. Instead the
rank that owns the token draws one int32 key per row (from torch's default generator, so
``moe_set_seed`` and activation checkpointing cover it), the key travels with the row, and the
mask is a hash of (key, feature): the same whichever rank computes it, and recomputed in the
backward rather than stored (O(N) saved, not O(N * F)). Eager int32 arithmetic wraps on CPU
and CUDA alike (tests pin the hash to a numpy uint32 reference); inductor's generated code does
not promise that (it computed other masks in testing), so ``torch.compile`` runs the hash
eagerly.

Legend: N rows of the expert-major buffer, M rows of one expert, F ffn dim.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

# lowbias32 (Chris Wellons' hash prospector): two multiply-xorshift rounds, as signed int32.
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - 2**32
_GOLDEN = 0x9E3779B9 - 2**32  # spreads consecutive feature indices before mixing
_BITS = 24  # keep iff the hash's low 24 bits >= p * 2**24
_CPU_BLOCK = 128  # rows hashed at a time on the CPU: [128, F] int32 stays in cache


_EAGER: dict = {}
_WRAPPED: list = []


def _never_traced(code) -> None:
    """Tell dynamo to run frames of ``code``, and everything they call, eagerly (what
    ``torch.compiler.disable`` does, without importing torch._dynamo). A no-op on a torch
    without that hook: dynamo then compiles the wrapper's frame until its recompile limit."""
    try:
        from torch._C._dynamo.eval_frame import (_FrameAction, _FrameExecStrategy,
                                                 set_code_exec_strategy)
        set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
    except (ImportError, AttributeError, TypeError, RuntimeError):
        pass


def _outside_compile(fn):
    """``fn`` kept out of torch.compile's graphs (inductor does not keep int32 wrap-around).
    ``torch.compiler.disable`` is applied only while compiling, because it imports
    torch._dynamo, and with it Triton, which would double the time to import moesaic. A
    compiled caller that traces into the wrapper calls the disabled ``fn`` (a graph break);
    the wrapper's own frame, entered from eager code, is never traced (:func:`_never_traced`)."""
    _WRAPPED.append(fn)

    @functools.wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            if not _EAGER:
                _EAGER.update({f: torch.compiler.disable(f) for f in _WRAPPED})
            return _EAGER[fn](*args)
        return fn(*args)
    _never_traced(call.__code__)
    return call


def draw_keys(num_rows: int, device) -> Tensor:
    """One random int32 key per row, from torch's default generator for ``device``."""
    return torch.randint(-2**31, 2**31, (num_rows,), dtype=torch.int32, device=device)


def _mix_(x: Tensor, tmp: Optional[Tensor] = None) -> Tensor:
    """lowbias32 in place on an int32 tensor (logical right shifts by masking); ``tmp`` is
    scratch of x's shape."""
    tmp = torch.empty_like(x) if tmp is None else tmp
    for shift, mask, mul in ((16, 0xFFFF, _MUL1), (15, 0x1FFFF, _MUL2), (16, 0xFFFF, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x ^= tmp.bitwise_and_(mask)
        if mul is not None:
            x *= mul
    return x


def _row_col(keys_M: Tensor, width: int) -> tuple[Tensor, Tensor]:
    row_M = _mix_(keys_M.to(torch.int32).clone())
    col_F = _mix_(torch.arange(width, dtype=torch.int32, device=keys_M.device) * _GOLDEN)
    return row_M, col_F


@_outside_compile
def keep_mask(keys_M: Tensor, width: int) -> Tensor:
    """The int32 hash [M, width] of (row key, feature) whose low bits decide keeping."""
    row_M, col_F = _row_col(keys_M, width)
    return _mix_(row_M.unsqueeze(1) ^ col_F)


@_outside_compile
def kept(keys_M: Tensor, width: int, p: float) -> Tensor:
    """[M, width] bool: False where dropped (probability p). The whole mask at once: the
    reference that ``drop_`` and the Triton kernel are checked against (tests, gpu.py)."""
    return (keep_mask(keys_M, width) & (2**_BITS - 1)) >= round(p * 2**_BITS)


@_outside_compile
def drop_(a_MF: Tensor, keys_M: Tensor, p: float) -> Tensor:
    """Hidden dropout of a_MF in place: zero where dropped, the rest times 1 / (1 - p) (a
    float scale, also for bf16 rows). On the CPU a block of rows at a time, hashing and masking
    while the block is in cache, and in int32 arithmetic (``(h - threshold) >> 31`` is -1 where
    dropped), which runs several times faster there than comparisons and ``masked_fill_``."""
    M, width = a_MF.shape
    block = max(M, 1) if a_MF.device.type != "cpu" else _CPU_BLOCK
    row_M, col_F = _row_col(keys_M, width)
    x_BF = torch.empty(min(block, M), width, dtype=torch.int32, device=a_MF.device)
    tmp_BF = torch.empty_like(x_BF)
    threshold, scale = round(p * 2**_BITS), 1.0 / (1.0 - p)
    for s in range(0, M, block):
        n = min(block, M - s)
        x = torch.bitwise_xor(row_M[s:s + n].unsqueeze(1), col_F, out=x_BF[:n])
        _mix_(x, tmp_BF[:n]).bitwise_and_(2**_BITS - 1).sub_(threshold)
        x.bitwise_right_shift_(31).add_(1)  # 1 where kept, 0 where dropped
        a_MF[s:s + n].mul_(x).mul_(scale)
    return a_MF

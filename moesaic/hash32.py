"""The int32 hash behind every mask that any rank must be able to regenerate.

lowbias32 (Chris Wellons' hash prospector: two multiply-xorshift rounds) on signed int32
tensors, with logical right shifts by masking. Eager int32 arithmetic wraps on CPU and CUDA
alike (tests pin it to a numpy uint32 reference); inductor's generated code does not promise
that (it computed other masks in testing), so :func:`outside_compile` keeps these functions out
of ``torch.compile``'s graphs. Used by hidden dropout (:mod:`moesaic.hidden_dropout`, keys per
row of the expert-major buffer) and by randomness keyed by sample (:mod:`moesaic.keyed`).

Legend: M rows, W row width (columns).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B - 2**32
GOLDEN = 0x9E3779B9 - 2**32  # spreads consecutive column indices before mixing
BITS = 24  # random bits per element: the hash's low 24 bits
_M32 = 0xFFFFFFFF


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


def outside_compile(fn):
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
            eager = _EAGER.get(fn)
            if eager is None:  # wrapped after the first compiled call
                eager = _EAGER[fn] = torch.compiler.disable(fn)
            return eager(*args)
        return fn(*args)
    _never_traced(call.__code__)
    return call


def mix_(x: Tensor, tmp: Optional[Tensor] = None) -> Tensor:
    """lowbias32 in place on an int32 tensor (logical right shifts by masking); ``tmp`` is
    scratch of x's shape."""
    tmp = torch.empty_like(x) if tmp is None else tmp
    for shift, mask, mul in ((16, 0xFFFF, MUL1), (15, 0x1FFFF, MUL2), (16, 0xFFFF, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x ^= tmp.bitwise_and_(mask)
        if mul is not None:
            x *= mul
    return x


def row_col(keys_M: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The two halves of :func:`row_col_hash`: the mixed row keys and column indices."""
    row_M = mix_(keys_M.to(torch.int32).clone())
    col_W = mix_(torch.arange(width, dtype=torch.int32, device=keys_M.device) * GOLDEN)
    return row_M, col_W


@outside_compile
def row_col_hash(keys_M: Tensor, width: int) -> Tensor:
    """The int32 hash [M, width] of (row key, column): ``mix(mix(key) ^ mix(column * GOLDEN))``;
    its low :data:`BITS` bits are an element's random bits."""
    row_M, col_W = row_col(keys_M, width)
    return mix_(row_M.unsqueeze(1) ^ col_W)


def mix_int(x: int) -> int:
    """lowbias32 of a Python int, as a signed int32 (what :func:`mix_` gives for it)."""
    x &= _M32
    x ^= x >> 16
    x = (x * MUL1) & _M32
    x ^= x >> 15
    x = (x * (MUL2 & _M32)) & _M32
    x ^= x >> 16
    return x - 2**32 if x >= 2**31 else x

"""Randomness keyed by sample: the same draws for a sample whichever rank or micro-batch holds it.

torch's generators hand out numbers in call order, so a dropout mask depends on which process
drew it and on what that process drew before: run on more processes, or in more micro-batches,
and every mask changes. Inside ``with sample_keys(keys_b):`` (one int32 key per sample of the
batch this forward sees; the trainer draws a key per sample of the global batch from (seed,
step) and gives each rank and micro-batch its slice), moesaic's random layers hash instead of
drawing: each random site of the forward takes the stream's next salt (a counter: every rank
runs the same sites in the same order), row r of sample i of a batch-first tensor gets the key
``mix(mix(key_i ^ salt) ^ mix(r))``, and an element's number is the hash of (row key, column)
of :mod:`moesaic.hash32`. Dropout, stochastic depth, attention dropout, router noise
and hidden dropout then depend only on (keys, sample): split a batch any way, concatenate the
parts' outputs and they equal the whole batch's.

Activation checkpointing recomputes a forward inside the backward: pass
``context_fn=checkpoint_contexts`` to ``torch.utils.checkpoint.checkpoint`` (the zoo does) and
the recomputation replays the salts its forward took. A keyed draw inside a backward without
it raises, rather than silently draw other numbers; so keep the ``with`` open through the
backward when checkpointing.

Under ``torch.compile`` the keyed draws run eagerly (graph breaks): the salt counter is Python
state, and the hash needs int32 wrap-around, which inductor does not keep.

Legend: b samples, R rows of a batch-first tensor (b x rows per sample), W row width; in
:func:`attention` B batch, H heads, S sequence, d head dim; T tokens, N rows of an
expert-major buffer, E experts.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import threading
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .autograd import fresh, in_backward
from .hash32 import BITS, GOLDEN, mix_, mix_int, outside_compile, row_col_hash

_local = threading.local()


_RECOMPUTE_ERROR = ("moesaic: a sample-keyed random layer ran inside a backward (an "
                    "activation-checkpoint recomputation?) without replaying the forward's draws: "
                    "pass context_fn=moesaic.keyed.checkpoint_contexts to "
                    "torch.utils.checkpoint.checkpoint (use_reentrant=False)")


@dataclass
class SampleStream:
    """The keys of the samples in this forward and the number of salts taken so far; inside
    :func:`masked_rows`, the positions ``picked_N`` of the real rows among the b x
    ``rows_per_sample`` rows of the padded batch."""

    keys_b: Tensor
    salt: int = 0
    replaying: bool = False
    picked_N: Optional[Tensor] = None
    rows_per_sample: int = 0

    def fits(self, num_rows: int) -> bool:
        """Whether a tensor of ``num_rows`` rows can be keyed: the real rows inside
        :func:`masked_rows`, else a batch-first tensor (a multiple of the batch)."""
        if self.picked_N is not None:
            return num_rows == self.picked_N.numel()
        b = self.keys_b.numel()
        return num_rows % b == 0 if b else num_rows == 0

    def next_salt(self) -> int:
        if in_backward() and not self.replaying:
            raise RuntimeError(_RECOMPUTE_ERROR)
        self.salt += 1
        return mix_int(self.salt * 0x9E3779B9)


class _OpenStreams:
    """How many ``sample_keys`` blocks are open in the process, over all threads: CUDA runs a
    backward, and so a checkpoint's recomputation, on autograd's own threads, which do not see
    the forward thread's stream."""

    def __init__(self):
        self.count, self.lock = 0, threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.count += n


_open = _OpenStreams()


def draw_sample_keys(num_samples: int, generator: torch.Generator) -> Tensor:
    """One int32 key per sample, from ``generator`` (on the CPU)."""
    return torch.randint(-2**31, 2**31, (num_samples,), dtype=torch.int32, generator=generator)


def _to_int32(keys_b: Tensor) -> Tensor:
    """Keys as int32, key by key: in-range values unchanged, others folded (high half mixed)."""
    if keys_b.dtype == torch.int32:
        return keys_b
    k = keys_b.to(torch.int64)
    in_range = (k >= -2**31) & (k < 2**31)
    folded = ((k & 0xFFFFFFFF) ^ (((k >> 32) * 0x9E3779B1) & 0xFFFFFFFF))
    folded = torch.where(folded >= 2**31, folded - 2**32, folded)
    return torch.where(in_range, k, folded).to(torch.int32)


@contextlib.contextmanager
def sample_keys(keys_b: Tensor):
    """Key moesaic's random layers by sample for the forwards (and backwards) inside.

    ``keys_b`` is a 1-D integer tensor, one key per sample. Keys are int32; other integer
    dtypes are converted key by key: a value in int32's range keeps its value (an int64 dataset
    index ``i`` draws what ``int32 i`` draws), a larger one is folded to 32 bits with its high
    half mixed in."""
    if not (isinstance(keys_b, Tensor) and keys_b.dim() == 1
            and not keys_b.is_floating_point() and not keys_b.is_complex()
            and keys_b.dtype != torch.bool):
        got = (f"{keys_b.dtype} tensor of shape {tuple(keys_b.shape)}"
               if isinstance(keys_b, Tensor) else type(keys_b).__name__)
        raise TypeError("sample_keys takes a 1-D integer tensor (one key per sample, int32 or "
                        f"converted to it), got a {got}")
    previous = getattr(_local, "stream", None)
    _local.stream = SampleStream(_to_int32(keys_b))
    _open.add(1)
    try:
        yield _local.stream
    finally:
        _open.add(-1)
        _local.stream = previous


@contextlib.contextmanager
def masked_rows(mask: Tensor):
    """Key the real rows of a padded batch, ``x[mask]``, as those rows of the whole batch.

    Inside :func:`sample_keys`, around a layer run on the real tokens only (``mask`` is a bool
    [b, ...] tensor, b the number of keys, True for real tokens; docs/architecture.md, padded
    batches): the layer's random draws for a token then equal those the padded batch-first
    forward draws for it, however the batch is padded or split. Every keyed tensor inside must
    have ``mask.sum()`` rows."""
    stream = current()
    if stream is None:
        raise RuntimeError("masked_rows keys rows by sample: open sample_keys(keys) first")
    b = stream.keys_b.numel()
    if not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() >= 1
            and mask.shape[0] == b):
        got = (f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor)
               else type(mask).__name__)
        raise ValueError(f"masked_rows takes a bool mask whose first dim is the batch ({b} "
                         f"sample keys), got a {got}")
    previous = stream.picked_N, stream.rows_per_sample
    stream.picked_N = mask.reshape(-1).nonzero().squeeze(1)
    stream.rows_per_sample = mask[0].numel() if b else 0
    try:
        yield stream
    finally:
        stream.picked_N, stream.rows_per_sample = previous


def current() -> Optional[SampleStream]:
    """The innermost :func:`sample_keys` stream of this thread, or None. Raises inside a
    backward on a thread without one while a stream is open elsewhere: a recomputation on
    autograd's thread that would otherwise silently draw from torch's generator."""
    stream = getattr(_local, "stream", None)
    if stream is None and _open.count and in_backward():
        raise RuntimeError(_RECOMPUTE_ERROR)
    return stream


def active() -> bool:
    return current() is not None


class _Replay:
    """Runs a recomputation with the salts (and masked rows) its forward took; re-entrant (a
    second backward through the same graph recomputes again)."""

    def __init__(self, stream: SampleStream):
        self.taken, self.previous = replace(stream), []

    def __enter__(self):
        self.previous.append(getattr(_local, "stream", None))
        _local.stream = replace(self.taken, replaying=True)

    def __exit__(self, *exc):
        _local.stream = self.previous.pop()
        return False


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the
    recomputation takes the salts the checkpointed forward took, on whichever thread it runs."""
    stream = getattr(_local, "stream", None)
    if stream is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), _Replay(stream)


@outside_compile
def row_keys(num_rows: int, device) -> Tensor:
    """int32 [num_rows] keys of a batch-first tensor's rows under the current stream, with a
    fresh salt: num_rows must be a multiple of the number of samples (rows of a sample are
    consecutive, as in [b, S, ...] flattened to [b * S, ...]); inside :func:`masked_rows`, the
    number of real rows, which take their keys in the padded batch."""
    stream = current()
    b = stream.keys_b.numel()
    if not stream.fits(num_rows):
        if stream.picked_N is not None:
            raise ValueError(f"masked_rows holds {stream.picked_N.numel()} real rows but a "
                             f"random layer got a tensor of {num_rows} rows: run only layers "
                             f"on x[mask] inside it")
        raise ValueError(f"sample_keys holds {b} sample keys but a random layer got a tensor of "
                         f"{num_rows} rows: keyed layers need batch-first inputs whose first "
                         f"dim (or flattened leading dims) is a multiple of the batch")
    salt = stream.next_salt()  # taken for empty tensors too: every rank takes the same salts
    base_b = mix_(stream.keys_b.to(device=device, dtype=torch.int32) ^ salt)
    if stream.picked_N is not None:
        keys_R = _batch_first_keys(base_b, stream.rows_per_sample, device)
        return keys_R[stream.picked_N.to(device)]
    return _batch_first_keys(base_b, num_rows // b if b else 0, device)


def _batch_first_keys(base_b: Tensor, r: int, device) -> Tensor:
    """[b * r] keys of r consecutive rows per sample, from the samples' salted keys."""
    if r == 0:
        return base_b[:0]
    if r == 1:
        return base_b
    within_r = mix_(torch.arange(r, dtype=torch.int32, device=device) * GOLDEN)
    return mix_((base_b.unsqueeze(1) ^ within_r).reshape(-1))


def uniform(keys_R: Tensor, width: int) -> Tensor:
    """float32 [R, width] in [0, 1): 24 random bits per element, hashed from (row key, column)."""
    return (row_col_hash(keys_R, width) & (2**BITS - 1)).float().mul_(2.0**-BITS)


def normal(keys_R: Tensor, width: int) -> Tensor:
    """float32 [R, width] standard normal (Box-Muller over two keyed uniforms)."""
    u1_RW = uniform(keys_R ^ mix_int(1), width)
    u2_RW = uniform(keys_R ^ mix_int(2), width)
    return torch.sqrt(-2.0 * torch.log1p(-u1_RW)) * torch.cos(u2_RW.mul_(2 * math.pi))


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


class _KeyedDrop(torch.autograd.Function):
    """Dropout of a [R, W] tensor by the rows' keys; only the keys are saved, the mask is
    regenerated in the backward (which is the same dropout of the gradient)."""

    @staticmethod
    def forward(ctx, x_RW, keys_R, p, use_triton):
        ctx.p, ctx.use_triton = p, use_triton
        ctx.save_for_backward(keys_R)
        return fresh(_drop(x_RW, keys_R, p, use_triton))

    @staticmethod
    def backward(ctx, grad_RW):
        (keys_R,) = ctx.saved_tensors
        return _KeyedDrop.apply(grad_RW, keys_R, ctx.p, ctx.use_triton), None, None, None


def _drop(x_RW: Tensor, keys_R: Tensor, p: float, use_triton: bool) -> Tensor:
    from .grouped_cuda import _hidden_drop_
    out_RW = x_RW.clone(memory_format=torch.contiguous_format)
    return _hidden_drop_(out_RW, keys_R, p, use_triton)


@outside_compile
def dropout(x: Tensor, p: float, kernels: str = "auto") -> Tensor:
    """Dropout of a batch-first tensor (training), masks keyed by sample: each row (first dim)
    hashes its own mask over the rest of the tensor. On CUDA the one-pass Triton kernel of
    hidden dropout, unless ``kernels="torch"`` (the PyTorch hash: the same masks)."""
    if p <= 0.0 or x.numel() == 0:
        return x
    if p >= 1.0:
        return x * 0.0
    R = x.shape[0]
    keys_R = row_keys(R, x.device)
    use_triton = x.is_cuda and kernels != "torch" and _has_triton()
    return _KeyedDrop.apply(x.reshape(R, -1), keys_R, float(p), use_triton).reshape(x.shape)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose masks are keyed by sample inside :func:`sample_keys` (the same
    module, weights and state dict otherwise); ``kernels`` as :class:`moesaic.MoE`'s. Inputs
    must be batch-first (first dim a multiple of the batch); with ``strict=False`` (the
    dropouts :func:`key_dropouts_` converts, whose inputs moesaic does not know) others draw
    from torch's generator instead, with a warning, rather than raise."""

    def __init__(self, p: float = 0.5, inplace: bool = False, kernels: str = "auto",
                 strict: bool = True):
        super().__init__(p, inplace)
        self.kernels, self.strict = kernels, strict

    def forward(self, x: Tensor) -> Tensor:
        stream = current() if self.training and self.p > 0 else None
        if stream is not None:
            if self.strict or stream.fits(x.shape[0]) or x.numel() == 0:
                return dropout(x, self.p, self.kernels)
            stream.next_salt()  # the salt it would have taken: later sites keep theirs
            _warn_unkeyed(x.shape[0], stream.keys_b.numel())
        return super().forward(x)


_unkeyed_warned: set = set()


def _warn_unkeyed(rows: int, b: int) -> None:
    if (rows, b) not in _unkeyed_warned:
        _unkeyed_warned.add((rows, b))
        warnings.warn(f"a converted nn.Dropout got a tensor of {rows} rows under {b} sample "
                      "keys (not batch-first, e.g. sequence-first [S, B, D]): it draws from "
                      "torch's generator, not keyed by sample", stacklevel=3)


def key_dropouts_(model: nn.Module, kernels: str = "auto") -> list[str]:
    """Replace every plain ``nn.Dropout`` in ``model`` by :class:`Dropout` (same ``p`` and
    ``inplace``; no state, so state dicts are unchanged); returns the replaced modules' names
    (a module reached under two names becomes two). Keying reads the first dim as the batch: a
    dropout whose input is not batch-first draws from torch's generator with a warning, and
    one that is sequence-first with S a multiple of the batch is keyed by position instead
    (transpose such inputs). Other dropouts (``Dropout2d``, ``F.dropout`` calls, a fused
    attention's ``dropout_p``) still draw from torch's generator."""
    names = [n for n, m in model.named_modules(remove_duplicate=False)
             if n and type(m) is nn.Dropout]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)
        new = Dropout(old.p, old.inplace, kernels=kernels, strict=False)
        new.train(old.training)
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return names


def keep_samples(x: Tensor, p: float) -> Tensor:
    """[b] float keep flags (probability 1 - p) of the samples of batch-first ``x``, keyed."""
    u_b = uniform(row_keys(x.shape[0], x.device), 1)[:, 0]
    return (u_b >= p).to(x.dtype)


def attention(q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, p: float) -> Tensor:
    """Softmax attention with keyed dropout on the weights (training inside
    :func:`sample_keys`; the fused kernel draws its own masks, so this one is unfused)."""
    scores_BHSS = (q_BHSd * q_BHSd.shape[-1] ** -0.5) @ k_BHSd.transpose(-2, -1)
    attn_BHSS = F.softmax(scores_BHSS.float(), dim=-1).to(q_BHSd.dtype)
    return dropout(attn_BHSS, p) @ v_BHSd


@outside_compile
def expert_row_keys(keys_T: Tensor, row_token_N: Tensor, counts_E: Tensor) -> Tensor:
    """Hidden dropout's key of each row of an expert-major buffer (rows of expert 0 first,
    ``counts_E`` of each): the hash of (its token's key, its expert), the same whichever rank
    holds the token or the expert."""
    N = row_token_N.numel()
    expert_N = torch.repeat_interleave(
        torch.arange(counts_E.numel(), device=keys_T.device, dtype=torch.int32),
        counts_E.to(keys_T.device), output_size=N)
    return mix_(keys_T[row_token_N] ^ mix_((expert_N + 1) * GOLDEN))

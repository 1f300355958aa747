"""The grouped feed-forward on CUDA: grouped matrix products instead of a loop over experts.

``torch._grouped_mm`` does one launch per product for all experts (bf16 on compute capability
9.0+, feature dimensions multiples of 8); otherwise a padded ``bmm`` over [E, max rows, D],
unless padding would more than double the rows (skewed routing, dropless): then the loop over
experts, so memory stays O(N). ``_grouped_mm`` has no bias: where Triton runs, each row's
expert bias (and gelu / relu) is added in one pass (:mod:`moesaic.kernels.bias_act`), else the
bias is gathered to [N, F] and added. Hidden dropout masks the activation as in the loop
(:mod:`moesaic.hidden_dropout`; in one pass by :mod:`moesaic.kernels.dropout` where Triton
runs), regenerated in the backward. The flags below remember, per process, a torch build
that rejected a form (or a Triton that failed the epilogue).

Legend: E local experts, D model dim, F ffn dim, N rows of the expert-major buffer.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .autograd import first_order, fresh
from .grouped import _act, _act_backward_, _bounds, grouped_ffn
from .hidden_dropout import drop_


_grouped_wgrad_failed = False


def _weight_grad(a_NX: Tensor, g_NY: Tensor, offs_E: Tensor, counts_E: Tensor,
                 empty_E: Tensor) -> Tensor:
    """Per-expert a_e^T @ g_e as [E, X, Y]: one grouped product splitting the contraction
    dimension, or a loop over experts where this torch build rejects that form. Experts with
    no rows (indices ``empty_E``) get zeros whatever the grouped kernel left there; only their
    slices are written, not the whole [E, X, Y]."""
    global _grouped_wgrad_failed
    if not _grouped_wgrad_failed:
        try:
            return torch._grouped_mm(a_NX.t(), g_NY, offs=offs_E).index_fill_(0, empty_E, 0)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- any build or launch failure takes the fallback
            _grouped_wgrad_failed = True
            _warn_fallback("grouped_mm weight gradients (per-expert loop instead)", e)
    out = a_NX.new_zeros(counts_E.numel(), a_NX.shape[1], g_NY.shape[1])
    for e, s, t in _bounds(counts_E.tolist()):
        if s < t:
            torch.mm(a_NX[s:t].t(), g_NY[s:t], out=out[e])
    return out


def _segment_sum(v_NX: Tensor, offs_E: Tensor, counts_E: Tensor, empty_E: Tensor) -> Tensor:
    """Per-expert sums of consecutive rows as [E, X] (bias gradients): the weight-gradient
    product with a column of ones, so one grouped launch accumulating in float32, no atomics
    (``torch.segment_reduce`` loops over rows one thread per column on CUDA)."""
    ones_N8 = v_NX.new_ones(v_NX.shape[0], 8)  # 8 columns keep the strides 16-byte aligned
    return _weight_grad(ones_N8, v_NX, offs_E, counts_E, empty_E)[:, 0]


_epilogue_failed = False


def _fused_epilogue(x_ND: Tensor):
    """The Triton bias(+activation) epilogue module where it runs on x_ND's device, else None
    (then the bias is gathered to [N, F] and added)."""
    from .ops import triton_available
    if _epilogue_failed or not triton_available():
        return None
    from .kernels import bias_act
    return bias_act if bias_act.usable(x_ND) else None


def _add_row_bias_(h_NX: Tensor, b_EX: Tensor, row_expert_N: Tensor, activation: str,
                   fused) -> Optional[Tensor]:
    """h_NX += b_EX[row_expert_N] in place; returns act(h_NX) when the Triton epilogue made it
    (gelu, relu), else None. A Triton failure other than memory falls back to gathering the
    bias, for the rest of the process."""
    global _epilogue_failed
    if fused is not None:
        try:
            return fused.bias_act_(h_NX, b_EX, row_expert_N,
                                   activation if activation in ("gelu", "relu") else "none")
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- any build or launch failure takes the fallback
            _epilogue_failed = True
            _warn_fallback("Triton bias epilogue (gathered bias instead)", e)
    h_NX.add_(b_EX.index_select(0, row_expert_N))  # in place: no second [N, X]
    return None


_dropout_kernel_failed = False


def _hidden_drop_(a_NF: Tensor, keys_N: Optional[Tensor], p: float, use_triton: bool) -> Tensor:
    """Hidden dropout of a_NF in place (nothing without keys): the one-pass Triton kernel where
    the epilogue runs, else the PyTorch hash; the same masks either way."""
    global _dropout_kernel_failed
    if keys_N is None:
        return a_NF
    if use_triton and not _dropout_kernel_failed:
        try:
            from .kernels.dropout import hidden_dropout_
            return hidden_dropout_(a_NF, keys_N, p)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- any build or launch failure takes the fallback
            _dropout_kernel_failed = True
            _warn_fallback("Triton hidden-dropout kernel (PyTorch hash instead)", e)
    return drop_(a_NF, keys_N, p)


class _HiddenDrop(torch.autograd.Function):
    """Differentiable hidden dropout that keeps only the keys for the backward (the padded bmm
    path's autograd-composed FFN)."""

    @staticmethod
    def forward(ctx, a_MF, keys_M, p, use_triton):
        ctx.p, ctx.use_triton = p, use_triton
        ctx.save_for_backward(keys_M)
        return fresh(_hidden_drop_(a_MF.clone(), keys_M, p, use_triton))

    @staticmethod
    @first_order
    def backward(ctx, grad_MF):
        (keys_M,) = ctx.saved_tensors
        grad_MF = grad_MF.clone(memory_format=torch.contiguous_format)
        return _hidden_drop_(grad_MF, keys_M, ctx.p, ctx.use_triton), None, None, None


def _warn_fallback(what: str, e: Exception) -> None:
    """Once per path and process: which fast path failed, why, and what runs instead."""
    warnings.warn(f"moesaic: {what} for the rest of this process, after {e!r}", stacklevel=3)


class _GroupedMMFFN(torch.autograd.Function):
    """The grouped FFN with every product one ``torch._grouped_mm`` over all experts."""

    @staticmethod
    def forward(ctx, x_ND, counts_E, activation, epilogue, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF,
                keys_N, p):
        mm = torch._grouped_mm
        E = w1_EDF.shape[0]
        x_ND = x_ND.contiguous()
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        row_expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E,
                                               output_size=x_ND.shape[0])
        fused = _fused_epilogue(x_ND) if epilogue else None
        h_NF = mm(x_ND, w1_EDF, offs=offs_E)
        a_NF = None
        if b1_EF is not None:
            a_NF = _add_row_bias_(h_NF, b1_EF, row_expert_N, activation, fused)
        u_NF = mm(x_ND, w3_EDF, offs=offs_E) if w3_EDF is not None else None
        if a_NF is None:
            a_NF = _act(activation, h_NF, u_NF)
        a_NF = _hidden_drop_(a_NF, keys_N, p, fused is not None)
        y_ND = mm(a_NF, w2_EFD, offs=offs_E)
        del a_NF
        if b2_ED is not None:
            _add_row_bias_(y_ND, b2_ED, row_expert_N, "none", fused)
        ctx.activation, ctx.p, ctx.triton = activation, p, fused is not None
        ctx.has_b1, ctx.has_b2 = b1_EF is not None, b2_ED is not None
        ctx.save_for_backward(x_ND, h_NF, u_NF, counts_E, offs_E, w1_EDF, w2_EFD, w3_EDF, keys_N)
        return fresh(y_ND)

    @staticmethod
    @first_order
    def backward(ctx, grad_ND):
        mm = torch._grouped_mm
        x_ND, h_NF, u_NF, counts_E, offs_E, w1_EDF, w2_EFD, w3_EDF, keys_N = ctx.saved_tensors
        need = ctx.needs_input_grad  # frozen weights (requires_grad False) get no products
        gy_ND = grad_ND.contiguous()
        empty_E = (counts_E == 0).nonzero().squeeze(1)  # the backward's one host sync
        g_w2 = g_b2 = g_w1 = g_b1 = g_w3 = grad_x = None
        if need[6]:
            a_NF = _hidden_drop_(_act(ctx.activation, h_NF, u_NF), keys_N, ctx.p, ctx.triton)
            g_w2 = _weight_grad(a_NF, gy_ND, offs_E, counts_E, empty_E)
            del a_NF
        if ctx.has_b2 and need[7]:
            g_b2 = _segment_sum(gy_ND, offs_E, counts_E, empty_E)
        grad_a = _hidden_drop_(mm(gy_ND, w2_EFD.transpose(1, 2), offs=offs_E), keys_N, ctx.p,
                               ctx.triton)  # the same masks, regenerated
        grad_h, grad_u = _act_backward_(ctx.activation, grad_a, h_NF, u_NF)
        grad_h = grad_h.contiguous()
        if need[4]:
            g_w1 = _weight_grad(x_ND, grad_h, offs_E, counts_E, empty_E)
        if ctx.has_b1 and need[5]:
            g_b1 = _segment_sum(grad_h, offs_E, counts_E, empty_E)
        if need[0]:
            grad_x = mm(grad_h, w1_EDF.transpose(1, 2), offs=offs_E)
        if grad_u is not None:
            grad_u = grad_u.contiguous()
            if need[8]:
                g_w3 = _weight_grad(x_ND, grad_u, offs_E, counts_E, empty_E)
            if need[0]:
                grad_x = grad_x + mm(grad_u, w3_EDF.transpose(1, 2), offs=offs_E)
        return grad_x, None, None, None, g_w1, g_b1, g_w2, g_b2, g_w3, None, None


def padded_bmm_ffn(x_ND: Tensor, counts_E: Tensor, activation: str, w1_EDF: Tensor,
                   b1_EF: Optional[Tensor], w2_EFD: Tensor, b2_ED: Optional[Tensor],
                   w3_EDF: Optional[Tensor] = None, max_rows: Optional[int] = None,
                   keys_N: Optional[Tensor] = None, p: float = 0.0,
                   epilogue: bool = True) -> Tensor:
    """The grouped FFN as batched products over rows padded to the busiest expert's count
    (``max_rows``, read from ``counts_E`` when not given); hidden dropout with ``keys_N``.

    Padding rows are zero inputs whose outputs are never read, so they add no gradient.
    """
    E = w1_EDF.shape[0]
    N, D = x_ND.shape
    M = max_rows if max_rows is not None else (int(counts_E.max()) if N else 0)
    row_expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E,
                                           output_size=N)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    pos_N = torch.arange(N, device=x_ND.device) - start_E.index_select(0, row_expert_N)
    x_EMD = x_ND.new_zeros(E, M, D).index_put((row_expert_N, pos_N), x_ND)
    h_EMF = torch.bmm(x_EMD, w1_EDF)
    if b1_EF is not None:
        h_EMF = h_EMF + b1_EF.unsqueeze(1)
    u_EMF = torch.bmm(x_EMD, w3_EDF) if w3_EDF is not None else None
    a_EMF = _act(activation, h_EMF, u_EMF)
    if keys_N is not None and p > 0:
        keys_EM = keys_N.new_zeros(E, M).index_put((row_expert_N, pos_N), keys_N)
        use_triton = epilogue and _fused_epilogue(x_ND) is not None
        a_EMF = _HiddenDrop.apply(a_EMF.reshape(E * M, -1), keys_EM.reshape(-1), p,
                                  use_triton).view(a_EMF.shape)
    y_EMD = torch.bmm(a_EMF, w2_EFD)
    if b2_ED is not None:
        y_EMD = y_EMD + b2_ED.unsqueeze(1)
    return y_EMD[row_expert_N, pos_N]


_grouped_mm_failed = False


def grouped_mm_supported(x_ND: Tensor, w1_EDF: Tensor) -> bool:
    """``torch._grouped_mm`` runs fast here: bf16 on a CUDA card of capability 9.0 or newer."""
    if _grouped_mm_failed or not hasattr(torch, "_grouped_mm") or not x_ND.is_cuda:
        return False
    D, Fdim = w1_EDF.shape[1], w1_EDF.shape[2]
    return (x_ND.dtype == torch.bfloat16 and D % 8 == 0 and Fdim % 8 == 0
            and torch.cuda.get_device_capability(x_ND.device) >= (9, 0))


def batched_ffn(x_ND: Tensor, counts_E: Tensor, activation: str, w1_EDF: Tensor,
                b1_EF: Optional[Tensor], w2_EFD: Tensor, b2_ED: Optional[Tensor],
                w3_EDF: Optional[Tensor] = None, path: str = "auto",
                epilogue: bool = True, keys_N: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
    """The grouped FFN through ``torch._grouped_mm`` (``path="grouped_mm"``) or padded
    ``bmm`` (``"bmm"``); ``"auto"`` takes grouped_mm where supported and falls back to bmm
    if it raises, or to the loop over experts where padding would more than double the rows.
    ``epilogue=False`` keeps Triton out (the grouped_mm path then gathers its biases).
    ``keys_N`` (one int32 per row): hidden dropout of probability ``p`` after the activation."""
    global _grouped_mm_failed
    keys_N = keys_N if p > 0 else None
    args = (x_ND, counts_E, activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF)
    mm_args = (x_ND, counts_E, activation, epilogue, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF,
               keys_N, p)
    if path == "grouped_mm":
        return _GroupedMMFFN.apply(*mm_args)
    if path == "auto" and grouped_mm_supported(x_ND, w1_EDF):
        try:
            return _GroupedMMFFN.apply(*mm_args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 -- any build or launch failure takes the fallback
            _grouped_mm_failed = True
            _warn_fallback("torch._grouped_mm expert path (padded bmm or loop instead)", e)
    counts = counts_E.tolist()  # one host read, which the padded shape needs anyway
    max_rows = max(counts, default=0)
    if path == "auto" and len(counts) * max_rows > 2 * x_ND.shape[0]:
        return grouped_ffn(x_ND, counts, activation, w1_EDF, b1_EF, w2_EFD, b2_ED, w3_EDF,
                           keys_N=keys_N, p=p)
    return padded_bmm_ffn(*args, max_rows=max_rows, keys_N=keys_N, p=p, epilogue=epilogue)

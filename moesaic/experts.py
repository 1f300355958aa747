"""Batched expert weights: the local experts of one MoE layer as stacked tensors.

``Experts`` holds ``w1_EDF`` etc. and runs them through the grouped FFN: the per-expert loop
(:mod:`moesaic.grouped`) on CPU, grouped products (:mod:`moesaic.grouped_cuda`) on CUDA (or
the loop there too, for ``cuda_path="loop"`` or routing too skewed to pad).

Legend: E local experts, D model dim, F ffn dim, N rows of the expert-major buffer.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .grouped import grouped_ffn
from .grouped_cuda import batched_ffn, grouped_mm_supported

__all__ = ["Experts", "grouped_ffn", "batched_ffn", "grouped_mm_supported"]


def _expert_generator(layer_seed: int, global_id: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((layer_seed * 1_000_003 + global_id * 7_919 + 1) % (2**63 - 1))
    return g


CUDA_PATHS = ("auto", "grouped_mm", "bmm", "loop")


class Experts(nn.Module):
    """The local experts' weights, stacked: ``w1`` [E, D, F], ``b1`` [E, F], ``w2`` [E, F, D],
    ``b2`` [E, D]; swiglu adds ``w3`` [E, D, F] and has no biases.

    Each expert is initialised from its own generator, seeded by (layer seed, global expert id),
    so a global expert has the same weights whichever rank holds it. ``hidden_dropout`` drops
    activations after the nonlinearity in training, by the rows' keys (see ``forward``).
    """

    def __init__(self, d_model: int, d_ff: int, global_ids: Sequence[int], activation: str = "gelu",
                 bias: bool = True, layer_seed: int = 0, hidden_dropout: float = 0.0):
        super().__init__()
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.hidden_dropout = hidden_dropout
        self.cuda_path = "auto"  # validated on assignment: see CUDA_PATHS
        self.triton_epilogue = True  # the grouped_mm path may add biases with a Triton kernel
        self.global_ids = list(global_ids)
        E = len(self.global_ids)
        bias = bias and activation != "swiglu"
        self.w1 = nn.Parameter(torch.empty(E, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(E, d_ff, d_model))
        self.b1 = nn.Parameter(torch.empty(E, d_ff)) if bias else None
        self.b2 = nn.Parameter(torch.empty(E, d_model)) if bias else None
        self.w3 = nn.Parameter(torch.empty(E, d_model, d_ff)) if activation == "swiglu" else None
        self.layer_seed = layer_seed
        self.reset_parameters()

    def __setattr__(self, name, value):
        if name == "cuda_path" and value not in CUDA_PATHS:
            raise ValueError(f"cuda_path must be one of {CUDA_PATHS}, got {value!r}")
        super().__setattr__(name, value)

    @property
    def num_local_experts(self) -> int:
        return len(self.global_ids)

    @torch.no_grad()
    def reset_parameters(self, layer_seed: Optional[int] = None) -> None:
        """nn.Linear's default init, expert by expert, from per-expert generators seeded by
        (``layer_seed``, default the one given at construction, global expert id): the same
        weights after ``to_empty`` from the meta device as at construction. A no-op on meta."""
        if layer_seed is not None:
            self.layer_seed = layer_seed
        if self.w1.is_meta:
            return
        bound_in, bound_hidden = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_ff)
        for e, gid in enumerate(self.global_ids):
            g = _expert_generator(self.layer_seed, gid)
            pairs = [(self.w1, bound_in), (self.b1, bound_in), (self.w3, bound_in),
                     (self.w2, bound_hidden), (self.b2, bound_hidden)]
            for p, bound in pairs:
                if p is not None:
                    vals = torch.rand(p[e].shape, generator=g, dtype=torch.float32, device="cpu")
                    p[e].copy_((vals * 2 - 1) * bound)

    def forward(self, x_ND: Tensor, counts_E: Tensor, keys_N: Optional[Tensor] = None) -> Tensor:
        """Run expert e on its ``counts_E[e]`` contiguous rows; weights cast to x's dtype.

        ``keys_N`` (one int32 per row, :func:`moesaic.hidden_dropout.draw_keys`) turns on hidden
        dropout in training: each row's mask is a hash of its key, the same on any rank.
        CUDA tensors take the batched path chosen by ``self.cuda_path`` ("auto", "grouped_mm",
        "bmm", or "loop" for the per-expert loop); ``self.triton_epilogue`` (False under
        ``kernels="torch"``) lets the grouped_mm path add biases with a Triton kernel."""
        dtype = x_ND.dtype
        params = [None if p is None else p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2, self.w3)]
        p = self.hidden_dropout if self.training and keys_N is not None else 0.0
        if x_ND.is_cuda and self.cuda_path != "loop":
            counts_t = torch.as_tensor(counts_E, dtype=torch.int64, device=x_ND.device)
            return batched_ffn(x_ND, counts_t, self.activation, *params, path=self.cuda_path,
                               epilogue=self.triton_epilogue, keys_N=keys_N, p=p)
        counts = counts_E.tolist() if isinstance(counts_E, Tensor) else list(counts_E)
        return grouped_ffn(x_ND, counts, self.activation, *params, keys_N=keys_N, p=p)

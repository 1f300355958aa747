"""Index bookkeeping for rows exchanged in blocks: regrouping [source rank, local expert]
blocks into [local expert, source rank] order and back.

Legend: S source ranks, L local experts.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def exclusive_cumsum(x: Tensor) -> Tensor:
    """Start offset of each entry's block: [0, x0, x0 + x1, ...]."""
    return torch.cumsum(x, 0) - x


def block_order(counts_SL: Tensor, total: Optional[int] = None) -> Tensor:
    """Row index that turns a buffer of blocks in [S, L] order into [L, S] order: out[i] =
    in[idx[i]], where block (s, l) holds ``counts_SL[s, l]`` rows. ``total``: their sum, if the
    caller knows it (else it is read from the device)."""
    S, L = counts_SL.shape
    start_SL = exclusive_cumsum(counts_SL.reshape(-1)).view(S, L)
    counts_LS = counts_SL.t().reshape(-1)
    start_LS = start_SL.t().reshape(-1)
    n = int(counts_LS.sum()) if total is None else total
    first = torch.repeat_interleave(start_LS, counts_LS, output_size=n)
    offset = torch.arange(n, device=counts_SL.device) - torch.repeat_interleave(
        exclusive_cumsum(counts_LS), counts_LS, output_size=n)
    return first + offset


def inverse(perm: Tensor) -> Tensor:
    """The permutation that undoes ``perm`` (out[perm[i]] = i)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv

"""The training system's one view of the process group: is there more than one process, and a
sum over all of them that is the identity in a single process."""
from __future__ import annotations

import torch
import torch.distributed as dist


def multi_process() -> bool:
    """True inside a started process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all processes (nothing to do in one process); returns ``t``."""
    if multi_process():
        dist.all_reduce(t)
    return t

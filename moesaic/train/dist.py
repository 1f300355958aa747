"""The training system's one view of the process group: is there more than one process, a sum
over all of them that is the identity in a single process, an fp16 loss scaler whose
overflow check spans the processes, and a step that fails on every rank if it fails on one."""
from __future__ import annotations

import torch
import torch.distributed as dist


def multi_process() -> bool:
    """True inside a started process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def grad_scaler(enabled: bool, device_type: str = "cuda") -> torch.amp.GradScaler:
    """fp16 loss scaling whose overflow check spans every process. Expert gradients live on one
    rank only, so a per-rank check would let that rank skip a step the others take and the
    shared weights would drift apart; the sharded scaler sums the found-inf flags over the world
    before each step, so all ranks skip (and back off the scale) together."""
    if enabled and multi_process():
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device_type, enabled=True)
    return torch.amp.GradScaler(device_type, enabled=enabled)


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` in place over all processes (nothing to do in one process); returns ``t``."""
    if multi_process():
        dist.all_reduce(t)
    return t


def on_every_rank(fn):
    """``fn()``, raising on every rank if it raised on any (rank 0 would otherwise go on to
    create the run dir while another rank dies); the others name the failing rank."""
    from .checkpoint import CheckpointError

    error, out = None, None
    try:
        out = fn()
    except Exception as e:  # re-raised below, on this rank as it was
        error = e
    if multi_process():
        said = [None] * dist.get_world_size()
        dist.all_gather_object(said, None if error is None else str(error))
        failed = [(r, m) for r, m in enumerate(said) if m is not None]
        if error is None and failed:
            raise CheckpointError(f"init_from failed on rank {failed[0][0]}: {failed[0][1]}")
    if error is not None:
        raise error
    return out

"""Expert parallelism: layout of experts over ranks, all-to-all dispatch, gradient sync.

``layout`` is imported eagerly (the MoE layer uses it); the rest loads on first use, because it
imports the layer itself.
"""
from importlib import import_module

from .layout import ExpertLayout, expert_layout

_LAZY = {
    "ParallelContext": "context", "init_distributed": "context", "destroy": "context",
    "moe_set_seed": "seed", "parallelize": "model", "no_sync": "model", "equal_batches": "model",
    "comm_stats": "model", "clip_grad_norm_": "clip", "full_state_dict": "state",
    "load_full_state_dict": "state", "AllToAllDispatcher": "dispatcher", "CommError": "comm",
    "alltoall_bytes_per_rank": "volume", "predicted_alltoall_seconds": "volume",
}

__all__ = ["ExpertLayout", "expert_layout", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

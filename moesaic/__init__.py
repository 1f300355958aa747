"""moesaic: Mixture-of-Experts layers, expert parallelism, fused kernels and training."""
from .balance import update_expert_biases
from .config import MoEConfig
from .keyed import masked_rows, sample_keys
from .layer import DenseMLP, MoE, MoeModule
from .routing import RoutingPlan, RoutingStats
from .upcycle import upcycle_, upcycle_layer_
from .moeify import MoEFeedForward, WithAuxLoss, collect_aux_loss, moeify_
from .parallel import (ParallelContext, clip_grad_norm_, destroy, full_state_dict,
                       init_distributed, load_full_state_dict, moe_set_seed, no_sync, parallelize,
                       equal_batches)

__version__ = "0.1.0"

__all__ = ["MoE", "MoeModule", "MoEConfig", "DenseMLP", "RoutingPlan", "RoutingStats",
           "ParallelContext", "init_distributed", "destroy", "moe_set_seed", "parallelize",
           "clip_grad_norm_", "no_sync", "equal_batches", "full_state_dict",
           "load_full_state_dict", "update_expert_biases", "upcycle_", "upcycle_layer_",
           "MoEFeedForward", "moeify_", "collect_aux_loss", "WithAuxLoss", "sample_keys",
           "masked_rows"]


def __getattr__(name: str):
    """``moesaic.models`` and ``moesaic.train`` load on first use (the zoo and the trainer are
    not needed to use the layer)."""
    if name in ("models", "train"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'moesaic' has no attribute {name!r}")

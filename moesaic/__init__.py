"""moesaic: Mixture-of-Experts layers, expert parallelism, fused kernels and training."""
from .config import MoEConfig
from .layer import DenseMLP, MoE, MoeModule
from .routing import RoutingPlan, RoutingStats

__version__ = "0.1.0"

__all__ = ["MoE", "MoeModule", "MoEConfig", "DenseMLP", "RoutingPlan", "RoutingStats"]

"""Model zoo: ViT-MoE (ViT-Lite sizes, PR-MoE pyramids) and WideNet, by name.

``create(name, **overrides)`` builds a registered model; ``list_models()`` names them all.
Every model returns ``logits, aux_loss = model(images)`` and exposes ``moe_layers()``.
``MoEStack`` is the smallest model around MoE layers (tests, benchmarks, examples).
"""
from . import vit_moe, widenet  # noqa: F401  (registers the presets)
from .config import VisionConfig
from .moe_stack import MoEStack
from .registry import create, list_models, model_summary, register, registered_in
from .summary import count_parameters, describe, moe_layers, routing_stats
from .vit_moe import ViTMoE
from .widenet import WideNet

__all__ = ["create", "list_models", "model_summary", "register", "registered_in", "ViTMoE",
           "WideNet", "MoEStack", "VisionConfig", "count_parameters", "describe", "moe_layers",
           "routing_stats"]

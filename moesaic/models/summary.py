"""Read-outs of a built model: routing statistics, parameter counts, a printable description.

Parameter counts are global: under expert parallelism a layer holds E_local of E experts, and
its expert parameters are scaled by E / E_local so every rank reports the whole model.
"""
from __future__ import annotations

import torch.nn as nn

from ..layer import MoE, moe_layers


def routing_stats(model: nn.Module) -> list[dict]:
    """One dict per MoE block of the last forward (``RoutingStats.as_dict()``): per MoE layer,
    or per block for models that reuse one layer in several blocks (WideNet). Empty before any
    forward."""
    if hasattr(model, "routing_stats"):
        return model.routing_stats()
    return [m.last_stats.as_dict() for m in moe_layers(model) if m.last_stats is not None]


def _expert_params(layer: MoE) -> tuple[int, int]:
    """(parameters of all global experts, parameters of one expert) of one MoE layer."""
    local = sum(p.numel() for p in layer.experts.parameters())
    n_local = max(layer.experts.num_local_experts, 1)
    per_expert = local // n_local
    return per_expert * layer.config.num_experts, per_expert


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, active per token): shared tensors count once; experts count globally in the
    total and ``top_k`` of them per MoE layer in the active count (router, PR-MoE residual
    MLP and shared experts are always active; expert choice: capacity_factor experts on
    average)."""
    local_total = sum(p.numel() for p in model.parameters())
    total = active = local_total
    for layer in moe_layers(model):
        local = sum(p.numel() for p in layer.experts.parameters())
        all_experts, per_expert = _expert_params(layer)
        total += all_experts - local
        active += round(layer.config.experts_per_token() * per_expert) - local
    return total, active


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M ({n:,})"


def describe(model: nn.Module) -> str:
    """A few readable lines: name, shape, experts per MoE block, total and active parameters."""
    total, active = count_parameters(model)
    cfg = getattr(model, "config", None)
    lines = [f"model: {getattr(model, 'name', type(model).__name__)} ({type(model).__name__})"]
    if cfg is not None and hasattr(cfg, "depth"):
        lines.append(f"  depth {cfg.depth}, d_model {cfg.d_model}, heads {cfg.num_heads}, "
                     f"ffn {cfg.d_ff}, image {cfg.img_size}x{cfg.img_size}x{cfg.in_chans}, "
                     f"patch {cfg.patch_size}, classes {cfg.num_classes}")
    layers = moe_layers(model)
    if hasattr(model, "block_experts"):
        per_block = model.block_experts()
        lines.append("  experts per block: " + ", ".join(str(e) if e else "dense" for e in per_block))
    if layers:
        c = layers[0].config
        extra = ", shared by all blocks" if len(layers) == 1 and cfg is not None and \
            hasattr(model, "block_experts") and sum(1 for e in model.block_experts() if e) > 1 else ""
        capacity = (f"capacity {c.capacity_factor}/{c.eval_capacity_factor} (train/eval)"
                    if c.drop_tokens or c.router == "expert_choice" else "dropless")
        shared = f"shared experts {c.num_shared_experts}, " if c.num_shared_experts else ""
        shared += "sigmoid scores, " if c.score_func == "sigmoid" else ""
        lines.append(f"  MoE layers: {len(layers)}{extra}; top_k {c.top_k}, router {c.router}, "
                     f"{capacity}, noise {c.noise_policy}, residual {c.residual}, {shared}"
                     f"ep_size {layers[0].layout.ep_size}")
    lines.append(f"  parameters: total {_millions(total)}, active per token {_millions(active)}")
    if hasattr(model, "flops_per_image"):
        lines.append(f"  forward FLOPs per image: {model.flops_per_image() / 1e6:.1f}M")
    return "\n".join(lines)

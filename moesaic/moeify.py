"""MoE layers in a model written without them: swap its MLP modules for MoE feed-forwards.

``moeify_(model, num_experts=8, top_k=2)`` replaces every MLP module (one with ``fc1`` and
``fc2`` linear layers, as timm's ``Mlp`` and this library's MLPs have; ``where`` picks others)
by a :class:`MoEFeedForward` holding a :class:`moesaic.MoE` of the same width, by default
upcycled from it (:mod:`moesaic.upcycle`). The model's own code keeps calling ``mlp(x)`` and
gets a tensor back, so the MoE's auxiliary loss cannot travel in the return value: in training
each :class:`MoEFeedForward` adds its calls' aux losses to ``aux_loss`` (as fairseq's MoE layer
keeps ``l_aux``), and :func:`collect_aux_loss` sums and clears them once per step, for the
training loss. Call ``moe_set_seed`` first and ``parallelize`` after, as for any model.

Legend: D model dim, F ffn dim.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .autograd import in_backward
from .layer import MoE
from .routing import RoutingStats
from .upcycle import upcycle_layer_

__all__ = ["MoEFeedForward", "moeify_", "collect_aux_loss", "WithAuxLoss"]


class MoEFeedForward(nn.Module):
    """A drop-in for a dense MLP module: ``forward(x)`` returns the MoE's output only. In
    training it adds each call's aux loss to ``aux_loss`` (a module called by several blocks
    sums them) until :func:`collect_aux_loss` takes it; a recomputation under activation
    checkpointing adds nothing. ``last_stats``: the last call's routing statistics."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        self.aux_loss: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        y, aux = self.moe(x)
        if self.training and not in_backward():
            self.aux_loss = aux if self.aux_loss is None else self.aux_loss + aux
        return y

    @property
    def last_stats(self) -> Optional[RoutingStats]:
        return self.moe.last_stats


def _is_mlp(name: str, module: nn.Module) -> bool:
    return (isinstance(getattr(module, "fc1", None), nn.Linear)
            and isinstance(getattr(module, "fc2", None), nn.Linear))


def moeify_(model: nn.Module, num_experts: int, *,
            where: Callable[[str, nn.Module], bool] = _is_mlp, upcycle: bool = True,
            activation: str = "gelu", **moe_kwargs) -> list[str]:
    """Replace each MLP module of ``model`` that ``where(name, module)`` selects (default: every
    module with ``fc1`` and ``fc2`` linear layers outside MoE layers) by a
    :class:`MoEFeedForward`: ``num_experts`` experts of its width (D = fc1.in_features, F =
    fc1.out_features, biases if fc1 has one), ``activation`` (the dense MLP's: it cannot be read
    from the module; "swiglu" reads ``fc3`` as the up projection), and ``moe_kwargs`` for
    :class:`moesaic.MoE`. ``upcycle`` copies each MLP into its experts. The new layers take the
    MLP's device, dtype and train/eval mode. Every selected module is checked before any is replaced.
    Returns the replaced modules' names."""
    inside_moe = {id(s) for m in model.modules() if isinstance(m, (MoE, MoEFeedForward))
                  for s in m.modules()}
    chosen = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
              if n and id(m) not in inside_moe and where(n, m)]
    if not chosen:
        raise ValueError(f"moeify_: no module of {type(model).__name__} was selected (the "
                         "default selects modules with fc1 and fc2 nn.Linear layers; pass where=)")
    for name, m in chosen:
        if not _is_mlp(name, m):
            raise ValueError(f"moeify_: {name} ({type(m).__name__}) has no fc1 and fc2 "
                             "nn.Linear layers to size the experts by")
        if m.fc2.in_features != m.fc1.out_features or m.fc2.out_features != m.fc1.in_features:
            raise ValueError(f"moeify_: {name} is not a D -> F -> D MLP: fc1 "
                             f"{m.fc1.in_features} -> {m.fc1.out_features}, fc2 "
                             f"{m.fc2.in_features} -> {m.fc2.out_features}")
    built: dict[int, MoEFeedForward] = {}  # a module shared by several names: one MoE
    for name, m in chosen:
        if id(m) in built:
            continue
        fc1, fc2 = m.fc1, m.fc2
        moe = MoE(fc1.in_features, fc1.out_features, num_experts, activation=activation,
                  bias=fc1.bias is not None and activation != "swiglu", **moe_kwargs)
        moe.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
        if upcycle:
            upcycle_layer_(moe, fc1, fc2, getattr(m, "fc3", None) if activation == "swiglu"
                           else None)
        built[id(m)] = MoEFeedForward(moe).train(m.training)  # the mode it replaces
    for name, m in chosen:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, built[id(m)])
    return [name for name, _ in chosen]


def collect_aux_loss(model: nn.Module) -> Tensor:
    """The sum of the aux losses ``model``'s MoE feed-forwards gathered since the last call (a
    zero scalar when none did), which it clears: add it to the loss once per training step."""
    losses = []
    for m in model.modules():
        if isinstance(m, MoEFeedForward) and m.aux_loss is not None:
            losses.append(m.aux_loss.float())
            m.aux_loss = None
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return torch.stack(losses).sum()


class WithAuxLoss(nn.Module):
    """A model that returns logits only, made to answer as the zoo's do: ``(logits,
    aux_loss)``, or ``(logits, aux_loss, stats)`` with ``return_stats=True`` (the form
    ``moesaic train`` calls), the aux loss from :func:`collect_aux_loss` and the statistics of
    each MoE feed-forward's last call. Wrap a model after :func:`moeify_`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, return_stats: bool = False):
        logits = self.model(x)
        aux = collect_aux_loss(self.model)
        if not return_stats:
            return logits, aux
        stats = [m.last_stats for m in self.model.modules()
                 if isinstance(m, MoEFeedForward) and m.last_stats is not None]
        return logits, aux, stats

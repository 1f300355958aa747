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

import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .autograd import in_backward
from .config import ACTIVATIONS
from .layer import MoE
from .routing import RoutingStats
from .upcycle import upcycle_layer_

__all__ = ["MoEFeedForward", "moeify_", "collect_aux_loss", "WithAuxLoss"]


class MoEFeedForward(nn.Module):
    """A drop-in for a dense MLP module: ``forward(x)`` returns the MoE's output only. In
    training (with gradients on) it adds each call's aux loss to ``aux_loss`` (a module called
    by several blocks sums them) until :func:`collect_aux_loss` takes it, which must happen
    before each backward; a recomputation under activation checkpointing adds nothing. An aux
    loss whose forward has been backpropagated without being collected is dropped, with a
    warning, at the next call (so nothing grows when no one collects). ``last_stats``: the last
    call's routing statistics."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        self.aux_loss: Optional[Tensor] = None
        self._backpropagated = False  # a backward went through the forward that made aux_loss

    def forward(self, x: Tensor) -> Tensor:
        y, aux = self.moe(x)
        if not self.training or in_backward():
            return y
        if not torch.is_grad_enabled():
            if any(p.requires_grad for p in self.moe.parameters()):
                _warn_once("a MoEFeedForward ran in training with gradients off (reentrant "
                           "activation checkpointing?): its aux loss cannot train the router "
                           "and is not collected; use torch.utils.checkpoint with "
                           "use_reentrant=False")
            return y
        if self.aux_loss is not None and self._backpropagated:
            _warn_once("a MoEFeedForward's aux loss was not collected before the backward of "
                       "its forward: call moesaic.collect_aux_loss(model) after each forward "
                       "(each micro-batch) and add it to that loss; the stale one is dropped")
            self.aux_loss = None
        self._backpropagated = False
        self.aux_loss = aux if self.aux_loss is None else self.aux_loss + aux
        if y.requires_grad:
            y.register_hook(self._mark_backpropagated)
        return y

    def _mark_backpropagated(self, grad: Tensor) -> None:
        self._backpropagated = True

    def __getstate__(self):
        """Copies and pickles leave a pending aux loss (part of a graph) behind."""
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    @property
    def last_stats(self) -> Optional[RoutingStats]:
        return self.moe.last_stats


_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def _activation(name: str, m: nn.Module, given: Optional[str]) -> str:
    """The MLP's activation: ``given``, else read from the module (``activation`` as this
    library's MLPs keep it, or an ``act`` module as timm's ``Mlp`` holds); checked against
    what the module shows."""
    own = getattr(m, "activation", None)
    act = getattr(m, "act", None)
    seen = (own if isinstance(own, str) and own in ACTIVATIONS else
            "gelu" if isinstance(act, nn.GELU) and act.approximate == "none" else
            "relu" if isinstance(act, nn.ReLU) else None)
    gated = isinstance(getattr(m, "fc3", None), nn.Linear)
    if gated and seen is None:
        seen = "swiglu"
    if given is not None and seen is not None and given != seen:
        raise ValueError(f"moeify_: {name} applies {seen!r} but activation={given!r} was given")
    found = given or seen
    if found is None:
        raise ValueError(f"moeify_: cannot tell the activation of {name} ({type(m).__name__}); "
                         f"pass activation= (one of {ACTIVATIONS})")
    if gated != (found == "swiglu"):
        raise ValueError(f"moeify_: {name} has {'an' if gated else 'no'} fc3 (the gated up "
                         f"projection) but its activation is {found!r}")
    return found


_PARTS = ("fc1", "fc2", "fc3", "act")  # what the experts take over from an MLP module


def _check_parts(name: str, m: nn.Module, upcycle: bool) -> None:
    """Refuse an MLP holding more than the experts compute: a submodule besides fc1 / fc2 /
    fc3 / act / dropouts / Identity (timm's ``Mlp(norm_layer=...)`` has a norm), a parameter of
    its own, or, when upcycling, an ``act`` module whose function the experts do not have."""
    extra = [f"{n} ({type(c).__name__})" for n, c in m.named_children()
             if n not in _PARTS and not isinstance(c, (nn.modules.dropout._DropoutNd,
                                                       nn.Identity))]
    extra += [f"{n} (a parameter)" for n, p in m.named_parameters(recurse=False)]
    if extra:
        raise ValueError(f"moeify_: {name} ({type(m).__name__}) holds {', '.join(extra)} "
                         "besides fc1 / fc2 / fc3 / act, dropouts and Identity, which its MoE "
                         "experts would not compute: "
                         "pass where= to leave it out")
    act = getattr(m, "act", None)
    known = (not isinstance(act, nn.Module) or type(act) is nn.ReLU
             or type(act) is nn.GELU and act.approximate == "none"
             or type(act) is nn.SiLU and isinstance(getattr(m, "fc3", None), nn.Linear))
    if upcycle and not known:
        raise ValueError(f"moeify_: {name}.act is {act!r}, which the experts do not compute "
                         f"(they take one of {ACTIVATIONS}, GELU exact): the upcycled layer "
                         "would not compute the MLP; pass upcycle=False to train new experts "
                         "with activation=, or where= to leave it out")


def _is_mlp(name: str, module: nn.Module) -> bool:
    return (isinstance(getattr(module, "fc1", None), nn.Linear)
            and isinstance(getattr(module, "fc2", None), nn.Linear))


def moeify_(model: nn.Module, num_experts: int, *,
            where: Callable[[str, nn.Module], bool] = _is_mlp, upcycle: bool = True,
            activation: Optional[str] = None, **moe_kwargs) -> list[str]:
    """Replace each MLP module of ``model`` that ``where(name, module)`` selects (default: every
    module with ``fc1`` and ``fc2`` linear layers outside MoE layers; inside a selected module
    nothing more is selected) by a :class:`MoEFeedForward`: ``num_experts`` experts of its
    width (D = fc1.in_features, F = fc1.out_features, biases if fc1 or fc2 has one), its activation
    (read from the module: an ``activation`` string as this library's MLPs hold, or timm's
    ``act`` GELU / ReLU, swiglu where it has ``fc3``; else give ``activation=``) and
    ``moe_kwargs`` for :class:`moesaic.MoE`. ``upcycle`` copies each MLP into its experts. The
    new layers take the MLP's device, dtype and train/eval mode; its dropout is not carried
    over (give ``dropout`` / ``hidden_dropout``). A selected module holding more than the
    experts compute (a norm, a parameter, a nested module; an ``act`` of another function when
    upcycling) is refused. Call it before ``moesaic.parallelize`` (and
    before building optimizers); every selected module is checked before any is replaced.
    Returns the replaced modules' names."""
    from .parallel.model import grad_synced

    inside_moe = {id(s) for m in model.modules() if isinstance(m, (MoE, MoEFeedForward))
                  for s in m.modules()}
    chosen = []
    for n, m in model.named_modules(remove_duplicate=False):
        outer = any(n.startswith(c + ".") for c, _ in chosen)
        if n and not outer and id(m) not in inside_moe and where(n, m):
            chosen.append((n, m))
    if not chosen:
        held = sum(isinstance(m, MoE) for m in model.modules())
        already = (f"it already holds {held} moesaic.MoE layer{'s' if held != 1 else ''}, "
                   "and moeify_ replaces dense MLPs only, never the MLPs inside MoE layers; "
                   if held else "")
        raise ValueError(f"moeify_: no module of {type(model).__name__} was selected ({already}"
                         "the default selects modules with fc1 and fc2 nn.Linear layers; pass "
                         "where=)")
    acts = {}
    for name, m in chosen:
        if not _is_mlp(name, m):
            raise ValueError(f"moeify_: {name} ({type(m).__name__}) has no fc1 and fc2 "
                             "nn.Linear layers to size the experts by")
        if m.fc2.in_features != m.fc1.out_features or m.fc2.out_features != m.fc1.in_features:
            raise ValueError(f"moeify_: {name} is not a D -> F -> D MLP: fc1 "
                             f"{m.fc1.in_features} -> {m.fc1.out_features}, fc2 "
                             f"{m.fc2.in_features} -> {m.fc2.out_features}")
        if any(grad_synced(p) for p in m.parameters()):
            raise ValueError(f"moeify_: {name} belongs to a model that moesaic.parallelize "
                             "already synchronises over ranks: moeify before parallelize")
        if upcycle and m.fc1.weight.is_meta:
            raise ValueError(f"moeify_: {name} is on the meta device, with no weights to "
                             "upcycle from: pass upcycle=False (or materialise it first)")
        _check_parts(name, m, upcycle)
        acts[id(m)] = _activation(name, m, activation)
    built: dict[int, MoEFeedForward] = {}  # a module shared by several names: one MoE
    for name, m in chosen:
        if id(m) in built:
            continue
        fc1, fc2, act = m.fc1, m.fc2, acts[id(m)]
        with torch.device(fc1.weight.device):
            moe = MoE(fc1.in_features, fc1.out_features, num_experts, activation=act,
                      bias=(fc1.bias is not None or fc2.bias is not None) and act != "swiglu",
                      **moe_kwargs)
        moe.to(dtype=fc1.weight.dtype)
        if upcycle:
            upcycle_layer_(moe, fc1, fc2, m.fc3 if act == "swiglu" else None)
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
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()


class WithAuxLoss(nn.Module):
    """A model that returns logits only, made to answer as the zoo's do: ``(logits,
    aux_loss)``, or ``(logits, aux_loss, stats)`` with ``return_stats=True`` (the form
    ``moesaic train`` calls), the aux loss from :func:`collect_aux_loss` and the statistics of
    each MoE feed-forward's last call (one entry per module, also for a module several blocks
    share). Wrap a model after :func:`moeify_`."""

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

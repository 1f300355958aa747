"""MoE layers in a model written without them: swap its MLP modules for MoE feed-forwards.

``moeify_(model, num_experts=8, top_k=2)`` replaces every MLP module (one with ``fc1`` and
``fc2`` linear layers, as timm's ``Mlp`` and this library's MLPs have; ``names`` maps other
layouts, e.g. nanoGPT's ``c_fc`` / ``c_proj``, and ``where`` picks modules) by a
:class:`MoEFeedForward` holding a :class:`moesaic.MoE` of the same width, by default
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
import torch.nn.functional as F
from torch import Tensor

from .autograd import in_backward
from .config import ACTIVATIONS
from .layer import MoE
from .routing import RoutingStats
from .upcycle import mlp_names, upcycle_layer_

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
                _warn_once("a MoEFeedForward ran in training mode with gradients off "
                           "(torch.no_grad(), or reentrant activation checkpointing): its aux "
                           "loss cannot train the router and is not kept. A forward that does "
                           "not train can run under model.eval(); checkpointing should use "
                           "torch.utils.checkpoint with use_reentrant=False")
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


_PROBE_X = torch.cat([torch.linspace(-6.0, 6.0, 97), torch.tensor([-1e4, -100.0, -20.0, 20.0,
                                                                   100.0, 1e4])])


def _probe(act: nn.Module, device: torch.device) -> Optional[str]:
    """Which of gelu (exact), relu and silu the module ``act`` computes: torch's own classes by
    type, any other class by calling its forward (no hooks) on points of [-6, 6] and far out
    to +-1e4, where look-alikes (ReLU6, a clamped GELU) part from the real function."""
    if type(act) is nn.ReLU or type(act) is nn.SiLU:
        return "relu" if type(act) is nn.ReLU else "silu"
    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else None
    x = _PROBE_X.to(device)
    try:
        with torch.no_grad(), torch.device(device):
            y = act.forward(x.clone())
    except Exception:  # a module that is not a function of one tensor: not an activation
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return None
    y = y.detach().float().cpu()
    refs = {"gelu": F.gelu(_PROBE_X), "relu": F.relu(_PROBE_X), "silu": F.silu(_PROBE_X)}
    return next((n for n, ref in refs.items() if torch.allclose(y, ref, rtol=1e-5, atol=1e-6)),
                None)


class _Parts:
    """An MLP module's linear layers (found at once) and activation module (``resolve``)."""

    def __init__(self, m: nn.Module, names: dict):
        self.m, self.names = m, names
        self.fc1, self.fc2 = (getattr(m, names[r], None) for r in ("fc1", "fc2"))
        fc3 = getattr(m, names["fc3"], None)
        self.fc3 = fc3 if isinstance(fc3, nn.Linear) else None

    def has_linears(self) -> bool:
        return isinstance(self.fc1, nn.Linear) and isinstance(self.fc2, nn.Linear)

    def resolve(self, name: str) -> "_Parts":
        """Find the activation module (``names["act"]``, else an only parameterless child that
        evaluates to gelu, relu or silu), what it computes (``probed``) and what else the module
        holds (``extra``)."""
        m, names = self.m, self.names
        linears = {names["fc1"], names["fc2"], names["fc3"]}
        device = self.fc1.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        act = getattr(m, names["act"], None)
        self.act_name, self.act, self.probed = names["act"], None, None
        if isinstance(act, nn.Module):
            self.act, self.probed = act, _probe(act, device)
        elif names["act"] != "act":
            raise ValueError(f"moeify_: {name} ({type(m).__name__}) has no module "
                             f"{names['act']!r}, which names= gives as its activation")
        else:  # nanoGPT's ``self.gelu``: its only parameterless child, if it is an activation
            loose = [(n, c) for n, c in m.named_children()
                     if n not in linears and not _passive(c) and next(c.parameters(), None) is None]
            if len(loose) == 1:  # one of torch's activation classes, or one that evaluates as
                probed = _probe(loose[0][1], device)  # gelu, relu or silu
                if probed is not None or type(loose[0][1]).__module__ == nn.ReLU.__module__:
                    (self.act_name, self.act), self.probed = loose[0], probed
        self.extra = [f"{n} ({type(c).__name__})" for n, c in m.named_children()
                      if n not in linears and c is not self.act and not _passive(c)]
        self.extra += [f"{n} (a parameter)" for n, _ in m.named_parameters(recurse=False)]
        return self


def _passive(c: nn.Module) -> bool:
    return isinstance(c, (nn.modules.dropout._DropoutNd, nn.Identity))


def _activation(name: str, m: nn.Module, parts: _Parts, given: Optional[str],
                upcycle: bool) -> str:
    """The MLP's activation: ``given``, else read from the module (``activation`` as this
    library's MLPs keep it, or its activation module, whatever its class, by evaluating it);
    checked against what the module shows. Upcycling refuses an activation module that does
    not compute the experts' function."""
    own = getattr(m, "activation", None)
    own = own if isinstance(own, str) and own in ACTIVATIONS else None
    gated = parts.fc3 is not None
    probed = {"silu": "swiglu" if gated else None, "gelu": "gelu", "relu": "relu"}.get(
        parts.probed)
    where_act = f"{name}.{parts.act_name}"
    if parts.act is not None and probed is None and (upcycle or (given or own) is None):
        if upcycle:
            raise ValueError(f"moeify_: {where_act} is {parts.act!r}, which the experts do not "
                             f"compute (they take one of {ACTIVATIONS}, GELU exact, silu for "
                             "swiglu): the upcycled layer would not compute the MLP; pass "
                             "upcycle=False to train new experts with activation=, or where= "
                             "to leave it out")
        raise ValueError(f"moeify_: cannot tell the activation of {name} ({type(m).__name__}); "
                         f"pass activation= (one of {ACTIVATIONS})")
    if own is not None and probed is not None and own != probed:
        raise ValueError(f"moeify_: {name} says activation={own!r} but {where_act} computes "
                         f"{probed!r}")
    seen = own or probed or ("swiglu" if gated else None)
    if given is not None and seen is not None and given != seen:
        raise ValueError(f"moeify_: {name} applies {seen!r} but activation={given!r} was given")
    found = given or seen
    if found is None:
        raise ValueError(f"moeify_: cannot tell the activation of {name} ({type(m).__name__}); "
                         f"pass activation= (one of {ACTIVATIONS})")
    if gated != (found == "swiglu"):
        raise ValueError(f"moeify_: {name} has {'an' if gated else 'no'} "
                         f"{parts.names['fc3']} (the gated up projection) but its activation "
                         f"is {found!r}")
    return found


def _check_parts(name: str, m: nn.Module, parts: _Parts) -> None:
    """Refuse an MLP holding more than the experts compute: a submodule besides the linear
    layers, the activation, dropouts and Identity (timm's ``Mlp(norm_layer=...)`` has a norm),
    or a parameter of its own."""
    if parts.extra:
        roles = ("fc1", "fc2", "fc3") if parts.fc3 is not None else ("fc1", "fc2")
        listed = " / ".join(parts.names[r] for r in roles)
        raise ValueError(f"moeify_: {name} ({type(m).__name__}) holds {', '.join(parts.extra)} "
                         f"besides {listed}, its activation, dropouts and Identity, which its "
                         "MoE experts would not compute: pass where= to leave it out (names= "
                         "maps other names of the linear layers and the activation)")


def moeify_(model: nn.Module, num_experts: int, *,
            where: Optional[Callable[[str, nn.Module], bool]] = None, upcycle: bool = True,
            activation: Optional[str] = None, names: Optional[dict] = None,
            **moe_kwargs) -> list[str]:
    """Replace each MLP module of ``model`` that ``where(name, module)`` selects (default: every
    module with ``fc1`` and ``fc2`` linear layers outside MoE layers; inside a selected module
    nothing more is selected) by a :class:`MoEFeedForward`: ``num_experts`` experts of its
    width (D = fc1.in_features, F = fc1.out_features, biases if fc1 or fc2 has one), its activation
    (read from the module: an ``activation`` string as this library's MLPs hold, or its
    activation module, ``act`` or its only parameterless child, evaluated to tell gelu from
    relu; swiglu where it has ``fc3``, the gated up projection, with fc1 under the silu; else
    give ``activation=``) and ``moe_kwargs`` for :class:`moesaic.MoE`. ``names`` maps these
    roles to a model's own attribute names: nanoGPT's MLP is ``names={"fc1": "c_fc", "fc2":
    "c_proj"}``, a Llama MLP ``{"fc1": "gate_proj", "fc3": "up_proj", "fc2": "down_proj",
    "act": "act_fn"}``. ``upcycle`` copies each MLP into its experts. The
    new layers take the MLP's device, dtype and train/eval mode; its dropout is not carried
    over (give ``dropout`` / ``hidden_dropout``). A selected module holding more than the
    experts compute (a norm, a parameter, a nested module; an ``act`` of another function when
    upcycling) is refused. Call it before ``moesaic.parallelize`` (and
    before building optimizers); every selected module is checked before any is replaced.
    Returns the replaced modules' names."""
    from .parallel.model import grad_synced

    names = mlp_names(names, "moeify_")
    for key in ("d_model", "d_ff"):
        if key in moe_kwargs:
            raise TypeError(f"moeify_: {key} comes from each MLP, not from the keyword "
                            "arguments for moesaic.MoE")
    bias = moe_kwargs.pop("bias", None)
    if where is None:
        def where(n: str, m: nn.Module) -> bool:
            return _Parts(m, names).has_linears()
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
                         f"the default selects modules with {names['fc1']} and {names['fc2']} "
                         "nn.Linear layers; pass names= for other attribute names (nanoGPT: "
                         "names={'fc1': 'c_fc', 'fc2': 'c_proj'}) or where=)")
    if upcycle and moe_kwargs.get("num_shared_experts"):
        raise ValueError("moeify_: upcycling copies each MLP into the routed experts and has "
                         "nothing to start shared experts from: pass upcycle=False with "
                         "num_shared_experts")
    acts, found = {}, {}
    for name, m in chosen:
        parts = found[id(m)] = _Parts(m, names)
        fc1, fc2 = parts.fc1, parts.fc2
        if not parts.has_linears():
            raise ValueError(f"moeify_: {name} ({type(m).__name__}) has no {names['fc1']} and "
                             f"{names['fc2']} nn.Linear layers to size the experts by (names= "
                             "maps other attribute names)")
        if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
            raise ValueError(f"moeify_: {name} is not a D -> F -> D MLP: {names['fc1']} "
                             f"{fc1.in_features} -> {fc1.out_features}, {names['fc2']} "
                             f"{fc2.in_features} -> {fc2.out_features}")
        if any(grad_synced(p) for p in m.parameters()):
            raise ValueError(f"moeify_: {name} belongs to a model that moesaic.parallelize "
                             "already synchronises over ranks: moeify before parallelize")
        if upcycle and fc1.weight.is_meta:
            raise ValueError(f"moeify_: {name} is on the meta device, with no weights to "
                             "upcycle from: pass upcycle=False (or materialise it first)")
        _check_parts(name, m, parts.resolve(name))
        act = acts[id(m)] = _activation(name, m, parts, activation, upcycle)
        # swiglu experts have no biases (the upcycle refuses a gated MLP with them)
        parts.bias = (fc1.bias is not None or fc2.bias is not None) and act != "swiglu"
        if upcycle and bias is not None and bias != parts.bias:
            raise ValueError(f"moeify_: bias={bias} was given but the experts upcycled from "
                             f"{name} have {'biases' if parts.bias else 'none'}: leave bias "
                             "out, or pass upcycle=False")
    built: dict[int, MoEFeedForward] = {}  # a module shared by several names: one MoE
    for name, m in chosen:
        if id(m) in built:
            continue
        parts, act = found[id(m)], acts[id(m)]
        fc1, fc2 = parts.fc1, parts.fc2
        with torch.device(fc1.weight.device):
            moe = MoE(fc1.in_features, fc1.out_features, num_experts, activation=act,
                      bias=parts.bias if bias is None else bias, **moe_kwargs)
        moe.to(dtype=fc1.weight.dtype)
        if upcycle:
            upcycle_layer_(moe, fc1, fc2, parts.fc3 if act == "swiglu" else None)
        built[id(m)] = MoEFeedForward(moe).train(m.training)  # the mode it replaces
    for name, m in chosen:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, built[id(m)])
    return [name for name, _ in chosen]


def collect_aux_loss(model: nn.Module) -> Tensor:
    """The sum of the aux losses ``model``'s MoE feed-forwards gathered since the last call (a
    zero scalar when none did), which it clears: add it to the loss once per training step."""
    losses, wrapped, bare = [], set(), []
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            wrapped.add(id(m.moe))
            if m.aux_loss is not None:
                losses.append(m.aux_loss.float())
                m.aux_loss = None
        elif isinstance(m, MoE):
            bare.append(m)
    if any(id(m) not in wrapped for m in bare):
        _warn_once("collect_aux_loss collects from moesaic.MoEFeedForward modules only, and "
                   "this model holds moesaic.MoE layers outside them: those return their aux "
                   "loss from each call (y, aux = layer(x)), which the model must add to its "
                   "loss itself (or wrap each layer in moesaic.MoEFeedForward)")
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

"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model initialised from a dense one.

Every expert of an MoE layer (and the PR-MoE residual MLP) starts as a copy of the dense MLP at
the same place; the router, the PR-MoE mixing coefficient and the selection biases keep the MoE
model's own initialisation; every other weight is the dense model's. The copy is made into the
experts this rank holds, so it gives the same model under any expert-parallel layout and needs
no communication.

Where the combine weights of a token sum to 1 (top_k >= 2 with ``normalize_weights``, the
default there; or top-1 with ``normalize_weights=True``), ``routed_scale`` is 1 and nothing is
dropped, the upcycled layer computes the dense MLP (up to rounding; in eval, as dropout masks
differ). With top-1 unnormalised weights w(x) (the softmax probability, or the sigmoid score)
the experts' part starts at w(x) * MLP(x) (PR-MoE: (c0 * w(x) + c1) * MLP(x)).

Legend: D model dim, F ffn dim.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .layer import MoE

__all__ = ["upcycle_layer_", "upcycle_"]

DENSE_MLP = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight")  # per MoE place


def _ffn_tensors(layer: MoE, where: str, w1_FD: Tensor, b1_F: Optional[Tensor], w2_DF: Tensor,
                 b2_D: Optional[Tensor], w3_FD: Optional[Tensor]) -> dict:
    """The dense MLP's tensors checked against ``layer``; returns {experts' name: [D, F]-style
    tensor of one expert} (biases zero where the dense MLP has none and the experts have one)."""
    c = layer.config
    ex = layer.experts
    if ex.w1.is_meta:
        raise ValueError(f"{where}: the layer is on the meta device; materialise it first "
                         "(to_empty and reset_parameters)")
    if layer.shared is not None:
        raise ValueError(f"{where}: the layer has shared experts (num_shared_experts="
                         f"{c.num_shared_experts}), which no copy of one dense MLP reproduces; "
                         "upcycle a layer without them")

    def need(name: str, t: Optional[Tensor], shape: tuple) -> None:
        if t is not None and (not isinstance(t, Tensor) or t.is_meta):
            raise ValueError(f"{where}: the dense {name} must be a tensor with data, got "
                             f"{'a meta tensor' if isinstance(t, Tensor) else type(t).__name__}")
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{where}: the dense {name} has shape {tuple(t.shape)}, the experts "
                             f"need {shape} (d_model={c.d_model}, d_ff={c.d_ff})")

    need("fc1.weight", w1_FD, (c.d_ff, c.d_model))
    need("fc2.weight", w2_DF, (c.d_model, c.d_ff))
    need("fc1.bias", b1_F, (c.d_ff,))
    need("fc2.bias", b2_D, (c.d_model,))
    need("fc3.weight", w3_FD, (c.d_ff, c.d_model))
    gated = ex.w3 is not None
    if gated and w3_FD is None:
        raise ValueError(f"{where}: the experts are gated (activation='swiglu') and need the "
                         "dense MLP's up projection fc3 (fc1 is the gate)")
    if not gated and w3_FD is not None:
        raise ValueError(f"{where}: the dense MLP is gated (it has fc3) but the experts use "
                         f"activation={c.activation!r}")
    for name, t in (("fc1.bias", b1_F), ("fc2.bias", b2_D)):
        if t is not None and ex.b1 is None:
            raise ValueError(f"{where}: the dense MLP has {name} but the experts have no biases "
                             f"(bias={c.bias}, activation={c.activation!r})")
    out = {"w1": w1_FD.t(), "w2": w2_DF.t()}
    if gated:
        out["w3"] = w3_FD.t()
    if ex.b1 is not None:
        out["b1"] = b1_F if b1_F is not None else w1_FD.new_zeros(c.d_ff)
        out["b2"] = b2_D if b2_D is not None else w2_DF.new_zeros(c.d_model)
    return out


# the PR-MoE residual MLP (built with the experts' activation and bias) names them so
RESIDUAL_NAMES = {"w1": "fc1.weight", "w2": "fc2.weight", "w3": "fc3.weight", "b1": "fc1.bias",
                  "b2": "fc2.bias"}


@torch.no_grad()
def _copy(layer: MoE, where: str, w1_FD, b1_F, w2_DF, b2_D, w3_FD) -> None:
    per_expert = _ffn_tensors(layer, where, w1_FD, b1_F, w2_DF, b2_D, w3_FD)
    for name, t in per_expert.items():
        p = getattr(layer.experts, name)
        p.copy_(t.to(p.dtype).expand_as(p))
        if layer.residual is not None:  # nn.Linear layout: weights [out, in]
            layer.residual.get_parameter(RESIDUAL_NAMES[name]).copy_(t.t() if t.dim() == 2 else t)


def _linear(m, name: str) -> tuple[Tensor, Optional[Tensor]]:
    if not isinstance(m, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(m).__name__}")
    return m.weight, m.bias


def upcycle_layer_(layer: MoE, fc1: nn.Linear, fc2: nn.Linear,
                   fc3: Optional[nn.Linear] = None) -> MoE:
    """Copy a dense MLP ``fc2(act(fc1(x)))`` into every expert ``layer`` holds (and its PR-MoE
    residual MLP); for swiglu experts ``fc1`` is the gate (through silu) and ``fc3`` the up
    projection: ``fc2(silu(fc1(x)) * fc3(x))``. The activation is the caller's to match. A dense
    MLP without biases gives experts with zero biases. Returns ``layer``."""
    if not isinstance(layer, MoE):
        raise TypeError(f"layer must be a moesaic.MoE, got {type(layer).__name__}")
    w1, b1 = _linear(fc1, "fc1")
    w2, b2 = _linear(fc2, "fc2")
    w3 = None
    if fc3 is not None:
        w3, b3 = _linear(fc3, "fc3")
        if b3 is not None:
            raise ValueError("fc3 (the gated MLP's up projection) must have no bias, as the "
                             "swiglu experts have none")
    _copy(layer, "upcycle_layer_", w1, b1, w2, b2, w3)
    return layer


def moe_prefixes(model: nn.Module) -> dict[str, MoE]:
    """{"NAME.": layer} for every name under which an MoE layer is reached (a shared layer
    under each name; "" for a model that is itself one)."""
    return {(name + "." if name else ""): m
            for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, MoE)}


def _dense_prefix(model: nn.Module, prefix: str) -> str:
    """Where the dense MLP of the MoE layer at ``prefix`` is stored: the same name, or for the
    layer of a :func:`moesaic.moeify_` feed-forward (NAME.moe.) the MLP it replaced (NAME.)."""
    from .moeify import MoEFeedForward

    if prefix != "moe." and not prefix.endswith(".moe."):
        return prefix
    parent = prefix[:-len("moe.")]
    owner = model.get_submodule(parent[:-1]) if parent else model
    return parent if isinstance(owner, MoEFeedForward) else prefix


def _listed(items: list[str], limit: int = 12) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


MLP_ROLES = ("fc1", "fc2", "fc3", "act")  # a dense MLP's parts, which the experts take over


def mlp_names(names: Optional[dict], caller: str) -> dict:
    """Each role's attribute name in a dense MLP: ``names`` (e.g. nanoGPT's ``{"fc1": "c_fc",
    "fc2": "c_proj"}``) over the defaults fc1, fc2, fc3 (the gated up projection) and act."""
    given = dict(names or {})
    stray = sorted(set(given) - set(MLP_ROLES))
    if stray:
        raise ValueError(f"{caller}: names has keys {stray}; its keys are {list(MLP_ROLES)} "
                         "(the attribute names of the up, down and gated up projections and "
                         "of the activation module)")
    return {**{r: r for r in MLP_ROLES}, **given}


@torch.no_grad()
def upcycle_(model: nn.Module, dense_state_dict: dict, keep: tuple = (),
             names: Optional[dict] = None) -> list[str]:
    """Initialise ``model`` from a dense model's state dict by sparse upcycling.

    Each MoE layer reached as NAME takes the dense MLP stored as NAME.fc1.*, NAME.fc2.* (and
    NAME.fc3.weight for swiglu; ``names`` maps fc1 / fc2 / fc3 to other attribute names, as in
    :func:`moesaic.moeify_`) into all its experts and its residual MLP (the layer of a
    :func:`moesaic.moeify_` feed-forward, NAME.moe, the MLP it replaced, NAME.*); its router, mixing
    coefficient and selection biases keep their values. Every other entry of ``model`` must be
    in ``dense_state_dict`` with its shape, except those named in ``keep`` (left as they are,
    e.g. a classifier for another number of classes), and every entry of ``dense_state_dict``
    must be used (or kept): otherwise a ValueError names them, before anything is written.
    Works on a model under any expert-parallel layout, on every rank, without communication.
    Returns the names of the upcycled layers (a layer shared by several names once per name)."""
    dense = dense_state_dict
    names = mlp_names(names, "upcycle_")
    if isinstance(keep, str):
        raise TypeError(f"keep must be a tuple of state-dict keys, got the string {keep!r}")
    prefixes = moe_prefixes(model)
    if not prefixes:
        raise ValueError(f"upcycle_: {type(model).__name__} has no MoE layer to upcycle into")
    own = model.state_dict()
    outside = {k for k in own if not any(k.startswith(p) for p in prefixes)}
    stray = sorted(set(keep) - outside)
    if stray:
        raise ValueError(f"upcycle_: keep names {_listed(stray)}, which are not entries of this "
                         "model outside its MoE layers")
    used, missing, bad = set(keep) & set(dense), [], []
    new = {}
    for key in sorted(outside):
        t, d = own[key], dense.get(key)
        if key in keep:
            new[key] = t
        elif key not in dense:
            missing.append(key)
        elif not isinstance(d, Tensor) or d.is_meta:
            bad.append(f"{key}: not a tensor with data "
                       f"({'meta' if isinstance(d, Tensor) else type(d).__name__})")
        elif tuple(d.shape) != tuple(t.shape):
            bad.append(f"{key}: {tuple(d.shape)} in the dense model, {tuple(t.shape)} here")
            used.add(key)  # reported here, not again as unused
        else:
            new[key] = d
            used.add(key)
    done, layers = [], {}
    for prefix, layer in prefixes.items():
        name = prefix[:-1] or "<model>"
        keys = {s: _dense_prefix(model, prefix) + names[s.split(".")[0]] + s[s.index("."):]
                for s in DENSE_MLP}
        absent = [keys[s] for s in ("fc1.weight", "fc2.weight") if keys[s] not in dense]
        if absent:
            missing.append(f"{' and '.join(absent)} (the dense MLP for the MoE layer {name})")
            continue
        got = [dense.get(keys[s]) for s in DENSE_MLP]
        _ffn_tensors(layer, name, *got)  # every layer checked before any is written
        used.update(n for n in keys.values() if n in dense)
        first = layers.setdefault(id(layer), (prefix, got))
        for s, a, b in zip(DENSE_MLP, first[1], got):
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise ValueError(f"upcycle_: the MoE layer shared as {first[0][:-1]} and {name} "
                                 f"has different dense MLPs under those names ({s} differs)")
        done.append(name)
    under_moe = sorted(k for k in dense if k not in used and k not in outside
                       and any(k.startswith(p) for p in prefixes))
    unknown = sorted(k for k in dense if k not in used and k not in under_moe)
    problems = []
    if missing:
        problems.append("missing in the dense state dict: " + _listed(missing))
    if bad:
        problems.append("entries that do not fit: " + _listed(bad) + " (keep=(NAME, ...) leaves "
                        "entries as this model has them, e.g. a classifier for other classes)")
    if under_moe:
        problems.append("not a dense MLP's fc1/fc2 weight or bias or fc3 weight, at an MoE "
                        "layer's place: " + _listed(under_moe))
    if unknown:
        problems.append("no such entry in this model: " + _listed(unknown))
    if problems:
        raise ValueError("upcycle_: the dense state dict does not fit this model: "
                         + " | ".join(problems))
    model.load_state_dict(new, strict=False)
    for prefix, got in layers.values():
        _copy(prefixes[prefix], prefix[:-1] or "<model>", *got)
    return done

"""Atomic checkpoints that load under any expert-parallel layout.

A checkpoint is a folder ``<run>/checkpoints/epoch_NNNN/`` holding
- ``model.safetensors``: the full model, experts stacked by global index (every layout writes
  the same tensors), shared tensors stored once (aliases in the metadata);
- ``optimizer.safetensors``: AdamW's ``exp_avg`` / ``exp_avg_sq`` of every parameter, by
  parameter name, also gathered to global experts, so they too load under another layout;
- ``state.pt``: epoch, step, scheduler, loss scaler, per-rank RNG states, AdamW step counts,
  history of per-epoch metrics, and the resolved config.
It is written into a temporary folder that is renamed into place only when complete, and
``latest.json`` / ``best.json`` pointers are replaced atomically after it, so a crash at any
moment leaves the previous checkpoint readable. A folder is never replaced in place: an epoch
written again (after resuming from an earlier checkpoint) goes to ``epoch_NNNN.1`` (``.2``, ...),
and the older folder of that epoch is deleted only after ``latest.json`` points at the new one.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..parallel import full_state_dict, load_full_state_dict
from .dist import multi_process
from .report import replace_atomically

MOMENTS = ("exp_avg", "exp_avg_sq")
STATE_FILE = "state.pt"


class CheckpointError(RuntimeError):
    pass


class ModelMismatch(CheckpointError):
    """The checkpoint's tensors do not fit the model built (other model or model_args)."""


def _to_storable(tensors: dict) -> tuple[dict, dict]:
    """CPU, contiguous, one copy per shared tensor: (tensors, {alias: stored name})."""
    out, aliases, seen = {}, {}, {}
    for k, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        out[k] = t.detach().to("cpu").contiguous().clone()
    return out, aliases


def _save_tensors(tensors: dict, path: str) -> None:
    stored, aliases = _to_storable(tensors)
    save_file(stored, path, metadata={"aliases": json.dumps(aliases)})


def _load_tensors(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    out = load_file(path)
    for alias, name in aliases.items():
        out[alias] = out[name]
    return out


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


def gather_moments(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (all global experts) AdamW moments by parameter name, and the step counts.

    Collective under expert parallelism: each moment is swapped into the parameters for one
    ``full_state_dict`` call, which gathers experts by global index exactly like the weights.
    """
    named = _named_params(model)
    moments, steps = {}, {}
    for m in MOMENTS:
        saved = {}
        for n, p in named.items():
            st = optimizer.state.get(p, {})
            saved[n] = p.data
            p.data = st[m] if m in st else torch.zeros_like(p.data)
        try:
            full = full_state_dict(model)
        finally:
            for n, p in named.items():
                p.data = saved[n]
        for n in named:
            if full is not None and n in full:
                moments[f"{m}/{n}"] = full[n]
    for n, p in named.items():
        st = optimizer.state.get(p, {})
        if "step" in st:
            steps[n] = float(st["step"])
    return moments, steps


def scatter_moments(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict,
                    moments: dict, steps: dict) -> None:
    """Inverse of :func:`gather_moments`: give each local parameter its slice of the moments."""
    named = _named_params(model)
    if not steps:
        return
    loaded = {}
    for m in MOMENTS:
        full = dict(weights)
        full.update({n: moments[f"{m}/{n}"] for n in named if f"{m}/{n}" in moments})
        saved = {n: p.data.clone() for n, p in named.items()}
        load_full_state_dict(model, full)
        loaded[m] = {n: p.data.clone() for n, p in named.items()}
        with torch.no_grad():
            for n, p in named.items():
                p.data.copy_(saved[n])
    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
    for n, p in named.items():
        if n not in steps:
            continue
        optimizer.state[p] = {  # fused/capturable AdamW keeps its step count on the device
            "step": torch.tensor(steps[n], dtype=torch.float32,
                                 device=p.device if on_device else "cpu"),
            "exp_avg": loaded["exp_avg"][n].to(p.dtype), "exp_avg_sq": loaded["exp_avg_sq"][n].to(p.dtype),
        }


def rng_state(model: nn.Module) -> dict:
    """This rank's random streams: torch CPU (dropout), CUDA, and the routers' noise."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    gens = {}
    for n, mod in model.named_modules():
        g = getattr(mod, "noise_generator", None)
        if isinstance(g, torch.Generator):
            gens[n] = g.get_state()
    state["noise"] = gens
    return state


def set_rng_state(model: nn.Module, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mods = dict(model.named_modules())
    for n, s in state.get("noise", {}).items():
        g = getattr(mods.get(n), "noise_generator", None)
        if isinstance(g, torch.Generator):
            g.set_state(s)


def _write_json(path: str, obj) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())

    replace_atomically(path, write)


def _fsync_dir(path: str, files: bool = False) -> None:
    """Flush a folder's entries (and, with ``files``, its files) to disk, so that after a power
    loss a renamed checkpoint is complete, not a folder of empty files."""
    names = [os.path.join(path, n) for n in os.listdir(path)] if files else []
    for p in names + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def save(ckpt_root: str, epoch: int, model: nn.Module, optimizer, state: dict, is_main: bool,
         is_best: bool, keep: int) -> Optional[str]:
    """Write ``epoch_NNNN`` (collective: every rank calls it); returns its path on every rank."""
    weights = full_state_dict(model)
    moments, steps = gather_moments(model, optimizer)
    rng = rng_state(model)
    if multi_process():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rng)
    else:
        ranks = [rng]
    path = None
    if is_main:
        name = _unused_name(ckpt_root, f"epoch_{epoch:04d}")
        path = os.path.join(ckpt_root, name)
        for n in os.listdir(ckpt_root):  # left by a writer that was killed mid-save
            if n.startswith(".tmp-"):
                shutil.rmtree(os.path.join(ckpt_root, n), ignore_errors=True)
        tmp = os.path.join(ckpt_root, f".tmp-{name}-{os.getpid()}")
        os.makedirs(tmp, exist_ok=True)
        _save_tensors(weights, os.path.join(tmp, "model.safetensors"))
        _save_tensors(moments, os.path.join(tmp, "optimizer.safetensors"))
        torch.save({**state, "rng": ranks, "adam_steps": steps}, os.path.join(tmp, STATE_FILE))
        _fsync_dir(tmp, files=True)
        os.replace(tmp, path)
        _fsync_dir(ckpt_root)
        _write_json(os.path.join(ckpt_root, "latest.json"), {"name": name, "epoch": epoch})
        if is_best:
            _write_json(os.path.join(ckpt_root, "best.json"), {"name": name, "epoch": epoch})
        _remove_superseded(ckpt_root, epoch, name)
        _prune(ckpt_root, keep)
    if multi_process():  # every rank learns the path (rank 0 chose the name)
        shared = [path]
        dist.broadcast_object_list(shared, src=0)
        path = shared[0]
    return path


def point_latest(ckpt: str, epoch: int) -> None:
    """Make ``latest.json`` of the checkpoint's run name it: a run resumed from an earlier
    checkpoint into its own run dir continues from there, so ``--resume RUN_DIR`` must too."""
    root, name = os.path.split(os.path.abspath(ckpt))
    if pointer(root, "latest.json") != name:
        _write_json(os.path.join(root, "latest.json"), {"name": name, "epoch": epoch})


def point_best(ckpt: str, epoch: int, history: list) -> None:
    """After resuming from an earlier checkpoint of the same run, ``best.json`` may name a
    folder of the abandoned later epochs: point it at the best of the kept history's
    checkpoints (the resumed one, or the folder of the best epoch that this history wrote,
    ``epoch_NNNN`` or a re-saved ``epoch_NNNN.N``), or drop it when none is left (the next
    improvement writes it again)."""
    root, name = os.path.split(os.path.abspath(ckpt))
    best = pointer(root, "best.json")
    if best is None or _epoch_of(best) <= epoch:
        return
    accs = [r["eval_accuracy"] for r in history[:epoch]]
    k = accs.index(max(accs)) + 1 if accs else 0  # the first of equals, as training keeps it
    target = name if k == epoch else _folder_of(root, k, history[:k]) if k else None
    path = os.path.join(root, "best.json")
    if target is None:
        os.remove(path)
    else:
        _write_json(path, {"name": target, "epoch": k})


def _folder_of(root: str, epoch: int, history: list) -> Optional[str]:
    """The folder of ``epoch`` whose saved history is ``history`` (the same lineage: another
    folder of that epoch may hold an abandoned run's weights), newest first; None if none."""
    names = sorted((n for n in os.listdir(root) if n.startswith("epoch_")
                    and _epoch_of(n) == epoch), key=_copy_of, reverse=True)
    for n in names:
        try:
            saved = read_state(os.path.join(root, n)).get("history", [])[:epoch]
        except CheckpointError:
            continue
        if saved == history:
            return n
    return None


def _copy_of(name: str) -> int:
    """0 for ``epoch_NNNN``, N for ``epoch_NNNN.N``."""
    return int(name.split(".", 1)[1]) if "." in name else 0


def _epoch_of(name: str) -> int:
    return int(name.split("_", 1)[1].split(".", 1)[0])


def _unused_name(ckpt_root: str, base: str) -> str:
    """``base``, or ``base.N`` when a folder of that name exists (an epoch written again after
    resuming from an earlier checkpoint): a new checkpoint never replaces a folder in place."""
    name, n = base, 0
    while os.path.exists(os.path.join(ckpt_root, name)):
        n += 1
        name = f"{base}.{n}"
    return name


def _remove_superseded(ckpt_root: str, epoch: int, name: str) -> None:
    """Delete older checkpoints of ``epoch`` once ``latest.json`` names ``name``, except one that
    ``best.json`` still names."""
    best = pointer(ckpt_root, "best.json")
    for n in os.listdir(ckpt_root):
        if n.startswith("epoch_") and n not in (name, best) and _epoch_of(n) == epoch:
            shutil.rmtree(os.path.join(ckpt_root, n), ignore_errors=True)


def pointer(ckpt_root: str, file: str) -> Optional[str]:
    path = os.path.join(ckpt_root, file)
    return _read_json(path)["name"] if os.path.exists(path) else None


def _prune(ckpt_root: str, keep: int) -> None:
    """Keep the latest checkpoint, the best one and the newest others up to ``keep`` in all.
    The latest is kept first: after resuming from an earlier checkpoint, folders of later
    epochs from the abandoned run may remain until they are superseded."""
    latest, best = pointer(ckpt_root, "latest.json"), pointer(ckpt_root, "best.json")
    names = sorted((n for n in os.listdir(ckpt_root) if n.startswith("epoch_") and n != latest),
                   key=lambda n: (_epoch_of(n), n))
    for n in names[:max(len(names) - (keep - 1), 0)]:
        if n != best:
            shutil.rmtree(os.path.join(ckpt_root, n), ignore_errors=True)


def find(path: str) -> str:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder or a run dir."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        latest = os.path.join(root, "latest.json")
        if os.path.isfile(latest):
            try:
                ck = os.path.join(root, _read_json(latest)["name"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{latest} is unreadable ({e!r}); {_others(root)}") from e
            if os.path.isfile(os.path.join(ck, STATE_FILE)):
                return ck
            raise CheckpointError(f"{latest} names {os.path.basename(ck)}, which holds no "
                                  f"{STATE_FILE} (deleted or moved?); {_others(root)}")
    runs = sorted(d for d in (os.listdir(path) if os.path.isdir(path) else [])
                  if os.path.isfile(os.path.join(path, d, "checkpoints", "latest.json")))
    hint = (f"; it holds runs: name one, e.g. {os.path.join(path, runs[-1])} (the newest of "
            f"{len(runs)})" if runs else "")
    root = os.path.join(path, "checkpoints")
    if not runs and _resumable(root):
        hint = f"; its checkpoints/ has no latest.json, but {_others(root)}"
    raise CheckpointError(f"no checkpoint at {os.path.abspath(path)}: expected a checkpoint "
                          f"folder (with {STATE_FILE}) or a run dir with checkpoints/latest.json"
                          + hint)


def _resumable(ckpt_root: str, but: Optional[str] = None) -> list[str]:
    """The checkpoint folders of ``ckpt_root`` (but ``but``) that hold a state file."""
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(n for n in os.listdir(ckpt_root) if n.startswith("epoch_") and n != but
                  and os.path.isfile(os.path.join(ckpt_root, n, STATE_FILE)))


def _others(ckpt_root: str, but: Optional[str] = None) -> str:
    """A hint naming the other checkpoint folders of ``ckpt_root`` that could be resumed."""
    names = _resumable(ckpt_root, but)
    if not names:
        return "no other checkpoint is in that folder"
    return "other checkpoints to use (--resume, or moesaic eval): " + ", ".join(
        os.path.join(ckpt_root, n) for n in names)


def latest_in(run_dir: str) -> Optional[str]:
    try:
        return find(run_dir)
    except CheckpointError:
        return None


def _damage_errors() -> tuple:
    """What reading a truncated or corrupt checkpoint file raises (torch.load's zip reader
    raises RuntimeError)."""
    from safetensors import SafetensorError

    return (EOFError, FileNotFoundError, NotADirectoryError, pickle.UnpicklingError, ValueError,
            KeyError, RuntimeError, SafetensorError)


def _read(ckpt: str, fn):
    """``fn()``, a damaged file turned into a CheckpointError that names the alternatives;
    memory and device errors pass through unchanged."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        raise
    except _damage_errors() as e:
        parent, name = os.path.split(os.path.normpath(ckpt))
        raise CheckpointError(f"checkpoint {ckpt} is damaged or incomplete ({type(e).__name__}: "
                              f"{str(e)[:300]}); {_others(parent, name)}") from e


def read_state(ckpt: str) -> dict:
    path = os.path.join(ckpt, STATE_FILE)
    return _read(ckpt, lambda: torch.load(path, map_location="cpu", weights_only=True))


def _read_weights(ckpt: str, model: Optional[nn.Module] = None) -> dict:
    """The checkpoint's weights; with ``model``, its parameters checked finite (buffers may
    hold inf on purpose, a mask say)."""
    weights = _read(ckpt, lambda: _load_tensors(os.path.join(ckpt, "model.safetensors")))
    if model is not None:
        buffers = {n for n, _ in model.named_buffers()}
        _finite(ckpt, "model.safetensors", {k: t for k, t in weights.items() if k not in buffers})
    return weights


def _finite(ckpt: str, file: str, tensors: dict) -> dict:
    """``tensors`` (parameters, optimizer moments), refused when a float entry holds inf or
    NaN: training stops before applying a non-finite loss, so such a checkpoint is damaged (or
    its run diverged through a non-finite gradient)."""
    bad = next((k for k, t in tensors.items()
                if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        parent, name = os.path.split(os.path.normpath(ckpt))
        raise CheckpointError(f"checkpoint {ckpt} is damaged or its run diverged: {file} holds "
                              f"non-finite values in {bad}; {_others(parent, name)}")
    return tensors


def _dense_under_experts(weights: dict, model: nn.Module) -> list[str]:
    """Dense-MLP entries of ``weights`` at places where ``model`` has an MoE layer."""
    from ..upcycle import moe_prefixes

    places = {f"{p}fc1.weight" for p in moe_prefixes(model)}
    return [k for k in weights if k in places]


def load_weights(ckpt: str, model: nn.Module, fresh: tuple = ("head.weight", "head.bias"),
                 upcycle: bool = False) -> list[str]:
    """Only ``ckpt``'s weights into ``model``, built under any layout (fine-tuning: optimizer,
    schedule and random streams start anew). Entries named in ``fresh`` whose shapes differ from
    the model's (a classifier for another number of classes) keep the model's initialisation;
    returns their names. Selection biases of auxiliary-loss-free balancing that this model does
    not have (built without ``bias_update_rate``) are left out, with a warning. ``upcycle``:
    ``ckpt`` is a dense model whose MLPs initialise the experts (:func:`moesaic.upcycle_`)."""
    weights = _read_weights(ckpt, model)
    own = model.state_dict()
    if upcycle:
        return _upcycle_from(ckpt, model, weights, own, fresh)
    dense = _dense_under_experts(weights, model)
    if dense and not any(".experts." in k for k in weights):
        raise CheckpointError(
            f"checkpoint {ckpt} holds dense MLPs where this model has MoE layers "
            f"({', '.join(k.rsplit('.', 2)[0] for k in dense)}): set upcycle=True to copy each "
            "into every expert (sparse upcycling)")
    unused_bias = sorted(k for k in weights if k.endswith("router.expert_bias") and k not in own)
    if unused_bias:
        for k in unused_bias:
            del weights[k]
        warnings.warn(f"init_from {ckpt}: its selection biases ({', '.join(unused_bias)}) are not "
                      "used: this model has no bias_update_rate", stacklevel=2)
    kept_fresh = [k for k in fresh if k in weights and k in own
                  and weights[k].shape != own[k].shape]
    for k in kept_fresh:
        weights[k] = own[k]
    _load_into(ckpt, model, weights)
    return kept_fresh


def _upcycle_from(ckpt: str, model: nn.Module, weights: dict, own: dict,
                  fresh: tuple) -> list[str]:
    from ..upcycle import upcycle_

    moe = sorted({k.split(".experts.")[0] for k in weights if ".experts." in k})
    if moe:
        raise CheckpointError(f"upcycle=True: checkpoint {ckpt} already holds experts (at "
                              f"{', '.join(moe)}); upcycling starts from a dense model's "
                              "weights")
    keep = tuple(k for k in fresh if k in weights and k in own
                 and weights[k].shape != own[k].shape)
    try:
        upcycle_(model, weights, keep=keep)
    except ValueError as e:
        why = str(e).removeprefix("upcycle_: ").removeprefix(
            "the dense state dict does not fit this model: ")
        raise CheckpointError(f"upcycle=True: checkpoint {ckpt} does not fit this model: "
                              f"{why}") from e
    return list(keep)


def _load_into(ckpt: str, model: nn.Module, weights: dict) -> None:
    """load_full_state_dict, with a mismatch explained as a checkpoint for another model."""
    try:
        load_full_state_dict(model, weights)
    except (KeyError, ValueError) as e:
        raise ModelMismatch(f"checkpoint {ckpt} does not fit this model (a different model or "
                              f"model_args?): {str(e)[:500]}") from e
    except RuntimeError as e:  # load_state_dict's size mismatch and missing or unexpected keys
        if "Error(s) in loading state_dict" not in str(e):
            raise
        raise ModelMismatch(f"checkpoint {ckpt} does not fit this model (a different model or "
                              f"model_args?): {str(e)[:500]}") from e


def load(ckpt: str, model: nn.Module, optimizer=None, rank: int = 0, world_size: int = 1) -> dict:
    """Load weights (and optimizer moments, this rank's RNG when the world size matches) into
    a model built under any layout; returns the checkpoint's state dict."""
    state = read_state(ckpt)
    weights = _read_weights(ckpt, model)
    moments = (_finite(ckpt, "optimizer.safetensors", _read(
        ckpt, lambda: _load_tensors(os.path.join(ckpt, "optimizer.safetensors"))))
               if optimizer is not None else None)
    _load_into(ckpt, model, weights)
    if optimizer is not None:
        scatter_moments(model, optimizer, weights, moments, state.get("adam_steps", {}))
    rngs = state.get("rng") or []
    if len(rngs) == world_size:
        set_rng_state(model, rngs[rank])
    return state

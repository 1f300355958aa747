"""Starting a run from another run's weights (``init_from``, optionally ``upcycle``), and the
checks that say when a checkpoint was trained on other inputs or with another model."""
from __future__ import annotations

import json
import math
import warnings

import torch

from . import checkpoint
from .config import TrainConfig


def find_init(path: str) -> str:
    """The checkpoint ``init_from`` names, or a CheckpointError that says it was init_from."""
    try:
        return checkpoint.find(path)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"init_from: {e}") from e


def same_inputs(a, b) -> bool:
    """Equal datasets, or statistics equal to float32 precision (None only equals None)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b))
    return a == b


def _plain(v):
    """A config value as config.json holds it (tuples and lists compare alike)."""
    return json.loads(json.dumps(v, default=str))


def model_changes(was: dict, now: dict) -> list[str]:
    """``model`` and each ``model_args`` entry that differ between two configs' dicts
    (``model_args.num_experts: unset -> 8``)."""
    out = []
    if "model" in was and was["model"] != now.get("model"):
        out.append(f"model: {was['model']!r} -> {now.get('model')!r}")
    if "model_args" in was:
        old, new = was.get("model_args") or {}, now.get("model_args") or {}
        for k in sorted(set(old) | set(new)):
            a, b = old.get(k, _UNSET), new.get(k, _UNSET)
            if a is _UNSET or b is _UNSET or _plain(a) != _plain(b):
                out.append(f"model_args.{k}: {'unset' if a is _UNSET else repr(a)} -> "
                           f"{'unset' if b is _UNSET else repr(b)}")
    return out


_UNSET = object()


QUIET_KEYS = ("name", "progress", "plots", "runs_root", "timeout_s", "model", "model_args")


def setting_changes(was: dict, now: dict) -> list[str]:
    """The other config keys that differ (a resume with another config or ``--set``): what
    trains differently from here on. Output-only keys, and the model (warned of apart), are
    left out."""
    return [f"{k} {was[k]!r} -> {now[k]!r}" for k in sorted(now)
            if k in was and k not in QUIET_KEYS and _plain(was[k]) != _plain(now[k])]


def load_init(cfg: TrainConfig, model: torch.nn.Module, ckpt: str,
              inputs: dict) -> tuple[str, list[str]]:
    """Fine-tuning: ``ckpt``'s weights into ``model`` (upcycled with ``cfg.upcycle``), the rest
    of training state new. ``inputs`` is the dataset and normalisation this run resolved.
    Returns the log line and the warnings to show (selection biases left out; a checkpoint that
    saw its inputs otherwise: another dataset or normalisation), held back until the run is
    known to start from it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = checkpoint.load_weights(ckpt, model, upcycle=cfg.upcycle)
    notes = [str(w.message) for w in caught]
    note = (f"; {' and '.join(fresh)} initialised anew for {model.head.out_features} "
            "classes" if fresh else "")
    how = ("upcycled (each dense MLP copied into every expert) from" if cfg.upcycle
           else "initialised from")
    line = f"{how} the weights of {ckpt} (epoch and optimizer start anew{note})"
    state = checkpoint.read_state(ckpt)
    theirs = state.get("inputs") or state.get("config", {})  # resolved, or as configured
    ours = inputs if state.get("inputs") else cfg.to_dict()
    differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here"
              for k in ("dataset", "norm_mean", "norm_std") if k in theirs
              and not same_inputs(theirs[k], ours[k])]
    if differ:
        notes.append(f"init_from {ckpt} was trained on other inputs ({'; '.join(differ)}): "
                     "fine-tuning starts from features made for those")
    return line, notes

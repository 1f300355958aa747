"""``moesaic compare RUN_DIR...``: several runs side by side.

Reads each run dir's config.json, metrics.jsonl and summary.json (written after every epoch;
a run still going, or stopped early, shows its completed epochs of the planned ones). Prints
one row per run (accuracy, throughput and the processes and device it came from, parameters,
the last epoch's expert load) and the
config keys whose values differ between the runs (keys a run's version did not have count as
their defaults; a ``model_args`` entry a run did not set shows the registered model's value,
looked up on the meta device, with "(default)"); :func:`plot` draws their eval accuracy and
train loss curves on one figure. Nothing is recomputed and no weights are made.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from typing import Any, NamedTuple, Optional

from .report import save_fig, throughput


class CompareError(ValueError):
    """A run dir that cannot be read as a run."""


def _defaults() -> dict:
    """The config keys of this version with their defaults: a run written before a key existed
    ran with its default (the key was added with the old behaviour as its default)."""
    from .config import TrainConfig

    return TrainConfig().to_dict()


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CompareError(f"cannot read {path}: {e}") from e


def load_run(run_dir: str) -> dict:
    """{"dir", "config", "history", "summary" (None while a run has none)}."""
    if not os.path.isdir(run_dir):
        raise CompareError(f"no run dir at {run_dir}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        what = ("a run that has not finished an epoch" if _is_run(run_dir) else
                "not a run dir of `moesaic train`, nor a folder of them")
        raise CompareError(f"{run_dir} has no metrics.jsonl: {what}")
    try:
        with open(metrics) as f:
            history = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise CompareError(f"cannot read {metrics}: {e}") from e
    if not history:
        raise CompareError(f"{metrics} is empty: the run has not finished an epoch")
    bad = [i for i, r in enumerate(history, 1)
           if not all(k in r for k in ("epoch", "eval_accuracy", "train_loss"))]
    if bad:
        raise CompareError(f"{metrics}: line {bad[0]} lacks epoch, eval_accuracy or train_loss")
    config = {**_defaults(), **_read_json(os.path.join(run_dir, "config.json"))}
    summary_path = os.path.join(run_dir, "summary.json")
    summary = _read_json(summary_path) if os.path.exists(summary_path) else None
    return {"dir": run_dir, "config": config, "history": history, "summary": summary}


def _load_balance(record: dict) -> Optional[float]:
    """The busiest expert's share over the mean share, worst MoE layer of an epoch record."""
    ratios = [max(m["token_share"]) * len(m["token_share"]) for m in record.get("moe", [])
              if m.get("token_share")]
    return max(ratios) if ratios else None


def row(run: dict) -> dict:
    h, s = run["history"], run["summary"] or {}
    best = max(h, key=lambda r: r["eval_accuracy"])
    completed = h[-1]["epoch"] - int("partial_steps" in h[-1])  # as summary.json counts them
    planned = run["config"].get("epochs", completed)
    return {
        "run": run["dir"],
        "model": run["config"].get("model", "?"),
        "epochs": completed,
        "planned_epochs": planned,
        "finished": completed >= planned,
        "best_eval_accuracy": best["eval_accuracy"],
        "best_epoch": best["epoch"],
        "final_eval_accuracy": h[-1]["eval_accuracy"],
        "train_images_per_second": s.get("train_images_per_second", throughput(h)[0]),
        "params_total": s.get("params_total"),
        "params_active_per_token": s.get("params_active_per_token"),
        "max_load_over_mean": _load_balance(h[-1]),
        "dropped_fraction": h[-1].get("dropped_fraction"),
        "initial_eval_accuracy": s.get("initial_eval_accuracy"),  # eval_at_start's
        "world_size": s.get("world_size", h[-1].get("world_size")),  # None: an older run's
        "device": s.get("device"),
        "ep_size": s.get("ep_size", h[-1].get("ep_size")),
    }


# keys that leave the results as they are
IGNORED = ("name", "progress", "plots", "runs_root", "timeout_s", "eval_at_start")


class Default(NamedTuple):
    """A ``model_args`` entry a run did not set, so the model's default applied: ``value`` when
    the registered model gives it (``known``)."""

    value: Any = None
    known: bool = False


NOT_SET = "(not set)"  # a config key this version does not know that another run has
_ABSENT = object()


@functools.lru_cache(maxsize=None)
def _built(model: str, args_json: str):
    """The registered ``model`` built with these ``model_args`` on the meta device (no weights,
    no data), or None when it is not registered here or does not build that way."""
    import torch

    from .. import models
    from ..parallel.seed import generators_untouched

    if model not in models.list_models():
        return None
    try:
        with warnings.catch_warnings(), torch.device("meta"), generators_untouched():
            warnings.simplefilter("ignore")
            return models.create(model, **json.loads(args_json))
    except Exception:  # any builder's failure only leaves the value unknown
        return None


def model_default(model: str, args: dict, key: str) -> Default:
    """What ``model`` built with ``args`` (or, when that does not build here, its preset alone)
    uses for the ``model_args`` entry ``key``: its config's value, else its first MoE layer's,
    else the MoE keywords it passes on."""
    from ..layer import moe_layers

    built = _built(model, json.dumps(args, sort_keys=True))
    built = _built(model, "{}") if built is None else built
    if built is None:
        return Default()
    cfg = getattr(built, "config", None)
    layer = next(iter(moe_layers(built)), None)
    for source in (cfg, layer.config if layer is not None else None):
        value = getattr(source, key, _ABSENT)
        if key != "moe_kwargs" and value is not _ABSENT and not callable(value):
            return Default(value, True)
    extra = getattr(cfg, "moe_kwargs", None) or {}
    return Default(extra[key], True) if key in extra else Default()


def _same(v) -> str:
    """What two runs' values are compared by: a known default as its value."""
    if isinstance(v, Default):
        return json.dumps(v.value, sort_keys=True, default=str) if v.known else "\0default"
    return "\0unset" if v is NOT_SET else json.dumps(v, sort_keys=True, default=str)


def _cell(v) -> str:
    """A value as the differences print it: JSON, ``4 (default)``, ``(default)``, ``(not set)``."""
    if isinstance(v, Default):
        return (json.dumps(v.value, default=str) + " (default)") if v.known else "(default)"
    return NOT_SET if v is NOT_SET else json.dumps(v, default=str)


def config_differences(runs: list[dict]) -> dict[str, list]:
    """{key: [value in each run]} for the config keys (model_args one by one) that differ; an
    entry a run did not set is a :class:`Default`, looked up only where the others differ."""
    flat, own_args = [], []
    for run in runs:
        c = dict(run["config"])
        args = c.pop("model_args", {}) or {}
        own_args.append(args)
        c.update({f"model_args.{k}": v for k, v in args.items()})
        for k in IGNORED:
            c.pop(k, None)
        flat.append(c)
    out = {}
    for k in sorted(set().union(*flat)):
        vals = [f.get(k, NOT_SET) for f in flat]
        if len({_same(v) for v in vals}) == 1:
            continue
        if k.startswith("model_args."):
            vals = [model_default(r["config"].get("model", "?"), a, k.split(".", 1)[1])
                    if v is NOT_SET else v for v, r, a in zip(vals, runs, own_args)]
        if len({_same(v) for v in vals}) > 1:
            out[k] = vals
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def table(rows: list[dict]) -> str:
    """One line per run; a "start" column (eval_at_start's accuracy) when any run has one, and a
    "procs x device" column (with the experts' parallel sizes) when any run used more than one
    process or a GPU."""
    start = any(r["initial_eval_accuracy"] is not None for r in rows)
    head = ["#", "run", "model", "epochs", "best (epoch)", "final", "img/s", "params (active)",
            "busiest/mean", "dropped"]
    body = []
    for i, r in enumerate(rows, 1):
        params = ("-" if r["params_total"] is None else
                  f"{r['params_total']:,} ({r['params_active_per_token']:,})")
        epochs = f"{r['epochs']}" + ("" if r["finished"] else
                                     f" of {r['planned_epochs']} (running or stopped)")
        load = "-" if r["max_load_over_mean"] is None else f"{r['max_load_over_mean']:.3f}"
        body.append([str(i), r["run"], r["model"], epochs,
                     f"{_pct(r['best_eval_accuracy'])} ({r['best_epoch']})",
                     _pct(r["final_eval_accuracy"]), f"{r['train_images_per_second']:.0f}",
                     params, load, _pct(r["dropped_fraction"])])
    if start:
        head.insert(4, "start")
        for cells, r in zip(body, rows):
            cells.insert(4, _pct(r["initial_eval_accuracy"]))
    if any(r["world_size"] not in (None, 1) or r["device"] not in (None, "cpu") for r in rows):
        at = head.index("img/s") + 1  # throughput is per machine set-up
        head.insert(at, "procs x device")
        for cells, r in zip(body, rows):
            eps = "/".join(map(str, r["ep_size"] or ()))
            cells.insert(at, "-" if r["world_size"] is None else
                         f"{r['world_size']} x {r['device'] or '?'}" + (f", ep {eps}" if eps
                                                                       else ""))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _short(run_dir: str) -> str:
    """NAME/TIMESTAMP for a run under runs/, else the folder's name."""
    parts = os.path.normpath(run_dir).split(os.sep)
    stamp = parts[-1].replace("-", "")
    return "/".join(parts[-2:]) if stamp.isdigit() and len(parts) > 1 else parts[-1]


def plot(path: str, runs: list[dict]) -> None:
    """Eval accuracy and train loss of every run against epoch, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(runs, 1):
        h = run["history"]
        ep = [r["epoch"] for r in h]
        label = f"#{i} {_short(run['dir'])}"
        a1.plot(ep, [100 * r["eval_accuracy"] for r in h], "-", marker="o", ms=2, label=label)
        a2.plot(ep, [r["train_loss"] for r in h], "-", marker="o", ms=2, label=label)
    for a, title, ylabel in ((a1, "eval accuracy", "accuracy (%)"),
                             (a2, "train loss (with aux, smoothing)", "loss")):
        a.set_title(title)
        a.set_xlabel("epoch")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def _has_epoch(run_dir: str) -> bool:
    path = os.path.join(run_dir, "metrics.jsonl")
    return os.path.exists(path) and os.path.getsize(path) > 0


def _is_run(path: str) -> bool:
    return (os.path.isdir(os.path.join(path, "checkpoints"))
            or os.path.exists(os.path.join(path, "metrics.jsonl")))


MAX_DEPTH = 6  # folder levels below a path given that are searched for run dirs


def _subdirs(folder: str) -> list[str]:
    """``folder``'s subfolders in name order, hidden ones (.git, .venv) left out."""
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names]


def _runs_under(folder: str, levels: int = MAX_DEPTH,
                seen: Optional[set] = None) -> tuple[list[str], list[str]]:
    """(run dirs, run dirs too deep): the run dirs up to ``levels`` folders below ``folder``, in
    name order and never inside a run dir (its checkpoints/); those one level further down are
    only noted. A folder reached twice (through a link) counts once."""
    seen = {os.path.realpath(folder)} if seen is None else seen
    found, deeper = [], []
    for sub in _subdirs(folder):
        real = os.path.realpath(sub)
        if real in seen:
            continue
        seen.add(real)
        if _is_run(sub):
            (found if levels > 0 else deeper).append(sub)
        elif levels > 0:
            more, too_deep = _runs_under(sub, levels - 1, seen)
            found += more
            deeper += too_deep
    return found, deeper


NO_EPOCH = "no finished epoch yet"
TOO_DEEP = f"more than {MAX_DEPTH} folders below the path given: name a folder nearer them"


def expand(paths: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(run dirs, {why: run dirs skipped}): run dirs as given; a folder that is not a run but
    holds runs (runs/NAME, runs, or a project folder above runs) stands for those that have
    finished an epoch, in name order (oldest first within a NAME); the others (just started, or
    more than :data:`MAX_DEPTH` folders down) are skipped."""
    out: list[str] = []
    skipped: dict[str, list[str]] = {NO_EPOCH: [], TOO_DEEP: []}
    for p in paths:
        if os.path.isdir(p) and not _is_run(p):
            inner, deeper = _runs_under(p)
            skipped[TOO_DEEP] += deeper
            if inner or deeper:
                out += [d for d in inner if _has_epoch(d)]
                skipped[NO_EPOCH] += [d for d in inner if not _has_epoch(d)]
                continue
        out.append(p)
    return out, {why: dirs for why, dirs in skipped.items() if dirs}


def _skipped_line(skipped: dict[str, list[str]]) -> str:
    """One line naming the run dirs skipped and why ("" when none)."""
    return ("skipped: " + "; ".join(f"{', '.join(dirs)} ({why})" for why, dirs in skipped.items())
            if skipped else "")


def report(run_dirs: list[str]) -> tuple[str, list[dict]]:
    """The printed report (table, then differing config keys) and the runs read."""
    dirs, skipped = expand(run_dirs)
    if not dirs:
        raise CompareError(f"no run in {', '.join(run_dirs)} has finished an epoch yet"
                           + (f"; {_skipped_line(skipped)}" if skipped else ""))
    runs = [load_run(d) for d in dirs]
    text = [table([row(r) for r in runs])]
    if skipped:
        text.append(_skipped_line(skipped))
    diff = config_differences(runs)
    if len(runs) > 1:
        text.append("")
        if diff:
            text.append("config keys that differ (#1, #2, ...):")
            w = max(len(k) for k in diff)
            text += [f"  {k:<{w}}  " + " | ".join(map(_cell, vals)) for k, vals in diff.items()]
        else:
            text.append(f"the configs are the same (apart from {', '.join(IGNORED)})")
    return "\n".join(text), runs

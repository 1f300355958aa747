"""``moesaic compare RUN_DIR...``: several runs side by side.

Reads each run dir's config.json, metrics.jsonl and summary.json (written after every epoch;
a run still going, or stopped early, shows its completed epochs of the planned ones). Prints
one row per run (accuracy, throughput and the processes and device it came from, parameters,
the last epoch's expert load) and the
config keys whose values differ between the runs (keys a run's version did not have count as
their defaults); :func:`plot` draws their eval accuracy and train loss curves on one figure.
Nothing is recomputed and no model is built.
"""
from __future__ import annotations

import json
import os
from typing import Optional

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
MISSING = "-"  # a model_args entry a run did not set (the model's default)


def config_differences(runs: list[dict]) -> dict[str, list]:
    """{key: [value in each run]} for the config keys (model_args one by one) that differ."""
    flat = []
    for run in runs:
        c = dict(run["config"])
        args = c.pop("model_args", {}) or {}
        c.update({f"model_args.{k}": v for k, v in args.items()})
        for k in IGNORED:
            c.pop(k, None)
        flat.append(c)
    keys = sorted(set().union(*flat))
    return {k: [f.get(k, MISSING) for f in flat] for k in keys
            if len({json.dumps(f.get(k, MISSING), sort_keys=True) for f in flat}) > 1}


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


def _runs_under(folder: str, depth: int = 2) -> list[str]:
    """The run dirs in ``folder`` (runs/NAME) or one level further down (runs), sorted."""
    found = []
    for d in sorted(os.listdir(folder)):
        sub = os.path.join(folder, d)
        if not os.path.isdir(sub):
            continue
        if _is_run(sub):
            found.append(sub)
        elif depth > 1:
            found += _runs_under(sub, depth - 1)
    return found


def expand(paths: list[str]) -> tuple[list[str], list[str]]:
    """(run dirs, skipped): run dirs as given; a folder that is not a run but holds runs
    (runs/NAME, or runs) stands for those that have finished an epoch, in name order (oldest
    first within a NAME); the others (just started) are skipped."""
    out, skipped = [], []
    for p in paths:
        if os.path.isdir(p) and not _is_run(p):
            inner = _runs_under(p)
            if inner:
                out += [d for d in inner if _has_epoch(d)]
                skipped += [d for d in inner if not _has_epoch(d)]
                continue
        out.append(p)
    return out, skipped


def report(run_dirs: list[str]) -> tuple[str, list[dict]]:
    """The printed report (table, then differing config keys) and the runs read."""
    dirs, skipped = expand(run_dirs)
    if not dirs:
        raise CompareError(f"no run in {', '.join(run_dirs)} has finished an epoch yet")
    runs = [load_run(d) for d in dirs]
    text = [table([row(r) for r in runs])]
    if skipped:
        text.append("skipped (no finished epoch yet): " + ", ".join(skipped))
    diff = config_differences(runs)
    if len(runs) > 1:
        text.append("")
        if diff:
            text.append("config keys that differ (#1, #2, ...):")
            w = max(len(k) for k in diff)
            text += [f"  {k:<{w}}  " + " | ".join(MISSING if v == MISSING else json.dumps(v)
                                                 for v in vals)
                     for k, vals in diff.items()]
        else:
            text.append(f"the configs are the same (apart from {', '.join(IGNORED)})")
    return "\n".join(text), runs

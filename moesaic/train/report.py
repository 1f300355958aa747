"""What a person sees: run-dir files (config, metrics, summary), plots, epoch lines, end table.

All writes replace files atomically (temporary file, then rename), so a reader never sees a
half-written file. Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import json
import os

SUMMARY_KEYS = ("best_eval_accuracy", "final_eval_accuracy", "epochs", "train_images_per_second",
                "params_total", "params_active_per_token")


def replace_atomically(path: str, write, suffix: str = "") -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``; an exception (an interrupt too)
    removes ``tmp`` and propagates, leaving ``path`` as it was."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    replace_atomically(path, write)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_metrics(path: str, history: list[dict]) -> None:
    """metrics.jsonl: one JSON record per finished epoch."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in history))


def summary(history: list[dict], params_total: int, params_active: int) -> dict:
    """The run's results; throughput as :func:`throughput` gives it."""
    last = history[-1]
    images_per_second, since = throughput(history)
    return {
        "best_eval_accuracy": max(r["eval_accuracy"] for r in history),
        "final_eval_accuracy": last["eval_accuracy"],
        "epochs": last["epoch"] - int("partial_steps" in last),  # completed epochs
        "train_images_per_second": images_per_second,
        "throughput_from_epoch": since,
        "params_total": int(params_total),
        "params_active_per_token": int(params_active),
    }


def throughput(history: list[dict]) -> tuple[float, int]:
    """(train images/s, first epoch counted): over the epochs run on the last epoch's layout
    (processes and expert-parallel sizes), since a run resumed on another layout has two."""
    layout = lambda r: (r.get("world_size"), tuple(r.get("ep_size") or ()))
    tail = len(history)
    while tail > 0 and layout(history[tail - 1]) == layout(history[-1]):
        tail -= 1
    same = history[tail:]
    imgs = sum(r.get("train_images", 0) for r in same)
    secs = sum(r.get("train_time_s", 0.0) for r in same)
    return (imgs / secs if secs > 0 else 0.0), same[0]["epoch"]


def layout_words(world_size: int, device: str, ep_size) -> str:
    """'2 processes, cpu, ep 2': the processes, device and experts' parallel sizes."""
    eps = "/".join(map(str, ep_size or ()))
    return (f"{world_size} process{'es' if world_size > 1 else ''}, {device}"
            + (f", ep {eps}" if eps else ""))


def epoch_line(r: dict, epochs: int) -> str:
    dropped = r.get("dropped_fraction")
    drop = f"  dropped {100 * dropped:.1f}%" if dropped is not None else ""
    return (f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f} "
            f"acc {100 * r['train_accuracy']:.2f}%  eval loss {r['eval_loss']:.4f} "
            f"acc {100 * r['eval_accuracy']:.2f}% (best {100 * r['best_eval_accuracy']:.2f}%)  "
            f"lr {r['lr']:.2e}  {r['images_per_second']:.0f} img/s{drop}  "
            f"{r['train_time_s'] + r['eval_time_s']:.1f}s")


def _throughput_note(s: dict, history: list[dict]) -> str:
    """' (2 processes, cpu, ep 2)', plus the epochs it covers when the run changed layout."""
    if "world_size" not in s:
        return ""
    since = s.get("throughput_from_epoch", history[0]["epoch"])
    span = f"; epochs {since}-{history[-1]['epoch']}" if since > history[0]["epoch"] else ""
    return f" ({layout_words(s['world_size'], s['device'], s.get('ep_size'))}{span})"


def end_table(s: dict, history: list[dict], run_dir: str) -> str:
    best = max(history, key=lambda r: r["eval_accuracy"])
    where = f"epoch {best['epoch']}" + (", partial: not checkpointed" if "partial_steps" in best
                                        else "")
    dropped = [r["dropped_fraction"] for r in history if r.get("dropped_fraction") is not None]
    rows = [("eval accuracy before training", f"{100 * s['initial_eval_accuracy']:.2f}%")
            ] if "initial_eval_accuracy" in s else []
    rows += [
        ("best eval accuracy", f"{100 * s['best_eval_accuracy']:.2f}% ({where})"),
        ("final eval accuracy", f"{100 * s['final_eval_accuracy']:.2f}%"),
        ("epochs", str(s["epochs"])),
        ("train images/s", f"{s['train_images_per_second']:.0f}{_throughput_note(s, history)}"),
        ("parameters, total", f"{s['params_total']:,}"),
        ("parameters, active/token", f"{s['params_active_per_token']:,}"),
        ("tokens dropped (last epoch)", f"{100 * dropped[-1]:.2f}%" if dropped else "n/a (dense)"),
        ("run dir", run_dir),
    ]
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    bar = f"+-{'-' * w}-+-{'-' * v}-+"
    return "\n".join([bar] + [f"| {k:<{w}} | {x:<{v}} |" for k, x in rows] + [bar])


def plot_curves(path: str, history: list[dict]) -> None:
    """curves.png: loss (train, eval) and accuracy (train, eval) against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [r["train_loss"] for r in history], "o-", ms=3, label="train (with aux, smoothing)")
    a1.plot(ep, [r["eval_loss"] for r in history], "s-", ms=3, label="eval (cross-entropy)")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.set_title("loss")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(ep, [100 * r["train_accuracy"] for r in history], "o-", ms=3, label="train")
    a2.plot(ep, [100 * r["eval_accuracy"] for r in history], "s-", ms=3, label="eval")
    best = max(history, key=lambda r: r["eval_accuracy"])
    a2.axhline(100 * best["eval_accuracy"], color="gray", ls=":", lw=1,
               label=f"best eval {100 * best['eval_accuracy']:.2f}% (epoch {best['epoch']})")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.set_title("accuracy")
    a2.legend(loc="lower right")
    a2.grid(alpha=0.3)
    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def plot_expert_load(path: str, history: list[dict]) -> None:
    """expert_load.png: per MoE layer, each expert's share of the routed tokens per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = history[-1].get("moe") or []
    n = max(len(layers), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    if not layers:
        axes[0][0].text(0.5, 0.5, "dense model: no MoE layers", ha="center", va="center")
        axes[0][0].axis("off")
    ep = [r["epoch"] for r in history]
    for i, layer in enumerate(layers):
        ax = axes[i // cols][i % cols]
        E = len(layer["token_share"])
        shares = [[(r["moe"][i]["token_share"][e] if len(r.get("moe") or []) > i else 0.0)
                   for r in history] for e in range(E)]
        ax.stackplot(ep, [[100 * v for v in s] for s in shares], labels=[f"e{e}" for e in range(E)])
        ax.axhline(0, color="k", lw=0.5)
        for k in range(1, E):
            ax.axhline(100 * k / E, color="white", lw=0.6, ls=":")
        ax.set_ylim(0, 100)
        ax.set_xlim(ep[0], ep[-1] if ep[-1] > ep[0] else ep[0] + 1)
        ax.set_title(f"{layer['name']}: {E} experts, dropped "
                     f"{100 * layer['dropped_fraction']:.1f}%", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("token share (%)")
        if E <= 8:
            ax.legend(fontsize=6, loc="upper right", ncol=2)
    for j in range(len(layers), rows * cols):
        if j > 0:
            axes[j // cols][j % cols].axis("off")
    fig.suptitle("tokens per expert (dotted lines: uniform shares)", fontsize=10)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def save_fig(fig, path: str) -> None:
    """Write the figure atomically, in the format its name asks for (.png, .pdf, .svg...)."""
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format=fmt), f".{fmt}")

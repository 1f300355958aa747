"""Sparse upcycling on the embedded digits default: a dense run's MLPs copied into the experts.

For each seed: the dense twin of the default model (``num_experts=0``) trains the default recipe
(``--dense-epochs``); it is then upcycled into the default MoE (top-1, softmax weights) and into
a top-2 MoE (normalised weights), each evaluated before any step and trained ``--more-epochs``
further; the same two MoEs also train from scratch for dense + more epochs (the same number of
steps as the dense run and its continuation together). Prints test accuracies (best over the
epochs and final) and wall times; the table is the evidence for docs/training.md.

Run: flock /tmp/moesaic-bench.lock python3 benchmarks/upcycle.py --seeds 0 1
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from datetime import datetime, timezone

import torch

import moesaic
from moesaic.train import checkpoint
from moesaic.train.config import resolve
from moesaic.train.loop import Trainer

VARIANTS = {"top-1": [], "top-2": ["model_args.top_k=2"]}


def _run(overrides: list[str], run_dir: str, at_init: bool = False) -> dict:
    cfg = resolve(None, ["progress=False", "plots=False", *overrides])
    t0 = time.perf_counter()
    with warnings.catch_warnings(), open(os.devnull, "w") as quiet, redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        trainer = Trainer(cfg, run_dir)
        init_acc = trainer.evaluate()[1] if at_init else None
        summary = trainer.run()
        moesaic.destroy()
    return dict(init=init_acc, best=summary["best_eval_accuracy"],
                final=summary["final_eval_accuracy"], seconds=time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--dense-epochs", type=int, default=30)
    ap.add_argument("--more-epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    total = args.dense_epochs + args.more_epochs
    print(f"# benchmarks/upcycle.py --seeds {' '.join(map(str, args.seeds))} --dense-epochs "
          f"{args.dense_epochs} --more-epochs {args.more_epochs}")
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread")
    print("| seed | run | epochs | acc. before training | best | final | wall s |")
    print("|---|---|---|---|---|---|---|")

    def row(seed, name, epochs, r):
        init = "-" if r["init"] is None else f"{r['init']:.2%}"
        print(f"| {seed} | {name} | {epochs} | {init} | {r['best']:.2%} | {r['final']:.2%} | "
              f"{r['seconds']:.1f} |", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            dense_dir = os.path.join(tmp, f"dense{seed}")
            r = _run([f"seed={seed}", f"epochs={args.dense_epochs}",
                      "model_args.num_experts=0"], dense_dir)
            row(seed, "dense (num_experts=0)", args.dense_epochs, r)
            ckpt = checkpoint.find(dense_dir)
            for name, extra in VARIANTS.items():
                r = _run([f"seed={seed}", f"epochs={args.more_epochs}", f"init_from={ckpt!r}",
                          "upcycle=True", *extra], os.path.join(tmp, f"up{name}{seed}"),
                         at_init=True)
                row(seed, f"{name} upcycled from dense", f"+{args.more_epochs}", r)
                r = _run([f"seed={seed}", f"epochs={total}", *extra],
                         os.path.join(tmp, f"scratch{name}{seed}"))
                row(seed, f"{name} from scratch", total, r)


if __name__ == "__main__":
    main()

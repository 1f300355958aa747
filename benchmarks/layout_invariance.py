"""The same training on 1 process, 2 processes (experts split) and 2 micro-batches per step.

Three runs of the embedded digits default for 10 epochs with every random layer on (dropout,
attention dropout, stochastic depth, hidden dropout, gaussian router noise, random crop, mixup),
dropless top-2 routing balanced by selection biases (no balance loss, which is defined per
rank's batch): ``moesaic train`` in one process, under ``torchrun --nproc_per_node=2`` at
max_ep_size 2, and in one process with ``accum_steps=2``. Prints ``moesaic compare`` of the
three and, per metric, the largest relative difference to the one-process run over all epochs.

Run: python3 benchmarks/layout_invariance.py [--out-dir runs/layout_invariance]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import date

SETTINGS = ["epochs=10", "progress=False", "plots=False", "model_args.drop_rate=0.1",
            "model_args.attn_drop=0.1", "model_args.drop_path=0.1",
            "model_args.noise_policy='gaussian'", "model_args.hidden_dropout=0.1",
            "model_args.drop_tokens=False", "model_args.top_k=2", "aux_loss_weight=0.0",
            "model_args.bias_update_rate=0.001", "crop_padding=1", "mixup_alpha=0.2"]
RUNS = {"1 process": ([sys.executable, "-m", "moesaic"], []),
        "2 processes, max_ep_size 2": ([sys.executable, "-m", "torch.distributed.run",
                                        "--standalone", "--nproc_per_node=2", "-m", "moesaic"],
                                       ["max_ep_size=2"]),
        "1 process, accum_steps 2": ([sys.executable, "-m", "moesaic"], ["accum_steps=2"])}
METRICS = ("train_loss", "eval_loss", "train_accuracy", "eval_accuracy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="runs/layout_invariance",
                    help="where the three run dirs go (default runs/layout_invariance)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dirs = []
    print(f"layout invariance, {date.today()}")
    for i, (name, (launch, extra)) in enumerate(RUNS.items()):
        run_dir = os.path.join(args.out_dir, f"run{i}")
        sets = [a for s in SETTINGS + extra for a in ("--set", s)]
        cmd = [*launch, "train", *sets, "--run-dir", run_dir]
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        dirs.append(run_dir)
    subprocess.run([sys.executable, "-m", "moesaic", "compare", *dirs], check=True)
    metrics = []
    for d in dirs:
        with open(os.path.join(d, "metrics.jsonl")) as f:
            metrics.append([json.loads(line) for line in f])
    for key in METRICS:
        for name, m in list(zip(RUNS, metrics))[1:]:
            diff = max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-12)
                       for a, b in zip(metrics[0], m))
            print(f"{key:15s} {name:28s} vs 1 process: largest relative difference {diff:.1e}")


if __name__ == "__main__":
    main()

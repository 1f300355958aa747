"""Activation (grad) checkpointing: memory saved and time paid, one training step of a zoo model.

Peak memory is the exact high-water mark of live tensors during forward + backward
(moesaic.memtrack.LiveMemory: deterministic, load-independent), above the parameters.
Step time (forward, backward, fused AdamW) is the median of interleaved rounds, so load drift
hits both settings alike; the ratio is checkpointed / stored activations.

Run: flock /tmp/moesaic-bench.lock python3 benchmarks/checkpointing.py
"""
from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

import moesaic.models as zoo
from moesaic.memtrack import LiveMemory
from models import cpu_name


def step(model, opt, images, labels) -> None:
    logits, aux = model(images)
    (F.cross_entropy(logits, labels) + aux).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_moe_lite6_prmoe",
                    help="zoo model (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=128, help="images per step (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="timed rounds per setting (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = zoo.create(args.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    c = model.config
    images = torch.randn(args.batch, c.in_chans, c.img_size, c.img_size)
    labels = torch.randint(0, c.num_classes, (args.batch,))
    print(f"{date.today()} | {cpu_name()} | torch {torch.__version__} | {args.threads} threads | "
          f"{args.model}, batch {args.batch}, float32")

    peak = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        step(model, opt, images, labels)  # warm-up; optimizer state exists before measuring
        with LiveMemory() as mem:
            logits, aux = model(images)
            (F.cross_entropy(logits, labels) + aux).backward()
        opt.zero_grad(set_to_none=True)
        peak[enable] = mem.peak_bytes
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for enable in (False, True):
            model.set_grad_checkpointing(enable)
            t = time.perf_counter()
            step(model, opt, images, labels)
            times[enable].append(time.perf_counter() - t)
    for enable in (False, True):
        ms = [t * 1e3 for t in times[enable]]
        print(f"grad_checkpointing={enable!s:5}  peak extra memory {peak[enable] / 2**20:8.1f} MiB"
              f"  step {statistics.median(ms):8.1f} ms (median of {args.rounds}; "
              f"{min(ms):.1f}-{max(ms):.1f})")
    pairs = sorted(t / s for s, t in zip(times[False], times[True]))  # per interleaved round
    print(f"checkpointed / stored: memory {peak[True] / peak[False]:.2f}x, "
          f"time {statistics.median(times[True]) / statistics.median(times[False]):.2f}x "
          f"(per round {pairs[0]:.2f}-{pairs[-1]:.2f})")


if __name__ == "__main__":
    main()

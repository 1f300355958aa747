"""What randomness keyed by sample costs (moesaic.keyed, the trainer's default).

One training step (forward, cross-entropy + aux loss, backward, AdamW) of the published
PR-MoE recipe's model (vit_moe_lite6_prmoe with the recipe's MODEL_ARGS: dropout 0.1 everywhere,
hidden dropout included, and logit jitter; no attention dropout or stochastic depth) on
random 32x32 images, timed with its random layers keyed by sample (inside ``sample_keys``: hashed masks,
unfused attention where attention dropout is on) and with torch's generator (outside it),
in interleaved rounds; then dropout alone on one [b, 65, 256] activation, forward and backward.
Prints medians and the keyed / torch ratio.

Run: flock /tmp/moesaic-bench.lock python3 benchmarks/keyed.py
"""
from __future__ import annotations

import argparse
import contextlib
import os
import runpy
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

import moesaic
import moesaic.models as zoo
from moesaic import keyed
from _machine import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "cifar10_vit_moe_lite6_prmoe.py")


def step_timer(batch: int):
    cfg = runpy.run_path(RECIPE)
    moesaic.moe_set_seed(0)
    model = zoo.create(cfg["MODEL"], **cfg["MODEL_ARGS"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(10, (batch,))
    keys = keyed.draw_sample_keys(batch, torch.Generator().manual_seed(0))

    def step(use_keys: bool) -> float:
        t = time.perf_counter()
        with keyed.sample_keys(keys) if use_keys else contextlib.nullcontext():
            logits, aux = model(x)
            loss = F.cross_entropy(logits, y) + aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        return time.perf_counter() - t
    return step


def dropout_timer(batch: int):
    x = torch.randn(batch, 65, 256, requires_grad=True)
    g = torch.randn_like(x)
    keys = keyed.draw_sample_keys(batch, torch.Generator().manual_seed(0))

    def step(use_keys: bool) -> float:
        t = time.perf_counter()
        if use_keys:
            with keyed.sample_keys(keys):
                y = keyed.dropout(x, 0.1)
        else:
            y = F.dropout(x, 0.1, training=True)
        y.backward(g)
        return time.perf_counter() - t
    return step


def interleaved(step, rounds: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        step(True), step(False)
    times = {True: [], False: []}
    for r in range(rounds):
        for use in ((True, False) if r % 2 == 0 else (False, True)):
            times[use].append(step(use))
    return {"keyed": statistics.median(times[True]), "torch": statistics.median(times[False])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"moesaic keyed randomness: {date.today()}, {cpu_name()}, torch {torch.__version__}, "
          f"{args.threads} threads, batch {args.batch}, median of {args.rounds} interleaved")
    for what, make in (("training step, vit_moe_lite6_prmoe recipe", step_timer),
                       ("dropout p=0.1 [b, 65, 256] fwd+bwd", dropout_timer)):
        r = interleaved(make(args.batch), args.rounds)
        print(f"{what:44s} keyed {r['keyed'] * 1e3:8.2f} ms   torch {r['torch'] * 1e3:8.2f} ms"
              f"   keyed/torch {r['keyed'] / r['torch']:.3f}")


if __name__ == "__main__":
    main()

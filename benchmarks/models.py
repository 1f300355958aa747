"""Training throughput of the model zoo: MoE ViTs against their dense twin ViT-Lite-6/4.

One training step = forward, cross-entropy + aux loss, backward, fused AdamW step, on a batch of
random 32x32 images (float32, 2 threads by default). Models are timed in interleaved rounds so
machine-load drift hits all of them alike; images/s is the median over every timed step (the best step is printed too: on a loaded
machine it is the better estimate of the uncontended speed).
Targets (issue 4): each MoE model reaches >= 0.9 x the dense images/s scaled by the ratio of
forward FLOPs per image; ``vit_moe_lite6`` holds >= 2x the dense parameters at >= 0.9x its
images/s. ``--profile NAME`` prints where a model's step time goes (torch.profiler).

Run: flock /tmp/moesaic-bench.lock python3 benchmarks/models.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

import moesaic.models as zoo
from _machine import cpu_name

DENSE = "vit_lite6"
MOE = ["vit_moe_lite6", "vit_moe_lite6_prmoe"]


class Trainer:
    """A model, its AdamW optimiser and one fixed batch."""

    def __init__(self, name: str, batch: int):
        torch.manual_seed(0)
        self.name = name
        self.model = zoo.create(name).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.03,
                                     fused=True)
        self.x = torch.randn(batch, 3, 32, 32)
        self.y = torch.randint(0, 10, (batch,))
        self.times: list[float] = []

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        logits, aux = self.model(self.x)
        (F.cross_entropy(logits, self.y) + aux).backward()
        self.opt.step()

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            self.times.append(time.perf_counter() - t0)

    def images_per_s(self, best: bool = False) -> float:
        t = min(self.times) if best else statistics.median(self.times)
        return self.x.shape[0] / t


def profile(names: list, batch: int, steps: int) -> None:
    """Per-op self CPU time of one training step (mean of ``steps``), dense next to each MoE
    model, sorted by how much more the last model spends than the dense one."""
    from torch.profiler import ProfilerActivity, profile as prof

    per_model = {}
    for name in [DENSE] + names:
        tr = Trainer(name, batch)
        tr.step()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(steps):
                tr.step()
        per_model[name] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in p.key_averages()}
    last = per_model[names[-1]]
    keys = sorted(set().union(*per_model.values()),
                  key=lambda k: per_model[DENSE].get(k, 0.0) - last.get(k, 0.0))
    print(f"\nself CPU ms per training step (torch.profiler, mean of {steps}, batch {batch})")
    print(f"{'op':48s}" + "".join(f" {n[:20]:>20s}" for n in per_model))
    for k in keys[:20]:
        print(f"{k[:48]:48s}" + "".join(f" {per_model[n].get(k, 0.0):20.1f}" for n in per_model))
    print(f"{'total':48s}" + "".join(f" {sum(v.values()):20.1f}" for v in per_model.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    ap.add_argument("--profile", nargs="*", default=None, metavar="NAME",
                    help="only profile these models next to the dense one (default: the MoE "
                         "models) instead of timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"benchmarks/models.py  {date.today()}  torch {torch.__version__}  "
          f"{cpu_name()}  {os.cpu_count()} cores, {args.threads} threads, float32")
    if args.profile is not None:
        profile(args.profile or MOE, args.batch, 2)
        return
    print(f"training step: fwd + cross-entropy + aux + bwd + fused AdamW, batch {args.batch}, "
          f"32x32x3 images; median of {args.rounds} interleaved rounds x {args.steps} steps\n")
    trainers = [Trainer(n, args.batch) for n in [DENSE] + MOE]
    for tr in trainers:
        tr.step()  # warm-up
    for _ in range(args.rounds):
        for tr in trainers:
            tr.timed(args.steps)

    dense = trainers[0]
    d_ips, d_flops = dense.images_per_s(), dense.model.flops_per_image()
    d_total, _ = zoo.count_parameters(dense.model)
    print(f"{'model':22s} {'params':>8s} {'active':>8s} {'MFLOP/img':>9s} {'img/s':>7s} "
          f"{'x dense':>7s} {'FLOP-scaled target':>18s} {'img/s / it':>11s} "
          f"{'best img/s':>10s} {'ratio (best)':>12s}")
    ok = {"medians": True, "best steps": True}
    for tr in trainers:
        total, active = zoo.count_parameters(tr.model)
        flops, ips = tr.model.flops_per_image(), tr.images_per_s()
        scaled = d_ips * d_flops / flops
        ratio = ips / scaled
        line = (f"{tr.name:22s} {total / 1e6:7.2f}M {active / 1e6:7.2f}M {flops / 1e6:9.1f} "
                f"{ips:7.1f} {ips / d_ips:7.3f}")
        best = tr.images_per_s(best=True)
        best_ratio = best / (dense.images_per_s(best=True) * d_flops / flops)
        if tr is not dense:
            line += f" {0.9 * scaled:11.1f} (0.9x) {ratio:11.3f} {best:10.1f} {best_ratio:12.3f}"
            ok["medians"] &= ratio >= 0.9
            ok["best steps"] &= best_ratio >= 0.9
        else:
            line += f" {'':18s} {'':11s} {best:10.1f}"
        print(line)
    moe6 = trainers[1]
    p_ratio = zoo.count_parameters(moe6.model)[0] / d_total
    t_ratio = moe6.images_per_s() / d_ips
    best_t = moe6.images_per_s(best=True) / dense.images_per_s(best=True)
    print(f"\n{moe6.name}: {p_ratio:.2f}x the parameters of {DENSE} (target >= 2) at "
          f"{t_ratio:.3f}x its images/s (target >= 0.9; best steps: {best_t:.3f}x)")
    ok["medians"] &= p_ratio >= 2 and t_ratio >= 0.9
    ok["best steps"] &= p_ratio >= 2 and best_t >= 0.9
    for how, met in ok.items():
        print(f"targets {'met' if met else 'NOT met'} ({how})")


if __name__ == "__main__":
    main()

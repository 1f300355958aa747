"""Forward+backward time and peak extra memory of moesaic.MoE against a dense FFN.

Each MoE configuration is compared with k x the dense FFN (D -> F -> D, GELU, bias) on T tokens,
the dense products of the same FLOPs; memory is compared with the dense FFN on k*T tokens.
``--hidden-dropout P`` drops after the activation in both (nn.Dropout in the dense FFN, the
experts' hashed masks in the MoE layers).
Times are medians over repetitions in one process, side by side. Peak extra memory is the
high-water mark of live tensor bytes during one fwd+bwd (moesaic.memtrack.LiveMemory: exact and
independent of machine load), less the parameter gradients the step leaves behind. On Linux it
also counts the memory page-faulted per step (minor faults: fresh pages the kernel maps and
zeroes), and times filling a fresh 64 MiB tensor against filling one that is reused, which is
what such faults cost on this machine.

Legend: T tokens, D model dim, F ffn dim, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from datetime import date

import torch
import torch.nn as nn
import torch.nn.functional as F

import moesaic

CONFIGS = [  # (name, top_k, capacity mode)
    ("top1 cf1.25", 1, True),
    ("top1 dropless", 1, False),
    ("top2 cf1.25", 2, True),
    ("top2 dropless", 2, False),
]


class DenseFFN(nn.Module):
    def __init__(self, d_model, d_ff, hidden_dropout=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(hidden_dropout)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x)))), x.new_zeros(())


def build(kind: str, args) -> nn.Module:
    torch.manual_seed(0)
    p = getattr(args, "hidden_dropout", 0.0)
    if kind == "dense":
        return DenseFFN(args.d_model, args.d_ff, p)
    _, top_k, capacity = next(c for c in CONFIGS if c[0] == kind)
    extra = {"hidden_dropout": p} if p else {}  # older versions (ab.py) lack the option
    return moesaic.MoE(args.d_model, args.d_ff, args.experts, top_k=top_k, capacity_factor=1.25,
                       drop_tokens=capacity, **extra)


def step(module: nn.Module, x: torch.Tensor) -> None:
    """One training step's fwd+bwd; gradients start from None, as after zero_grad()."""
    module.zero_grad(set_to_none=True)
    y, aux = module(x)
    (y.square().mean() + aux).backward()
    x.grad = None


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage does not count them)."""
    if sys.platform != "linux":
        return 0
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(modules: dict, x: torch.Tensor, reps: int) -> tuple[dict, dict]:
    """Seconds per fwd+bwd of each module in each round, timed round-robin so that drifts in
    machine load fall on every configuration alike; and MiB page-faulted per step."""
    for module in modules.values():
        step(module, x)
    times = {name: [] for name in modules}
    faults = {name: 0 for name in modules}
    for _ in range(reps):
        for name, module in modules.items():
            f0, t0 = minor_faults(), time.perf_counter()
            step(module, x)
            times[name].append(time.perf_counter() - t0)
            faults[name] += minor_faults() - f0
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    return times, {name: n * page / reps / 2**20 for name, n in faults.items()}


def fresh_vs_reused_ms(mib: int = 64, reps: int = 9) -> tuple[float, float]:
    """Median ms to fill a freshly allocated ``mib`` MiB tensor, and one allocated once."""
    n = mib * 2**20 // 4
    kept = torch.empty(n)
    fresh, reused = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.empty(n).fill_(1.0)
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        kept.fill_(1.0)
        reused.append(time.perf_counter() - t0)
    return statistics.median(fresh) * 1e3, statistics.median(reused) * 1e3


def paired_ratio(times: list, dense_times: list, k: int) -> float:
    """Median over rounds of (this round's time) / (k x the same round's dense time)."""
    return statistics.median(t / (k * d) for t, d in zip(times, dense_times))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8 * 1024, help="tokens per step (T)")
    p.add_argument("--d-model", type=int, default=512, help="model dim (D)")
    p.add_argument("--d-ff", type=int, default=2048, help="expert hidden dim (F)")
    p.add_argument("--experts", type=int, default=8, help="number of experts (E)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    p.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout after the activation, in the dense FFN and inside the experts")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    # Imported here, not at the top: benchmarks/ab.py imports this module to time older moesaic
    # versions, which may predate memtrack.
    from moesaic.memtrack import peak_extra_bytes

    torch.set_num_threads(args.threads)
    T, D, Fd, E = args.tokens, args.d_model, args.d_ff, args.experts
    drop = f", hidden dropout {args.hidden_dropout}" if args.hidden_dropout else ""
    print(f"moesaic layer benchmark, {date.today()}: T={T} D={D} F={Fd} E={E} float32{drop}, "
          f"{args.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; median of {args.reps} fwd+bwd steps, configurations interleaved; "
          "time ratio = median over rounds of t / (k x dense t in the same round)")
    x = torch.randn(T, D, requires_grad=True)  # as inside a network: the input needs a gradient
    modules = {"dense": build("dense", args), **{name: build(name, args) for name, _, _ in CONFIGS}}
    times, fault_mib = time_interleaved(modules, x, args.reps)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    dense, dense_s = modules["dense"], seconds["dense"]
    dense_mem = {}
    if not args.no_memory:
        for k in (1, 2):
            x_kTD = x.detach().repeat(k, 1).requires_grad_()
            dense_mem[k] = peak_extra_bytes(dense, functools.partial(step, dense, x_kTD))
    fresh_ms, reused_ms = fresh_vs_reused_ms()
    print(f"filling a 64 MiB tensor: {fresh_ms:.1f} ms freshly allocated, {reused_ms:.1f} ms "
          "reused (the difference is the page faults)")
    print(f"{'config':<16}{'ms':>9}{'k x dense ms':>14}{'time ratio':>12}{'extra MiB':>11}"
          f"{'dense kT MiB':>14}{'mem ratio':>11}{'dropped':>9}{'faulted MiB':>13}")
    print(f"{'dense FFN':<16}{dense_s * 1e3:>9.1f}{'':>67}{fault_mib['dense']:>13.0f}")
    rows = []
    for name, top_k, _ in CONFIGS:
        layer, t = modules[name], seconds[name]
        dropped = float(layer.last_stats.dropped_fraction)
        row = dict(config=name, ms=t * 1e3, dense_ms=top_k * dense_s * 1e3,
                   time_ratio=paired_ratio(times[name], times["dense"], top_k), dropped=dropped,
                   faulted_mib_per_step=fault_mib[name])
        line = f"{name:<16}{t * 1e3:>9.1f}{top_k * dense_s * 1e3:>14.1f}{row['time_ratio']:>12.3f}"
        if not args.no_memory:
            mem = peak_extra_bytes(layer, functools.partial(step, layer, x))
            row.update(extra_mib=mem / 2**20, dense_mib=dense_mem[top_k] / 2**20,
                       mem_ratio=mem / dense_mem[top_k])
            line += f"{row['extra_mib']:>11.1f}{row['dense_mib']:>14.1f}{row['mem_ratio']:>11.3f}"
        else:
            line += " " * 36
        print(line + f"{dropped:>9.3f}{fault_mib[name]:>13.0f}")
        rows.append(row)
    result = dict(date=str(date.today()), tokens=T, d_model=D, d_ff=Fd, experts=E,
                  hidden_dropout=args.hidden_dropout, threads=args.threads, dense_ms=dense_s * 1e3,
                  dense_faulted_mib_per_step=fault_mib["dense"], fill_64mib_fresh_ms=fresh_ms,
                  fill_64mib_reused_ms=reused_ms, rows=rows)
    print("targets: time ratio <= 1.0, mem ratio <= 1.1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

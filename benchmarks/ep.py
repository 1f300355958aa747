"""Expert parallelism on this machine: step time and bytes moved, 1 rank vs 2 ranks (gloo).

The same global batch (2 x tokens-per-rank tokens) and the same model (a stack of MoE layers
between two linear layers) run as one process with 1 and with 2 intra-op threads, and as 2
processes with one thread each, the experts split over them (ep 2) and tokens moved by all-to-all. A step is
forward + backward + gradient synchronisation (no optimizer). Bytes are what one rank sends to
the other per step in MoE all-to-alls (forward and backward; counted by the dispatcher) and are
compared with the formula of docs/parallelism.md. On 2 CPU cores this measures the cost of the
exchange, not a speed-up: the FLOPs are the same and the cores are shared.

Run: flock /tmp/moesaic-bench.lock python3 benchmarks/ep.py

Legend: T tokens per rank, D model dim, F ffn dim, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time
from datetime import date

import torch

import moesaic
from moesaic.models import MoEStack
from moesaic.parallel import comm_stats
from moesaic.parallel.volume import alltoall_bytes_per_rank, dedup_bytes_per_rank


def _worker(rank, world, port, a, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(a.threads)
    moesaic.init_distributed(timeout_s=120)
    moesaic.moe_set_seed(0)
    groups = dict(num_groups=a.groups[0], topk_groups=a.groups[1]) if a.groups else {}
    model = moesaic.parallelize(MoEStack(a.d_model, a.d_ff, [a.experts] * a.layers, top_k=a.top_k,
                                         drop_tokens=a.capacity, capacity_factor=1.25,
                                         capacity_scope=a.scope, **groups),
                                dedup_tokens=a.dedup)
    T = a.tokens * 2 // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, a.d_model, generator=g)
    times, sent = [], []
    for step in range(a.warmup + a.steps):
        stats = comm_stats(model)
        stats.reset()
        t0 = time.perf_counter()
        with moesaic.equal_batches(model):  # equal batches, as the training loop runs them
            out, aux = model(x)
        (out.square().mean() + aux).backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(dt)
            sent.append(stats.bytes_sent)
    queue.put((rank, statistics.median(times), statistics.mean(sent)))
    moesaic.destroy()


def run(world, threads, a):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = argparse.Namespace(**vars(a), threads=threads)
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, queue)) for r in range(world)]
    for p in procs:
        p.start()
    res = sorted(queue.get(timeout=600) for _ in range(world))
    for p in procs:
        p.join(60)
    return max(t for _, t, _ in res), res[0][2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank (2 ranks)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dedup", dest="dedup_table", action="store_true",
                   help="instead: 2 ranks, dropless, plain against deduplicated dispatch "
                        "(dedup_tokens), routing unlimited and limited to one of two expert "
                        "groups (each token's experts on one rank)")
    p.add_argument("--scopes", dest="scope_table", action="store_true",
                   help="instead: 2 ranks, capacity factor 1.25, capacity_scope 'batch' (each "
                        "rank's own capacity, padded [E, C, D] blocks) against 'global' (drops "
                        "as one process on both ranks' tokens, ragged rows)")
    a = p.parse_args()
    a.groups, a.dedup, a.scope = None, False, "batch"
    if a.dedup_table:
        return dedup_table(a)
    if a.scope_table:
        return scope_table(a)
    print(f"# benchmarks/ep.py  {date.today()}  torch {torch.__version__}  "
          f"{platform.platform()}  {os.cpu_count()} CPUs  backend gloo")
    print(f"# model: {a.layers} MoE layers, D={a.d_model} F={a.d_ff} E={a.experts} "
          f"top_k={a.top_k}, float32; global batch {2 * a.tokens} tokens; "
          f"1 rank x 1 or 2 threads vs 2 ranks x 1 thread; median of {a.steps} steps "
          f"(fwd+bwd+grad sync) after {a.warmup} warm-up")
    print(f"# load average before: {os.getloadavg()[0]:.2f} (the machine is shared)")
    print(f"{'mode':<10}{'1 rank x1 thr ms':>18}{'1 rank x2 thr ms':>18}{'2 ranks x1 thr ms':>19}"
          f"{'ratio/x1':>9}{'ratio/x2':>9}{'MB sent/rank/step':>19}{'formula MB':>12}")
    for capacity in (True, False):
        a.capacity = capacity
        t1_1, _ = run(1, 1, a)
        t1, _ = run(1, 2, a)
        t2, sent = run(2, 1, a)
        kw = dict(num_experts=a.experts, capacity_factor=1.25) if capacity else {}
        pred = 4 * a.layers * alltoall_bytes_per_rank(a.tokens, a.d_model, a.top_k, 2, 4, **kw)
        name = "cf 1.25" if capacity else "dropless"
        print(f"{name:<10}{t1_1 * 1e3:>18.1f}{t1 * 1e3:>18.1f}{t2 * 1e3:>19.1f}{t2 / t1_1:>9.2f}{t2 / t1:>9.2f}"
              f"{sent / 1e6:>19.2f}{pred / 1e6:>12.2f}")
    print("# ratio/x1, ratio/x2 = 2-rank step time / 1-rank step time with 1 or 2 threads (the "
          "baselines; 0.5 vs x1 = perfect scaling); MB sent counts "
          "MoE all-to-all payload (incl. token counts) one rank sends to the other per step; "
          "formula = 4 exchanges x layers x alltoall_bytes_per_rank (balanced routing)")


def dedup_table(a):
    """2 ranks, dropless: plain all-to-all against dedup_tokens, with and without group limits."""
    print(f"# benchmarks/ep.py --dedup  {date.today()}  torch {torch.__version__}  "
          f"{platform.platform()}  {os.cpu_count()} CPUs  backend gloo")
    print(f"# model: {a.layers} MoE layers, D={a.d_model} F={a.d_ff} E={a.experts} "
          f"top_k={a.top_k}, dropless, float32; 2 ranks x 1 thread, {a.tokens} tokens per rank; "
          f"median of {a.steps} steps (fwd+bwd+grad sync) after {a.warmup} warm-up")
    print(f"# load average before: {os.getloadavg()[0]:.2f} (the machine is shared)")
    print(f"{'routing':<22}{'plain ms':>10}{'dedup ms':>10}{'time ratio':>11}"
          f"{'plain MB':>10}{'dedup MB':>10}{'MB ratio':>10}{'model MB':>10}")
    a.capacity = False
    for groups in (None, (2, 1)):
        a.groups = groups
        res = []
        for dedup in (False, True):
            a.dedup = dedup
            res.append(run(2, 1, a))
        (tp, plain_bytes), (td, dedup_bytes) = res
        name = "unlimited" if groups is None else f"{groups[1]} of {groups[0]} groups"
        model = 4 * a.layers * dedup_bytes_per_rank(a.tokens, a.d_model, a.top_k, 2, a.experts, 4,
                                                    None if groups is None else groups[1])
        print(f"{name:<22}{tp * 1e3:>10.1f}{td * 1e3:>10.1f}{td / tp:>11.2f}"
              f"{plain_bytes / 1e6:>10.2f}{dedup_bytes / 1e6:>10.2f}"
              f"{dedup_bytes / plain_bytes:>10.2f}{model / 1e6:>10.2f}")
    print("# MB = MoE all-to-all payload one rank sends to the other per step (rows, token "
          "counts, and with dedup the pair-index and weight columns); ratio = dedup / plain; "
          "model MB = 4 exchanges x layers x moesaic.parallel.volume.dedup_bytes_per_rank "
          "(balanced routing)")


def scope_table(a):
    """2 ranks, capacity 1.25: capacity_scope "batch" against "global"."""
    print(f"# benchmarks/ep.py --scopes  {date.today()}  torch {torch.__version__}  "
          f"{platform.platform()}  {os.cpu_count()} CPUs  backend gloo")
    print(f"# model: {a.layers} MoE layers, D={a.d_model} F={a.d_ff} E={a.experts} "
          f"top_k={a.top_k}, capacity factor 1.25, float32; 2 ranks x 1 thread, {a.tokens} "
          f"tokens per rank; median of {a.steps} steps (fwd+bwd+grad sync) after {a.warmup} "
          f"warm-up; the scopes alternate, twice each")
    print(f"# load average before: {os.getloadavg()[0]:.2f} (the machine is shared)")
    print(f"{'capacity_scope':<16}{'ms':>10}{'MB sent/rank/step':>19}")
    a.capacity = True
    res = {"batch": [], "global": []}
    for _ in range(2):
        for scope in res:
            a.scope = scope
            res[scope].append(run(2, 1, a))
    for scope, runs in res.items():
        print(f"{scope:<16}{min(t for t, _ in runs) * 1e3:>10.1f}{runs[0][1] / 1e6:>19.2f}")
    (tb, mb), (tg, mg) = (min(r) for r in res.values())
    print(f"# global / batch: time {tg / tb:.2f}, bytes {mg / mb:.2f} (ms: the faster of two "
          "runs; MB: the MoE all-to-all payload one rank sends per step, padding rows "
          "included; global's [K, E] count all-gather, K * E int64 per layer and forward, is "
          "not counted)")


if __name__ == "__main__":
    main()

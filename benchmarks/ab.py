"""A/B: the MoE layer at two code versions, side by side, against the same dense FFN.

Each version is exported (``git archive``) to a temporary directory, or taken from the working
tree, and timed in its own short-lived process; processes alternate base, head, base, head...
so that machine drift falls on both alike. Inside a process the MoE layer and the dense FFN
(D -> F -> D, GELU, bias) are timed round-robin on the same input, as in benchmarks/layer.py.
Reported per configuration: each version's time ratio to k x dense (median over processes of
the process's median ratio) and head / base time (median over adjacent base-head pairs).

Run: flock /tmp/moesaic-bench.lock python3 benchmarks/ab.py --base dad2f9d

Legend: T tokens, D model dim, F ffn dim, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BENCH_DIR = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH_DIR)
from layer import CONFIGS as LAYER_CONFIGS  # noqa: E402  (the layer benchmark's harness)

TOP_K = {name: top_k for name, top_k, _ in LAYER_CONFIGS}

# This checkout's benchmarks/layer.py builds and times the modules; only ``moesaic`` comes from
# the version under test (PYTHONPATH), so both versions run the same harness.
WORKER = r'''
import json, sys, types
a = json.loads(sys.argv[1])
sys.path.insert(0, a["bench_dir"])
import torch
import layer
import moesaic
torch.set_num_threads(a["threads"])
args = types.SimpleNamespace(d_model=a["d_model"], d_ff=a["d_ff"], experts=a["experts"])
modules = {name: layer.build(name, args) for name in ["dense", *a["configs"]]}
x = torch.randn(a["tokens"], a["d_model"], requires_grad=True)
times, _ = layer.time_interleaved(modules, x, a["steps"])
print(json.dumps({"moesaic": moesaic.__file__, "times": times}))
'''


def export(rev: str, tmp: str) -> str:
    """A directory holding ``rev``'s tree; the working tree for rev == "WORKTREE"."""
    if rev == "WORKTREE":
        return ROOT
    out = os.path.join(tmp, rev.replace("/", "_"))
    os.makedirs(out)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--base/--head {rev!r}: git archive failed: "
                         f"{archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
    return out


def describe(rev: str) -> str:
    if rev == "WORKTREE":
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "moesaic"],
                               capture_output=True, text=True).stdout.strip()
        return f"working tree (HEAD {head}{', moesaic/ modified' if dirty else ''})"
    proc = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "--verify",
                           rev + "^{commit}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--base/--head {rev!r} is not a commit of this repository")
    return f"{rev} ({proc.stdout.strip()})"


def run_worker(src: str, args: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], env=env, cwd=src,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"worker for {src} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["moesaic"].startswith(src):
        raise SystemExit(f"worker imported {result['moesaic']}, not the copy in {src}")
    return result["times"]


def ratio_to_dense(times: dict, name: str) -> float:
    k = TOP_K[name]
    return statistics.median(t / (k * d) for t, d in zip(times[name], times["dense"]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--head", default="WORKTREE",
                   help="git revision to test (default: the working tree as it is)")
    p.add_argument("--configs", default="top1 cf1.25,top2 cf1.25",
                   help=f"comma-separated MoE configurations, from: {', '.join(TOP_K)}")
    p.add_argument("--rounds", type=int, default=4, help="processes per version")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process and module")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (T)")
    p.add_argument("--d-model", type=int, default=512, help="model dim (D)")
    p.add_argument("--d-ff", type=int, default=2048, help="expert hidden dim (F)")
    p.add_argument("--experts", type=int, default=8, help="number of experts (E)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",")]
    unknown = [c for c in configs if c not in TOP_K]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {list(TOP_K)}")
    wargs = dict(configs=configs, bench_dir=BENCH_DIR, steps=a.steps, tokens=a.tokens,
                 d_model=a.d_model, d_ff=a.d_ff, experts=a.experts, threads=a.threads)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"moesaic A/B, {when}: base {describe(a.base)} vs head {describe(a.head)}; "
          f"T={a.tokens} D={a.d_model} F={a.d_ff} E={a.experts} float32, {a.threads} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; {a.rounds} alternating processes "
          f"per version x {a.steps} steps")
    with tempfile.TemporaryDirectory(prefix="moesaic-ab-") as tmp:
        srcs = {"base": export(a.base, tmp), "head": export(a.head, tmp)}
        runs = {"base": [], "head": []}
        for r in range(a.rounds):
            for side in ("base", "head"):
                runs[side].append(run_worker(srcs[side], wargs))
                print(f"  round {r + 1}/{a.rounds} {side} done", file=sys.stderr, flush=True)
    rows = []
    print(f"{'config':<16}{'base / k x dense':>18}{'head / k x dense':>18}{'head / base':>13}")
    for name in configs:
        base = statistics.median(ratio_to_dense(t, name) for t in runs["base"])
        head = statistics.median(ratio_to_dense(t, name) for t in runs["head"])
        speed = statistics.median(statistics.median(h[name]) / statistics.median(b[name])
                                  for b, h in zip(runs["base"], runs["head"]))
        per = {side: [round(ratio_to_dense(t, name), 3) for t in runs[side]] for side in runs}
        rows.append(dict(config=name, base_ratio=base, head_ratio=head, head_over_base=speed,
                         per_process=per))
        print(f"{name:<16}{base:>18.3f}{head:>18.3f}{speed:>13.3f}   per process: base "
              f"{min(per['base']):.3f}-{max(per['base']):.3f}, head "
              f"{min(per['head']):.3f}-{max(per['head']):.3f}")
    print("head / base < 1: head is faster")
    result = dict(date=when, base=describe(a.base), head=describe(a.head), rows=rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

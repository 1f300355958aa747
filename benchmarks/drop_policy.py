"""What causal capacity drops cost a causal language model (examples/char_lm.py at top-2).

The example trains with Switch routing at top-2 (4 experts, jitter, balance loss 0.01) at each
training capacity factor, once per drop policy and seed.

``position`` (choice-major, sequence after sequence) and ``score`` let later tokens decide which
earlier assignments drop, so in training a token's output can depend on the future; ``causal``
(by position, then choice, then sequence, each position up to its share of the capacity so
far) never does. The validation loss is read in eval
mode, where the capacity (eval_capacity_factor 2.0: C = T at top-2 of 4 experts) drops
nothing, so it is causal for every policy: the comparison is of what training learned. Prints
each policy's mean over the seeds, the training dropped fraction and the difference to
``position``, side by side in one process.

    python3 benchmarks/drop_policy.py        # 2 capacities x 3 policies x 2 seeds, about 3 min
    python3 benchmarks/drop_policy.py --seeds 0 1 2 --steps 600 --capacity-factors 0.5
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import statistics
import subprocess
import time
from datetime import datetime, timezone

from _machine import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = ("position", "score", "causal")


def _char_lm():
    spec = importlib.util.spec_from_file_location(
        "char_lm", os.path.join(ROOT, "examples", "char_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per policy")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    p.add_argument("--capacity-factors", type=float, nargs="+", default=[1.25, 0.75],
                   help="training capacity factors (1.25: Switch's)")
    p.add_argument("--val-batches", type=int, default=16,
                   help="validation batches of 32 sequences of 64 characters")
    a = p.parse_args(argv)
    char_lm = _char_lm()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({os.cpu_count()} "
          f"cores), commit {commit}, torch threads 1")
    print(f"char_lm: 4 experts top-2, switch routing (jitter, balance loss 0.01), {a.steps} "
          f"steps, seeds {a.seeds}, validation over {a.val_batches} batches of 32 x 64 "
          f"characters (eval: nothing dropped)")
    results = {}
    for cf in a.capacity_factors:
        for policy in POLICIES:
            runs = []
            for seed in a.seeds:
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    out = char_lm.main(["--top-k", "2", "--drop-policy", policy,
                                        "--capacity-factor", str(cf), "--seed", str(seed),
                                        "--steps", str(a.steps),
                                        "--val-batches", str(a.val_batches)])
                runs.append({**out, "seconds": time.perf_counter() - t0})
            results[(cf, policy)] = runs
    print(f"\n{'capacity':>8} {'policy':<9} {'val loss (mean)':>15} {'per seed':>20} "
          f"{'train dropped':>14} {'vs position':>12} {'s/run':>6}")
    for (cf, policy), runs in results.items():
        val = statistics.mean(r["val_loss"] for r in runs)
        base = statistics.mean(r["val_loss"] for r in results[(cf, "position")])
        seeds = " ".join(f"{r['val_loss']:.3f}" for r in runs)
        dropped = statistics.mean(r["train_dropped_fraction"] for r in runs)
        secs = statistics.mean(r["seconds"] for r in runs)
        print(f"{cf:>8} {policy:<9} {val:>15.3f} {seeds:>20} {100 * dropped:>13.1f}% "
              f"{val - base:>+12.3f} {secs:>6.1f}")
    return results


if __name__ == "__main__":
    main()

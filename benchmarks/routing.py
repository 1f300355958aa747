"""What each drop policy's routing costs on CPU, beside the layer it routes for.

Times ``routing.token_choice`` (scores, top-k, capacity slots, drops; the PyTorch path) for
``drop_policy`` position, score and causal (causal both as sequences of 256 and as one
sequence of T), then the whole layer's forward + backward with position and with causal drops,
side by side in one process, interleaved round by round: the median of the rounds, and each
policy's ratio to position.

    python3 benchmarks/routing.py                      # T = 8192, D = 256, about 1 min
    python3 benchmarks/routing.py --tokens 16384 --experts 64 --top-k 1
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone

import torch

import moesaic
from moesaic import routing
from _machine import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interleaved_ms(fns: dict, rounds: int) -> dict:
    """{name: median ms}: each callable once per round, in turn (a warm-up round first), so a
    machine's drift falls on all of them alike."""
    times = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens T per batch")
    p.add_argument("--d-model", type=int, default=256, help="model dim D (the layer's F = 4 D)")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="expert counts E")
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 2], help="top-k values")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length S for causal")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="training capacity factor")
    p.add_argument("--repeats", type=int, default=20,
                   help="timed rounds of the routings (median); the layers get half as many")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    T, D, S = a.tokens, a.d_model, a.seq_len
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()} ({os.cpu_count()} "
          f"cores), {platform.platform()}, torch {torch.__version__}, {a.threads} threads, "
          f"commit {commit}")
    print(f"T={T}, D={D}, F={4 * D}, capacity factor {a.capacity_factor}, float32, median of "
          f"{a.repeats} interleaved rounds (layers: {max(3, a.repeats // 2)}); routing: "
          "routing.token_choice; layer: moesaic.MoE forward + backward")
    print(f"{'E':>3} {'K':>2}  {'routing ms: position':>20} {'score':>12} "
          f"{f'causal S={S}':>16} {'causal S=T':>16}  {'layer ms: position':>18} "
          f"{f'causal S={S}':>16}")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for E in a.experts:
        for K in a.top_k:
            logits_TE = torch.randn(T, E, generator=gen)
            C = routing.token_choice_capacity(T, E, K, a.capacity_factor, 4)

            def route(policy, seq_len=None):
                return lambda: routing.token_choice(logits_TE, K, C, policy, True,
                                                    seq_len=seq_len)

            ms = interleaved_ms({"position": route("position"), "score": route("score"),
                                 "causal_S": route("causal", S), "causal_T": route("causal")},
                                a.repeats)
            x = torch.randn(T // S, S, D, generator=gen)

            def step(policy):
                moesaic.moe_set_seed(0)
                layer = moesaic.MoE(D, 4 * D, E, top_k=K, capacity_factor=a.capacity_factor,
                                    drop_policy=policy)

                def run():
                    y, aux = layer(x)
                    (y.square().mean() + aux).backward()
                return run

            layer_ms = interleaved_ms({p: step(p) for p in ("position", "causal")},
                                      max(3, a.repeats // 2))
            base = ms["position"]
            print(f"{E:>3} {K:>2}  {base:>20.2f} {ms['score']:>6.2f} ({ms['score'] / base:.2f}x)"
                  f" {ms['causal_S']:>8.2f} ({ms['causal_S'] / base:.2f}x)"
                  f" {ms['causal_T']:>8.2f} ({ms['causal_T'] / base:.2f}x)"
                  f"  {layer_ms['position']:>18.1f} {layer_ms['causal']:>8.1f} "
                  f"({layer_ms['causal'] / layer_ms['position']:.2f}x)")
            rows.append({"E": E, "K": K, "routing_ms": ms, "layer_ms": layer_ms})
    return {"rows": rows}


if __name__ == "__main__":
    main()

"""GPU benchmark of the fused kernels: correctness on the card, then bandwidth, matmul rate and
timings of routing, dispatch, combine and the whole layer, PyTorch path against Triton.

Run from the checkout on one GPU (no install needed):

    PYTHONPATH=. python3 benchmarks/gpu.py --out benchmarks/results/gpu.json

Sections, each in its own try/except (an error is recorded in ``errors`` and the run goes on;
the JSON is rewritten after every section so a killed run still leaves its results):
1. checks: kernels against the PyTorch path on fresh random inputs, float32 and bfloat16;
2. device-to-device copy bandwidth and the dense bf16 matmul rate;
3. timings (CUDA events, median after warm-up) at T = 65,536 tokens, D in {1024, 4096},
   F = 4 D, E in {8, 64}, top_k in {1, 2}, bf16: routing, dispatch, combine (forward and
   backward) and the layer forward+backward for kernels="torch" (experts as a per-expert loop,
   and as grouped products) and kernels="triton" (grouped products with the Triton bias
   epilogue); and each of those expert paths alone (``experts_fwd_bwd``);
4. the row kernels at other block widths and warp counts (checked bit-equal to the library's),
   and one training step of the PR-MoE recipe's model with randomness keyed by sample against
   torch's generator (``prmoe_step``);
5. the three targets of issue 6 read off the timings (``[target]`` lines, ``targets``).
On the lent GPU machine write under $OUT (only that comes back): ``--out "$OUT/gpu.json"``.
Each kernel's achieved GB/s is the minimum traffic of its operation divided by its time, shown
as a fraction of the copy bandwidth; the layer's TFLOP/s counts the expert products on kept
rows (12 N D F for forward+backward), as a fraction of the matmul rate.

``--dry-run`` runs the same code on tiny CPU shapes under the Triton interpreter (the test
suite uses it as a smoke test). Budget: the timing loop stops starting new configurations once
``--budget-s`` seconds (default 420) have passed, so the run stays under 8 minutes; the block
sweep also stops between settings SWEEP_GRACE_S seconds past it. On SIGTERM the summary
(``fallbacks``, ``targets``) is filled in, the JSON saved and the run exits 124.

Legend: T tokens, D model dim, F ffn dim, E experts, K top-k, N kept rows.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import signal
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

if "--dry-run" in sys.argv:  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:  # an inherited TRITON_INTERPRET=1 would run the GPU kernels in the interpreter
    os.environ.pop("TRITON_INTERPRET", None)
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import moesaic  # noqa: E402
from moesaic import experts as experts_mod  # noqa: E402
from moesaic import routing  # noqa: E402
from moesaic.ops import TorchOps  # noqa: E402
from moesaic.routing import token_choice_capacity  # noqa: E402
from _plans import compare_plans  # noqa: E402  (benchmarks/_plans.py)


class Run:
    """Collects results and errors and rewrites the JSON after every section."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.t0 = time.perf_counter()
        self.budget_s = float("inf")
        self.data = {**meta, "checks": [], "timings": [], "speedups": [], "errors": []}
        self._writes = itertools.count()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def section(self, name, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 -- record and go on, by design
            self.data["errors"].append({"section": name, "error": repr(e)[:2000],
                                        "traceback": traceback.format_exc()[-3000:]})
            print(f"[error] {name}: {e!r}"[:500], flush=True)
            return None
        finally:
            self.save()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def save(self):
        """Write the JSON atomically: a kill mid-write leaves the previous complete file."""
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # A temp file of its own per write: the SIGTERM handler may save while an interrupted
        # save is half way through its file.
        tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.{next(self._writes)}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.out)

    def save_on_sigterm(self):
        """``timeout`` sends SIGTERM: record that, fill in the summary, keep every result so
        far, and exit."""
        def handler(signum, frame):
            self.data["errors"].append({"section": "run", "error": "killed by SIGTERM (timeout)"})
            summarize(self)
            self.save()
            print(f"[error] SIGTERM after {self.elapsed():.0f} s; wrote {self.out}", flush=True)
            sys.exit(124)
        signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------- timing helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MIN_SAMPLE_MS = 2.0


def median_ms(fn, device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter elsewhere.

    On a GPU each sample times ``inner`` back-to-back calls between one pair of events
    (enough for MIN_SAMPLE_MS), so a short kernel is not charged the host's launch latency
    of an idle GPU; host syncs inside ``fn`` (routing's row count) stay in the time."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    inner = 1
    if device.type == "cuda":
        t = time.perf_counter()
        fn()
        sync(device)
        one_ms = max((time.perf_counter() - t) * 1e3, 1e-3)
        inner = max(1, min(100, math.ceil(MIN_SAMPLE_MS / one_ms)))
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (both in float32)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) if b.numel() else 0.0


# ---------------------------------------------------------------- checks

def check(run: Run, name: str, err: float, tol: float, **extra):
    ok = bool(err <= tol)
    run.data["checks"].append({"name": name, "ok": ok, "err": err, "tol": tol, **extra})
    print(f"[check] {'ok  ' if ok else 'FAIL'} {name}: err {err:.3g} (tol {tol:g})", flush=True)


def check_routing(run, tops, device, gen, T, E):
    """Torch against Triton routing plans; the score-priority case also with a selection bias
    (auxiliary-loss-free balancing), with softmax and with sigmoid scores, and group-limited
    (DeepSeek-V3: half the groups of 4 experts); causal priority over sequences of 64."""
    for K in (1, 2):
        for cap, policy, biased, score_func, grouped in (
                (None, "position", False, "softmax", False),
                ("cf", "position", False, "softmax", False),
                ("cf", "score", False, "softmax", False), ("cf", "score", True, "softmax", False),
                ("cf", "score", True, "sigmoid", False), ("cf", "score", True, "sigmoid", True),
                ("cf", "causal", False, "softmax", False)):
            capacity = None if cap is None else token_choice_capacity(T, E, K, 1.0, 4)
            logits = torch.randn(T, E, device=device, generator=gen)
            bias = (torch.randn(E, device=device, generator=gen) * 0.1 if biased else None)
            if grouped and (E % 4 or E < 8):  # groups of 4 experts, half of them kept
                continue
            groups = (E // 4, E // 8) if grouped else None
            seq_len = 64 if policy == "causal" and T % 64 == 0 else None
            p0, pr0, _ = TorchOps.token_choice(logits, K, capacity, policy, K >= 2, bias,
                                               score_func, groups, seq_len)
            p1, pr1, _ = tops.token_choice(logits, K, capacity, policy, K >= 2, bias,
                                           score_func, groups, seq_len)
            name = f"routing T={T} E={E} K={K} capacity={capacity} {policy}"
            name += (" biased" if biased else "") + ("" if score_func == "softmax" else " sigmoid")
            name += f" groups {groups[1]} of {groups[0]}" if groups else ""
            exact = bool(torch.equal(p0.dest_TK, p1.dest_TK)
                         and torch.equal(p0.row_token_N, p1.row_token_N))
            scores = [pr0 if bias is None else pr0.float() + bias.float(), logits]
            cmp = compare_plans(p0, p1, scores, E // groups[0] if groups else None)
            check(run, name + " choices (flips only at near-ties)", cmp["flipped"]
                  + cmp["unexplained"], 1e-3, exact=exact, **cmp)
            # score priority: two tokens whose first-choice scores nearly tie may swap slots
            check(run, name + " slots and kept counts", cmp["slot_mismatch"]
                  + (0 if cmp["counts_equal"] else 1), 1e-3 if policy == "score" else 0.0)
            check(run, name + " probs", rel_err(pr1, pr0), 1e-5)
    check_causal_cap(run, device, gen, T, E)


def check_causal_cap(run, device, gen, T, E):
    """The causal cap's bookkeeping on the device against the same on the CPU, from one
    dropless plan: sequences of 64, and shuffled packed positions. Each token's logits are a
    permutation of 0, 0.25, 0.5, ... so no rounding difference of the two softmaxes can change
    a choice: the plans must be equal."""
    for K in (1, 2):
        logits = torch.rand(T, E, device=device, generator=gen).argsort(1).float() * 0.25
        capacity = token_choice_capacity(T, E, K, 0.75, 0)
        lengths = torch.randint(1, 128, (T,), device=device, generator=gen)
        lengths = lengths[:int(torch.searchsorted(torch.cumsum(lengths, 0), T)) + 1]
        packed = torch.cat([torch.arange(int(n), device=device) for n in lengths])[:T]
        packed = packed[torch.randperm(T, device=device, generator=gen)]
        for seq_len, positions in ((64 if T % 64 == 0 else None, None),
                                   (int(packed.max()) + 1, packed)):
            plans = [routing.token_choice(logits.to(where), K, capacity, "causal", K >= 2,
                                          seq_len=seq_len, position_T=None if positions is None
                                          else positions.to(where))[0]
                     for where in (device, "cpu")]
            same = all(torch.equal(getattr(plans[0], f).cpu(), getattr(plans[1], f))
                       for f in ("dest_TK", "row_token_N", "counts_E"))
            what = "packed positions" if positions is not None else f"sequences of {seq_len}"
            check(run, f"causal cap on the device = CPU, T={T} E={E} K={K}, {what}",
                  0.0 if same else 1.0, 0.0, exact=same)


def check_rows(run, tops, device, gen, T, E, D, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for K, policy in ((1, "position"), (2, "score")):
        logits = torch.randn(T, E, device=device, generator=gen)
        plan, _, _ = TorchOps.token_choice(logits, K, token_choice_capacity(T, E, K, 1.0, 4),
                                           policy, K >= 2)
        x = torch.randn(T, D, device=device, generator=gen).to(dtype)
        y = torch.randn(plan.row_token_N.numel(), D, device=device, generator=gen).to(dtype)
        g = torch.randn(T, D, device=device, generator=gen).to(dtype)
        res = []
        for ops in (TorchOps, tops):
            xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
            x_ND = ops.permute(xr, plan)
            x_ND.backward(y)
            yr_TD = ops.combine(yr, plan)
            yr_TD.backward(g)
            res.append((x_ND, xr.grad, yr_TD, yr.grad))
        tag = f"T={T} E={E} D={D} K={K} {str(dtype)[6:]}"
        for what, a, b in zip(("dispatch", "dispatch grad", "combine", "combine grad_y"),
                              res[1], res[0]):
            check(run, f"{what} {tag}", rel_err(a, b), tol)


def layer_grads(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    y, aux = layer(x)
    torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def check_layer(run, device, gen, T, D, E, K, dtype, policy):
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    x = torch.randn(T, D, device=device, generator=gen).to(dtype)
    g = torch.randn(T, D, device=device, generator=gen).to(dtype)
    outs = []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        layer = moesaic.MoE(D, 2 * D, E, top_k=K, drop_policy=policy, capacity_factor=1.0,
                            z_loss_coef=0.01, kernels=kernels).to(device=device, dtype=dtype)
        outs.append(layer_grads(layer, x, g))
    tag = f"layer T={T} D={D} E={E} K={K} {policy} {str(dtype)[6:]}"
    check(run, tag + " y", rel_err(outs[1][0], outs[0][0]), tol)
    check(run, tag + " grad x", rel_err(outs[1][1], outs[0][1]), tol)
    for name in outs[0][2]:
        check(run, f"{tag} grad {name}", rel_err(outs[1][2][name], outs[0][2][name]), tol)


def check_expert_paths(run, device, gen, D, Fdim, dtype):
    """Grouped products (grouped_mm, padded bmm) against the per-expert loop, with an idle
    expert (zero rows)."""
    counts = [37, 0, 120, 5, 64, 1, 0, 29]
    E, N = len(counts), sum(counts)
    params = [torch.randn(s, device=device, generator=gen).div(math.sqrt(s[-2] if len(s) == 3 else 1))
              .to(dtype).requires_grad_(True) for s in ((E, D, Fdim), (E, Fdim), (E, Fdim, D), (E, D))]
    x = torch.randn(N, D, device=device, generator=gen).to(dtype).requires_grad_(True)
    gy = torch.randn(N, D, device=device, generator=gen).to(dtype)
    inputs = [x] + params
    y0 = experts_mod.grouped_ffn(x, counts, "gelu", *params)
    ref = torch.autograd.grad(y0, inputs, gy)
    paths = ["bmm"] + (["grouped_mm"] if dtype == torch.bfloat16 else [])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for path in paths:
        y1 = experts_mod.batched_ffn(x, torch.tensor(counts, device=device), "gelu", *params,
                                     path=path)
        got = torch.autograd.grad(y1, inputs, gy)
        tag = f"experts {path} D={D} F={Fdim} {str(dtype)[6:]}"
        check(run, tag + " y", rel_err(y1, y0), tol)
        for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), got, ref):
            check(run, f"{tag} grad {name}", rel_err(a, b), tol)
    if device.type == "cuda":
        run.data["grouped_mm_supported"] = experts_mod.grouped_mm_supported(
            x.detach().to(torch.bfloat16), params[0].detach().to(torch.bfloat16))


def check_hidden_dropout(run, device, gen, N, Fdim, dtype):
    """The one-pass Triton dropout kernel, the PyTorch hash on this device and the CPU's drop
    the same elements (int32 arithmetic wraps alike everywhere); values agree to rounding."""
    from moesaic.hidden_dropout import drop_, kept
    from moesaic.kernels.dropout import hidden_dropout_
    p = 0.1
    a = torch.randn(N, Fdim, device=device, generator=gen).to(dtype)
    keys = torch.randint(-2**31, 2**31, (N,), device=device, dtype=torch.int32, generator=gen)
    torch_out, kernel_out = drop_(a.clone(), keys, p), hidden_dropout_(a.clone(), keys, p)
    cpu_kept = kept(keys.cpu(), Fdim, p)
    tag = f"hidden dropout N={N} F={Fdim} {str(dtype)[6:]}"
    check(run, tag + " kernel mask mismatch", float(((kernel_out == 0) != (torch_out == 0))
                                                    .float().mean()), 0.0)
    check(run, tag + " device vs cpu mask mismatch",
          float(((torch_out != 0).cpu() != cpu_kept).float().mean()), 1e-4)  # a's own zeros
    check(run, tag + " kernel values", rel_err(kernel_out, torch_out),
          0.0 if dtype == torch.float32 else 1e-2)


def check_keyed(run, device, gen, batch):
    """Randomness keyed by sample on this device: keyed dropout drops what it drops on the CPU,
    and a small ViT-MoE with every random layer on and activation checkpointing gives the whole
    batch's logits and gradients when run in two halves (each under its slice of the keys; the
    recomputations run on autograd's threads)."""
    from moesaic import keyed, moe_set_seed
    from moesaic.models import ViTMoE
    keys = torch.randint(-2**31, 2**31, (batch,), device=device, dtype=torch.int32, generator=gen)
    x = torch.randn(batch, 65, 256, device=device, generator=gen)
    with keyed.sample_keys(keys):
        dev_kept = keyed.dropout(x, 0.1) != 0
    with keyed.sample_keys(keys.cpu()):
        cpu_kept = keyed.dropout(x.cpu(), 0.1) != 0
    check(run, f"keyed dropout [{batch}, 65, 256] device vs cpu mask mismatch",
          float((dev_kept.cpu() != cpu_kept).float().mean()), 0.0)
    moe_set_seed(0)
    model = ViTMoE(img_size=32, patch_size=4, depth=2, d_model=64, num_heads=4, num_experts=4,
                   top_k=2, drop_tokens=False, residual=True, noise_policy="gaussian",
                   drop_rate=0.1, attn_drop=0.1, drop_path=0.1, hidden_dropout=0.1)
    model = model.to(device).train().set_grad_checkpointing(True)  # replays on autograd's thread
    images = torch.randn(batch, 3, 32, 32, device=device, generator=gen)
    tf32 = torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None
    if tf32 is not None:
        torch.backends.cudnn.allow_tf32 = False  # the patch conv, exact at every batch size
    try:
        results = []
        for parts in (2, 1):
            model.zero_grad(set_to_none=True)
            outs = []
            for part, k in zip(images.tensor_split(parts), keys.tensor_split(parts)):
                with keyed.sample_keys(k):
                    logits = model(part)[0]
                    logits.square().sum().backward()
                outs.append(logits.detach())
            results.append((torch.cat(outs), [p.grad.clone() for p in model.parameters()
                                              if p.grad is not None]))
    finally:
        if tf32 is not None:
            torch.backends.cudnn.allow_tf32 = tf32
    (halves, g_halves), (whole, g_whole) = results
    # fp32 on CUDA: the padded bmm's shapes differ per half, so sums round apart (~1e-6 on
    # logits of ~0.5); a keyed mask that differed would move them by ~1e-1.
    check(run, f"keyed ViT-MoE batch {batch} halves vs whole", rel_err(halves, whole), 5e-5)
    check(run, f"keyed ViT-MoE batch {batch} halves vs whole, gradients (checkpointed)",
          max(rel_err(a, b) for a, b in zip(g_halves, g_whole)), 1e-4)


# ---------------------------------------------------------------- machine rates

def copy_bandwidth(run, device, nbytes, warmup, iters):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup, iters)
    gbps = 2 * nbytes / ms / 1e6
    run.data["copy_GBps"] = gbps
    print(f"[rate] device-to-device copy: {gbps:.0f} GB/s ({nbytes / 2**30:.2f} GiB, read+write)",
          flush=True)


def matmul_rate(run, device, n, warmup, iters):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.mm(a, b), device, warmup, iters)
    tflops = 2 * n**3 / ms / 1e9
    run.data["matmul_TFLOPs"] = tflops
    run.data["matmul_dtype"] = str(dtype)[6:]
    print(f"[rate] dense {str(dtype)[6:]} matmul {n}^3: {tflops:.1f} TFLOP/s", flush=True)


# ---------------------------------------------------------------- timings

def record(run, op, kernels, shape, ms, nbytes=None, flops=None, **extra):
    row = {"op": op, "kernels": kernels, **shape, "ms": ms, **extra}
    line = f"[time] {op:<15} {kernels:<13} " + " ".join(f"{k}={v}" for k, v in shape.items())
    line += f"  {ms:8.3f} ms"
    if nbytes is not None:
        row["GBps"] = nbytes / ms / 1e6
        if run.data.get("copy_GBps"):
            row["frac_copy"] = row["GBps"] / run.data["copy_GBps"]
        line += f"  {row['GBps']:7.0f} GB/s ({row.get('frac_copy', float('nan')):.2f} of copy)"
    if flops is not None:
        row["TFLOPs"] = flops / ms / 1e9
        if run.data.get("matmul_TFLOPs"):
            row["frac_matmul"] = row["TFLOPs"] / run.data["matmul_TFLOPs"]
        line += f"  {row['TFLOPs']:7.1f} TFLOP/s ({row.get('frac_matmul', float('nan')):.2f} of mm)"
    run.data["timings"].append(row)
    print(line, flush=True)
    run.save()
    return row


def time_rows(run, tops, device, T, D, E, K, dtype, warmup, iters):
    """Routing, dispatch and combine (forward, and combine's backward) on one plan."""
    shape = {"T": T, "D": D, "E": E, "K": K}
    logits = torch.randn(T, E, device=device)
    capacity = token_choice_capacity(T, E, K, 1.25, 4)
    for name, ops in (("torch", TorchOps), ("triton", tops)):
        ms = median_ms(lambda: ops.token_choice(logits, K, capacity, "position", K >= 2),
                       device, warmup, iters)
        record(run, "routing", name, shape, ms, nbytes=2 * T * E * 4 + T * K * 8)
    plan, _, _ = TorchOps.token_choice(logits, K, capacity, "position", K >= 2)
    N = plan.row_token_N.numel()
    el = torch.finfo(dtype).bits // 8
    x = torch.randn(T, D, device=device, dtype=dtype)
    y = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(T, D, device=device, dtype=dtype)
    weight_leaf = plan.weight_TK.detach().requires_grad_(True)
    shape = {**shape, "N": N}
    for name, ops in (("torch", TorchOps), ("triton", tops)):
        with torch.no_grad():
            ms = median_ms(lambda: ops.permute(x, plan), device, warmup, iters)
            record(run, "dispatch", name, shape, ms, nbytes=(T + N) * D * el + T * K * 8)
            ms = median_ms(lambda: ops.combine(y, plan), device, warmup, iters)
            record(run, "combine", name, shape, ms, nbytes=(T + N) * D * el + T * K * 12)
        x_leaf = x.detach().requires_grad_(True)
        moved = ops.permute(x_leaf, plan)
        g_N = torch.randn_like(moved)
        ms = median_ms(lambda: torch.autograd.grad(moved, x_leaf, g_N, retain_graph=True),
                       device, warmup, iters)
        record(run, "dispatch_bwd", name, shape, ms, nbytes=(N + T) * D * el + T * K * 8)
        p = _with_weights(plan, weight_leaf)
        out = ops.combine(y, p)
        ms = median_ms(lambda: torch.autograd.grad(out, (y, weight_leaf), g, retain_graph=True),
                       device, warmup, iters)
        record(run, "combine_bwd", name, shape, ms, nbytes=(T + 2 * N) * D * el + T * K * 16)


def _with_weights(plan, weight_TK):
    """The plan with combine weights that are a leaf (so backward reaches them)."""
    from dataclasses import replace
    flat = plan.dest_TK.reshape(-1)
    kept = (flat >= 0).nonzero().squeeze(1)
    row_assign_N = torch.empty_like(plan.row_token_N)
    row_assign_N[flat[kept]] = kept
    return replace(plan, weight_TK=weight_TK,
                   row_weight_N=weight_TK.reshape(-1).index_select(0, row_assign_N))


def _fast_init(self, layer_seed=None):
    """Benchmark-only init on the parameters' own device (the library's per-expert CPU init
    of 8.6e9 weights would take minutes); values do not change the timings."""
    with torch.no_grad():
        for p in (self.w1, self.b1, self.w2, self.b2, self.w3):
            if p is not None:
                p.uniform_(-1, 1).mul_(1 / math.sqrt(p.shape[-2] if p.dim() == 3 else p.shape[-1]))


def time_layer(run, device, T, D, E, K, dtype, warmup, iters, variants):
    shape = {"T": T, "D": D, "F": 4 * D, "E": E, "K": K}
    rows = {}
    experts_timed = set()
    init = experts_mod.Experts.reset_parameters
    for kernels, cuda_path in variants:
        label = f"{kernels}+{cuda_path}"
        if run.elapsed() > run.budget_s + 45:
            run.data["errors"].append({"section": f"layer {label} {shape}",
                                       "error": "skipped: time budget spent"})
            continue
        layer = x = g = None
        try:
            experts_mod.Experts.reset_parameters = _fast_init
            with torch.device(device):
                layer = moesaic.MoE(D, 4 * D, E, top_k=K, capacity_factor=1.25,
                                    kernels=kernels).to(dtype)
            layer.experts.cuda_path = cuda_path
            x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
            g = torch.randn(T, D, device=device, dtype=dtype)

            def step():
                y, aux = layer(x)
                torch.autograd.backward([y, aux], [g, torch.ones_like(aux)])
                layer.zero_grad(set_to_none=True)
                x.grad = None

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = median_ms(step, device, warmup, iters)
            N = int(layer.last_stats.tokens_per_expert_kept.sum())
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows[label] = record(run, "layer_fwd_bwd", label, {**shape, "N": N}, ms,
                                 flops=12 * N * D * 4 * D, peak_GiB=peak, **fallbacks())
            experts_label = cuda_path + ("+epilogue" if cuda_path != "loop"
                                         and layer.experts.triton_epilogue else "")
            if experts_label not in experts_timed:
                experts_timed.add(experts_label)
                time_experts(run, layer, experts_label, shape, device, dtype, warmup, iters)
        except Exception as e:  # noqa: BLE001 -- one variant failing must not stop the others
            run.data["errors"].append({"section": f"layer {label} {shape}", "error": repr(e)[:2000],
                                       "traceback": traceback.format_exc()[-3000:]})
            print(f"[error] layer {label} {shape}: {e!r}"[:500], flush=True)
        finally:
            experts_mod.Experts.reset_parameters = init
            del layer, x, g
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fast = rows.get("triton+auto")
    for base in ("torch+loop", "torch+auto"):
        if fast and base in rows:
            s = {**shape, "baseline": base, "speedup": rows[base]["ms"] / fast["ms"]}
            run.data["speedups"].append(s)
            print(f"[speedup] triton+auto vs {base} at {shape}: {s['speedup']:.2f}x", flush=True)


def time_experts(run, layer, label, shape, device, dtype, warmup, iters):
    """The experts' grouped FFN alone, forward + backward, on the layer's last kept counts: its
    share of the layer's time splits a missed target into matmul efficiency and overhead."""
    counts_E = layer.last_stats.tokens_per_expert_kept.clone()
    N, D = int(counts_E.sum()), shape["D"]
    x_ND = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    g_ND = torch.randn(N, D, device=device, dtype=dtype)

    def step():
        y_ND = layer.experts(x_ND, counts_E)
        torch.autograd.backward(y_ND, g_ND)
        layer.zero_grad(set_to_none=True)
        x_ND.grad = None

    ms = median_ms(step, device, warmup, iters)
    record(run, "experts_fwd_bwd", label, {**shape, "N": N}, ms, flops=12 * N * D * 4 * D,
           **fallbacks())


def time_keyed(run, device, batch, warmup, iters):
    """One training step (forward + backward, bf16 autocast) of the published PR-MoE recipe's
    model with its random layers keyed by sample (``sample_keys``, as ``moesaic train`` runs:
    hashed masks, unfused attention while attention dropout is on) and with torch's generator
    (outside it): what layout-independent randomness costs on this GPU."""
    import contextlib
    import runpy

    import moesaic.models as zoo
    from moesaic import keyed, moe_set_seed
    recipe = runpy.run_path(str(Path(__file__).resolve().parents[1] / "configs"
                                / "cifar10_vit_moe_lite6_prmoe.py"))
    moe_set_seed(0)
    model = zoo.create(recipe["MODEL"], **recipe["MODEL_ARGS"]).to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(10, (batch,), device=device)
    keys = keyed.draw_sample_keys(batch, torch.Generator().manual_seed(0)).to(device)
    out = {}
    for label, ctx in (("torch_rng", contextlib.nullcontext), ("keyed", lambda:
                                                               keyed.sample_keys(keys))):
        def step():
            with ctx(), torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda"):
                logits, aux = model(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y) + aux.float()
                loss.backward()
            model.zero_grad(set_to_none=True)
        out[label] = record(run, "prmoe_step", label, {"batch": batch},
                            median_ms(step, device, warmup, iters))["ms"]
    run.data["keyed_over_torch_rng"] = out["keyed"] / out["torch_rng"]
    print(f"[time] keyed / torch_rng: {run.data['keyed_over_torch_rng']:.3f}", flush=True)


def targets(data: dict) -> dict:
    """Issue 6's three targets, read off the timings: the worst Triton dispatch / combine row
    (forward and backward) as a fraction of copy bandwidth, the worst Triton layer as a fraction
    of the matmul rate, and the Triton layer's speedups at E = 64 over both PyTorch baselines."""
    rows = [r for r in data["timings"] if r.get("kernels") == "triton"
            and r.get("op") in ("dispatch", "dispatch_bwd", "combine", "combine_bwd")]
    layers = [r for r in data["timings"] if r.get("op") == "layer_fwd_bwd"
              and r.get("kernels") == "triton+auto"]
    speed = [s for s in data["speedups"] if s.get("E") == 64]
    out = {"rows_min_frac_copy": min((r.get("frac_copy", 0.0) for r in rows), default=None),
           "layer_min_frac_matmul": min((r.get("frac_matmul", 0.0) for r in layers), default=None),
           "speedup_E64": {b: min((s["speedup"] for s in speed if s["baseline"] == b),
                                  default=None) for b in ("torch+loop", "torch+auto")}}
    fmt = (lambda v: "n/a" if v is None else f"{v:.2f}")
    out["lines"] = [
        f"dispatch/combine >= 0.70 of copy: worst {fmt(out['rows_min_frac_copy'])}",
        f"layer fwd+bwd >= 0.60 of matmul: worst {fmt(out['layer_min_frac_matmul'])}",
        *(f"triton >= 1.5x {b} at E=64: worst {fmt(v)}{'' if v is None else 'x'}"
          for b, v in out["speedup_E64"].items())]
    return out


def fallbacks() -> dict:
    """Whether this process has given up a grouped_mm form (then "auto" times bmm or a loop)
    or a Triton kernel of the expert path (then "triton" times the PyTorch epilogue or dropout,
    as "torch" does)."""
    from moesaic import grouped_cuda
    return {"grouped_mm_failed": grouped_cuda._grouped_mm_failed,
            "grouped_wgrad_failed": grouped_cuda._grouped_wgrad_failed,
            "epilogue_failed": grouped_cuda._epilogue_failed,
            "dropout_kernel_failed": grouped_cuda._dropout_kernel_failed}


def summarize(run: Run) -> None:
    """The end-of-run summary (``fallbacks``, ``targets``), each part in its own try/except:
    the SIGTERM handler runs it too, and a failure here must never stop the save."""
    parts = (("fallbacks", lambda: run.data.update(fallbacks())),
             ("targets", lambda: run.data.update(targets=targets(run.data))))
    for name, fill in parts:
        try:
            fill()
        except Exception as e:  # noqa: BLE001 -- record and go on, by design
            run.data["errors"].append({"section": f"summary {name}", "error": repr(e)[:2000]})
            print(f"[error] summary {name}: {e!r}"[:500], flush=True)
    for line in run.data.get("targets", {}).get("lines", []):
        print(f"[target] {line}", flush=True)


# Seconds past ``--budget-s`` after which the block sweep starts no new setting: gpu_session.sh
# kills gpu.py 60 s past its budget, and one setting (compile and timing) takes a few seconds.
SWEEP_GRACE_S = 45.0


def sweep_row_blocks(run, device, T, D, E, K, dtype, warmup, iters, blocks, warp_counts):
    """The row kernels at other block widths and warp counts than the library's choice, each
    checked bit-equal to the library's output: data for tuning ``_row_launch``."""
    import triton
    from moesaic.kernels import rows
    logits = torch.randn(T, E, device=device)
    plan, _, _ = TorchOps.token_choice(logits, K, token_choice_capacity(T, E, K, 1.25, 4),
                                       "position", K >= 2)
    dest, w = plan.dest_TK.contiguous(), plan.weight_TK.detach().float().contiguous()
    N = plan.row_token_N.numel()
    el = torch.finfo(dtype).bits // 8
    x = torch.randn(T, D, device=device, dtype=dtype)
    y = torch.randn(N, D, device=device, dtype=dtype)
    shape = {"T": T, "D": D, "E": E, "K": K, "N": N}
    ref = {"dispatch": rows.scatter_rows(x, dest, None, N), "combine": rows.gather_sum(y, dest, w),
           "combine_bwd": rows.combine_backward(x, y, dest, w)}
    default = {"dispatch": rows._row_launch(D), "combine": rows._row_launch(D),
               "combine_bwd": rows._row_launch(D, cap=1024)}
    nbytes = {"dispatch": (T + N) * D * el, "combine": (T + N) * D * el,
              "combine_bwd": (T + 2 * N) * D * el}
    for op in ("dispatch", "combine", "combine_bwd"):
        for BD in blocks:
            if BD > triton.next_power_of_2(D) or (op == "combine_bwd" and BD > 2048):
                continue
            for warps in warp_counts:
                if run.elapsed() > run.budget_s + SWEEP_GRACE_S:
                    run.data["errors"].append({"section": f"sweep D={D}", "error":
                                               f"stopped before {op} BD={BD} w={warps}: time "
                                               f"budget spent (+{SWEEP_GRACE_S:g} s)"})
                    print(f"[sweep] D={D}: time budget spent, stopped before {op} BD={BD}",
                          flush=True)
                    return
                out = {}

                def launch():
                    nb = triton.cdiv(D, BD)
                    if op == "dispatch":
                        out["v"] = x.new_empty(N, D)
                        rows._scatter_rows_kernel[(T, nb)](x, dest, dest, out["v"], D, K=K, BD=BD,
                                                           HAS_W=False, num_warps=warps)
                    elif op == "combine":
                        out["v"] = y.new_empty(T, D)
                        rows._gather_sum_kernel[(T, nb)](y, dest, w, out["v"], D, K=K, BD=BD,
                                                         HAS_W=True, num_warps=warps)
                    else:
                        gy, gw = torch.empty_like(y), w.new_empty(T, K)
                        rows._combine_backward_kernel[(T,)](
                            x, y, dest, w, gy, gw, D, K=K, KP=triton.next_power_of_2(max(K, 2)),
                            BD=BD, NB=nb, num_warps=warps)
                        out["v"] = (gy, gw)

                launch()
                got = out["v"] if op != "combine_bwd" else out["v"][0]
                want = ref[op] if op != "combine_bwd" else ref[op][0]
                same = bool(torch.equal(got, want))  # combine_bwd: grad_y (grad_w's sums vary)
                ms = median_ms(launch, device, warmup, iters)
                is_default = default[op][0] == BD and default[op][2] == warps
                record(run, op + "_sweep", f"BD={BD} w={warps}" + (" *" if is_default else ""),
                       shape, ms, nbytes=nbytes[op], same_as_library=same, default=is_default)


# ---------------------------------------------------------------- main

def machine(device) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "python": platform.python_version(), "torch": torch.__version__,
            "host": platform.node(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(device)),
                    gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gpu.json")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on CPU under TRITON_INTERPRET=1 (a smoke test)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new timing configuration after this many seconds")
    args = ap.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        T, Ds, Es, Ks = 12, (24,), (4,), (1, 2)
        check_T, check_D, check_E = 20, 20, 5
        warmup, iters, copy_bytes, mm_n = 0, 1, 2**20, 64
        rate_warmup, rate_iters, layer_warmup, layer_iters = 0, 1, 0, 1
        blocks, warp_counts = (16, 32), (4,)
        variants = (("torch", "loop"), ("triton", "auto"))
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --dry-run)")
        device = torch.device("cuda", torch.cuda.current_device())
        T, Ds, Es, Ks = 65536, (1024, 4096), (8, 64), (1, 2)
        check_T, check_D, check_E = 4096, 1000, 64
        warmup, iters, copy_bytes, mm_n = 3, 10, 2**31, 8192
        rate_warmup, rate_iters, layer_warmup, layer_iters = 25, 50, 2, 7
        blocks, warp_counts = (512, 1024, 2048, 4096), (4, 8, 16)
        variants = (("torch", "loop"), ("torch", "auto"), ("triton", "auto"))
    seed = random.SystemRandom().randrange(2**31)
    run = Run(Path(args.out), {**machine(device), "dry_run": args.dry_run, "seed": seed})
    run.save_on_sigterm()
    run.budget_s = args.budget_s
    print(json.dumps({k: v for k, v in run.data.items() if not isinstance(v, list)}), flush=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    tops = run.section("import kernels", lambda: __import__("moesaic.kernels",
                                                            fromlist=["TritonOps"]).TritonOps)
    if tops is None:
        return
    # 1. correctness on this device
    run.section("check routing", check_routing, run, tops, device, gen, check_T, check_E)
    run.section("check routing E=8", check_routing, run, tops, device, gen, check_T, 8)
    for dtype in (torch.float32, torch.bfloat16):
        run.section(f"check rows {dtype}", check_rows, run, tops, device, gen, check_T,
                    check_E, check_D, dtype)
        for K, policy in ((1, "position"), (2, "score")):
            run.section(f"check layer {dtype} K={K}", check_layer, run, device, gen,
                        check_T // 4 if not args.dry_run else check_T, 64 if not args.dry_run
                        else 16, 8, K, dtype, policy)
        run.section(f"check experts {dtype}", check_expert_paths, run, device, gen,
                    256 if not args.dry_run else 16, 512 if not args.dry_run else 24, dtype)
        run.section(f"check hidden dropout {dtype}", check_hidden_dropout, run, device, gen,
                    3000 if not args.dry_run else 30, 1000 if not args.dry_run else 40, dtype)
    run.section("check keyed randomness", check_keyed, run, device, gen,
                64 if not args.dry_run else 4)
    # 2. machine rates
    run.section("copy bandwidth", copy_bandwidth, run, device, copy_bytes, rate_warmup, rate_iters)
    run.section("matmul rate", matmul_rate, run, device, mm_n, rate_warmup, rate_iters)
    # 3. timings
    dtype = torch.bfloat16
    # most experts and widest first: the E=64 speedup target is the one a short run must reach
    for D, E, K in sorted(itertools.product(Ds, Es, Ks), key=lambda c: (-c[1], -c[0], c[2])):
        if run.elapsed() > args.budget_s:
            run.data["errors"].append({"section": f"timings D={D} E={E} K={K}",
                                       "error": "skipped: time budget spent"})
            continue
        run.section(f"rows D={D} E={E} K={K}", time_rows, run, tops, device, T, D, E, K,
                    dtype, warmup, iters)
        run.section(f"layer D={D} E={E} K={K}", time_layer, run, device, T, D, E, K,
                    dtype, layer_warmup, layer_iters, variants)
    # 4. block sizes of the row kernels (data for tuning; the library's choice is marked *)
    for D in Ds:
        if run.elapsed() > args.budget_s:
            run.data["errors"].append({"section": f"sweep D={D}",
                                       "error": "skipped: time budget spent"})
            continue
        run.section(f"sweep D={D}", sweep_row_blocks, run, device, T, D, Es[-1], Ks[-1], dtype,
                    warmup, iters, blocks, warp_counts)
    if run.elapsed() > args.budget_s:
        run.data["errors"].append({"section": "keyed", "error": "skipped: time budget spent"})
    else:
        run.section("keyed randomness", time_keyed, run, device, 512 if not args.dry_run else 4,
                    layer_warmup, layer_iters)
    summarize(run)
    run.save()
    failed = [c["name"] for c in run.data["checks"] if not c["ok"]]
    print(f"done in {run.elapsed():.0f} s: {len(run.data['checks'])} checks, {len(failed)} failed,"
          f" {len(run.data['errors'])} errors; wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()

"""Times forward+backward of peer MoE layers against moesaic.MoE on the shapes of
benchmarks/layer.py, each peer at its closest setting to moesaic's.

    bash benchmarks/peers/setup.sh
    flock /tmp/moesaic-bench.lock benchmarks/peers/.venv/bin/python benchmarks/peers/run.py

The driver (no arguments) runs one worker process per peer, one after the other, and prints one
table. A worker (``--peer NAME``) builds the peer's layer and a moesaic.MoE at the matching
setting, and times them interleaved (peer, moesaic, peer, moesaic, ...) so that load from other
processes on a shared machine hits both alike; it prints one JSON line per setting. A peer that
fails to import or run gets a row with its error; the others go on.

Shapes: T = B x S = 8 x 1024 tokens, D = 512, F = 2048, E = 8, float32, 2 threads.
Legend: B batch, S sequence, T tokens, D model dim, F ffn dim, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

B, S, D, F, E = 8, 1024, 512, 2048, 8
T = B * S
THREADS = 2
HERE = os.path.dirname(os.path.abspath(__file__))
SIDE_TRANSFORMERS = os.path.join(HERE, ".venv", "side-transformers-4.51.3")
PEERS = ("deepspeed", "fairscale", "mixtral", "switch", "colossalai")
SKIPPED = {
    "tutel": "not on PyPI",
    "megablocks": "CUDA only",
    "scattermoe": "CUDA only",
    "fastmoe": "CUDA only",
}


# ----------------------------------------------------------------------------- worker helpers

def _torch():
    import torch
    torch.set_num_threads(THREADS)
    return torch


def _inputs(torch):
    g = torch.Generator().manual_seed(0)
    x_BSD = torch.randn(B, S, D, generator=g)
    dy_BSD = torch.randn(B, S, D, generator=g)
    return x_BSD, dy_BSD


def _make_step(torch, module, forward, x_BSD, dy_BSD):
    """One training step's compute: forward, then backward of <y, dy> (+ the aux losses)."""
    params = [p for p in module.parameters() if p.requires_grad]
    x = x_BSD.clone().requires_grad_(True)

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        y, aux = forward(x)
        loss = (y * dy_BSD).sum()
        for a in aux:
            loss = loss + a
        loss.backward()
    return step


def _moesaic_step(torch, x_BSD, dy_BSD, **kw):
    import moesaic
    torch.manual_seed(1)
    layer = moesaic.MoE(D, F, E, **kw).train()
    return _make_step(torch, layer, lambda x: (lambda y, a: (y, [a]))(*layer(x)), x_BSD, dy_BSD)


def _time_pair(step_a, step_b, warmup: int, reps: int, budget_s: float):
    """Interleaved timing; medians in ms. Stops early (>= 3 reps) past ``budget_s``."""
    for _ in range(warmup):
        step_a()
        step_b()
    ta, tb = [], []
    start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        step_a()
        t1 = time.perf_counter()
        step_b()
        t2 = time.perf_counter()
        ta.append((t1 - t0) * 1e3)
        tb.append((t2 - t1) * 1e3)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(ta), statistics.median(tb), len(ta)


def _emit(row: dict) -> None:
    print("ROW " + json.dumps(row), flush=True)


def _run_cases(peer: str, cases, warmup: int, reps: int, budget_s: float) -> None:
    """cases: (setting, build_peer_step() -> step, moesaic kwargs, notes)."""
    torch = _torch()
    x_BSD, dy_BSD = _inputs(torch)
    for setting, build, moe_kw, notes in cases:
        row = {"peer": peer, "setting": setting, "notes": notes,
               "moesaic_setting": ", ".join(f"{k}={v}" for k, v in moe_kw.items())}
        try:
            peer_step = build(torch, x_BSD, dy_BSD)
            moe_step = _moesaic_step(torch, x_BSD, dy_BSD, **moe_kw)
            row["peer_ms"], row["moesaic_ms"], row["reps"] = _time_pair(
                peer_step, moe_step, warmup, reps, budget_s)
        except Exception as exc:  # one failing setting must not stop the others
            row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            traceback.print_exc(file=sys.stderr)
        _emit(row)
        peer_step = moe_step = None


def _init_one_process_group(torch, backend_init=None):
    import socket
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if backend_init is not None:
        backend_init()
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def _ffn(torch, activation="gelu", bias=True):
    nn = torch.nn
    act = nn.GELU() if activation == "gelu" else nn.ReLU()
    return nn.Sequential(nn.Linear(D, F, bias=bias), act, nn.Linear(F, D, bias=bias))


# ----------------------------------------------------------------------------- peers

def cases_deepspeed():
    def build(k, drop):
        def make(torch, x_BSD, dy_BSD):
            import deepspeed
            from deepspeed.moe.layer import MoE as DSMoE
            _init_one_process_group(torch, lambda: deepspeed.init_distributed("gloo"))
            torch.manual_seed(1)
            kw = dict(hidden_size=D, expert=_ffn(torch), num_experts=E, ep_size=1, k=k,
                      capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4,
                      use_residual=False, noisy_gate_policy=None, drop_tokens=drop, use_rts=False)
            try:
                layer = DSMoE(**kw, top2_2nd_expert_sampling=False)
            except TypeError:
                layer = DSMoE(**kw)
            layer.train()

            def fwd(x):
                y, l_aux, _ = layer(x)
                return y, [l_aux]
            return _make_step(torch, layer, fwd, x_BSD, dy_BSD)
        return make

    common = ("index dispatch into a padded [E,C,D] buffer, experts run on all C slots; "
              "use_rts=False, no noisy gate, top2_2nd_expert_sampling=False")
    out = []
    for k in (1, 2):
        for drop in (True, False):
            cap = "cf 1.25" if drop else "dropless"
            note = common + ("; dropless: C = largest expert count" if not drop else
                             "; C = ceil(cf*K*T/E); top-1 keeps by topk over a 0/1 mask "
                             "(tie order, not strictly position)" if k == 1 else
                             "; C = ceil(cf*K*T/E), choice-major, position order")
            out.append((f"k={k}, {cap}", build(k, drop),
                        dict(top_k=k, capacity_factor=1.25, drop_tokens=drop), note))
    return out


def cases_fairscale():
    def make(torch, x_BSD, dy_BSD):
        from fairscale.nn import MOELayer, Top2Gate
        import torch.distributed as dist
        _init_one_process_group(torch)
        torch.manual_seed(1)
        experts = torch.nn.ModuleList([_ffn(torch) for _ in range(E)])
        layer = torch.nn.Module()
        layer.moe = MOELayer(Top2Gate(D, E), experts, group=dist.group.WORLD)
        layer.train()

        def fwd(x):
            y = layer.moe(x)
            return y, [layer.moe.l_aux]
        return _make_step(torch, layer, fwd, x_BSD, dy_BSD)

    note = ("top-2 only; C fixed at 2T/E (= cf 1.0); second expert picked with Gumbel noise "
            "(always on in training); dense one-hot [T,E,C] einsum dispatch/combine")
    return [("k=2, cf 1.0 (C=2T/E)", make, dict(top_k=2, capacity_factor=1.0), note)]


def _mixtral_block(torch, k, implementation="eager"):
    from transformers import MixtralConfig
    from transformers.models.mixtral import modeling_mixtral as mm
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=k, router_jitter_noise=0.0)
    cfg._experts_implementation = implementation
    torch.manual_seed(1)
    block = mm.MixtralSparseMoeBlock(cfg).float().train()
    with torch.no_grad():  # parameters come uninitialised outside a PreTrainedModel
        for p in block.parameters():
            p.normal_(0.0, cfg.initializer_range)
    return block


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def cases_mixtral():
    def build(k, implementation):
        def make(torch, x_BSD, dy_BSD):
            block = _mixtral_block(torch, k, implementation)
            return _make_step(torch, block, lambda x: (_first(block(x)), []), x_BSD, dy_BSD)
        return make

    note = ("SwiGLU experts, no bias, dropless, top-k renormalised; aux loss is computed "
            "outside the block (not timed)")
    out = []
    for k in (1, 2):
        kw = dict(top_k=k, drop_tokens=False, activation="swiglu", normalize_weights=True)
        for impl in ("eager", "grouped_mm"):
            out.append((f"k={k}, dropless, {impl}", build(k, impl), kw,
                        note + f"; experts_implementation={impl}"))
    return out


def cases_switch():
    def build(capacity):
        def make(torch, x_BSD, dy_BSD):
            from transformers import SwitchTransformersConfig
            from transformers.models.switch_transformers import modeling_switch_transformers as ms
            cfg = SwitchTransformersConfig(d_model=D, d_ff=F, num_experts=E,
                                           expert_capacity=capacity, dropout_rate=0.0,
                                           router_jitter_noise=0.0, dense_act_fn="gelu",
                                           router_dtype="float32")
            torch.manual_seed(1)
            mlp = ms.SwitchTransformersSparseMLP(cfg).float().train()
            return _make_step(torch, mlp, lambda x: (_first(mlp(x)), []), x_BSD, dy_BSD)
        return make

    cap = -(-5 * S // (4 * E))  # ceil(1.25 * S / E) per sequence
    note = ("top-1, raw probability; capacity counted per sequence of {s}; no expert bias; "
            "aux loss computed outside the block (not timed)")
    return [
        (f"k=1, cf 1.25 (C={cap}/seq)", build(cap),
         dict(top_k=1, capacity_factor=1.25, bias=False), note.format(s=S)),
        (f"k=1, dropless (C={S}/seq)", build(S),
         dict(top_k=1, drop_tokens=False, bias=False), note.format(s=S) + "; C = S never drops"),
    ]


def cases_colossalai():
    def build(k):
        def make(torch, x_BSD, dy_BSD):
            _init_one_process_group(torch)
            from colossalai.shardformer.modeling.mixtral import EPMixtralSparseMoeBlock
            from colossalai.cluster import ProcessGroupMesh
            block = _mixtral_block(torch, k)
            mesh = ProcessGroupMesh(1, 1, 1)
            group = mesh.get_group_along_axis(0)
            ep = EPMixtralSparseMoeBlock.from_native_module(
                block, ep_group=group, tp_group=group, moe_dp_group=group)
            ep = ep.float().train()
            return _make_step(torch, ep, lambda x: (_first(ep(x)), []), x_BSD, dy_BSD)
        return make

    note = ("EP Mixtral block (transformers 4.51.3) on a 1-rank gloo group; SwiGLU, dropless, "
            "renormalised top-k; aux loss outside the block")
    out = []
    for k in (1, 2):
        kw = dict(top_k=k, drop_tokens=False, activation="swiglu", normalize_weights=True)
        out.append((f"k={k}, dropless", build(k), kw, note))
    return out


CASES = {"deepspeed": cases_deepspeed, "fairscale": cases_fairscale, "mixtral": cases_mixtral,
         "switch": cases_switch, "colossalai": cases_colossalai}


# ----------------------------------------------------------------------------- driver

def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import importlib.metadata as md
    vers = []
    for name in ("torch", "deepspeed", "fairscale", "transformers", "colossalai"):
        try:
            vers.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            vers.append(f"{name} not installed")
    return (f"machine: {cpu}, {os.cpu_count()} CPUs, torch threads {THREADS}, "
            f"Python {platform.python_version()}\nversions: " + ", ".join(vers))


def _worker_env(peer: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    if peer == "colossalai":
        env["PYTHONPATH"] = os.pathsep.join(
            [SIDE_TRANSFORMERS] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _run_worker(peer: str, args) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--peer", peer, "--warmup",
           str(args.warmup), "--reps", str(args.reps), "--budget", str(args.budget)]
    cmd += ["--smoke"] if args.smoke else []
    try:
        proc = subprocess.run(cmd, env=_worker_env(peer), capture_output=True, text=True,
                              timeout=args.peer_timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {args.peer_timeout} s", -1
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    if args.verbose and err:
        sys.stderr.write(f"--- {peer} stderr\n{err}\n")
    if rc != 0 or not rows:
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or [f"exit {rc}"]
        rows.append({"peer": peer, "setting": "-", "error": tail[0][:160], "notes": ""})
    return rows


def _table(rows: list[dict]) -> str:
    head = ["peer", "setting", "peer ms", "moesaic ms", "peer/moesaic", "reps", "moesaic setting",
            "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            cells = [r["peer"], r["setting"], "error", "", "", "", r.get("moesaic_setting", ""),
                     r["error"]]
        else:
            cells = [r["peer"], r["setting"], f"{r['peer_ms']:.0f}", f"{r['moesaic_ms']:.0f}",
                     f"{r['peer_ms'] / r['moesaic_ms']:.2f}x", str(r["reps"]),
                     r["moesaic_setting"], r["notes"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", choices=PEERS, help="run one peer's worker (internal)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per setting (>= 3 reps)")
    ap.add_argument("--peer-timeout", type=float, default=1800.0)
    ap.add_argument("--verbose", action="store_true", help="show workers' stderr")
    ap.add_argument("--smoke", action="store_true", help="tiny sequences (S = 64): checks only")
    args = ap.parse_args()
    if args.smoke:
        global S, T
        S = 64
        T = B * S
    if args.peer:
        _run_cases(args.peer, CASES[args.peer](), args.warmup, args.reps, args.budget)
        return

    import torch
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(_machine())
    print(f"shapes: T = {B} x {S} = {T} tokens, D = {D}, F = {F}, E = {E}, float32, "
          f"fwd+bwd (y.dy + aux losses), median of up to {args.reps} interleaved reps "
          f"after {args.warmup} warm-ups; torch {torch.__version__}")
    print("moesaic: experts GELU with bias unless stated; same input, same process, timed "
          "alternately with the peer. peer/moesaic > 1 means moesaic is faster.")
    print("not run: " + ", ".join(f"{k} ({v})" for k, v in SKIPPED.items()))
    rows = []
    for peer in args.peers.split(","):
        t0 = time.perf_counter()
        new = _run_worker(peer, args)
        rows += new
        print(f"[{peer}: {len(new)} rows in {time.perf_counter() - t0:.0f} s]", flush=True)
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()

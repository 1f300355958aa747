"""The examples run (a few steps each)."""
import importlib.util
import math
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_char_lm_trains_a_few_steps():
    out = _load("char_lm").main(["--steps", "3", "--batch", "4", "--seq-len", "16"])
    assert math.isfinite(out["train_loss"]) and math.isfinite(out["val_loss"])
    assert len(out["expert_load"]) == 2 and all(abs(sum(l) - 1) < 1e-5 for l in out["expert_load"])
    ds = _load("char_lm").main(["--steps", "3", "--batch", "4", "--seq-len", "16", "--experts",
                                "8", "--routing", "deepseek"])
    assert math.isfinite(ds["val_loss"]) and len(ds["expert_load"][0]) == 8


@pytest.mark.parametrize("args, message", [
    (["--heads", "5"], r"--d-model \(64\) is not divisible by --heads \(5\)"),
    (["--steps", "0"], r"--steps must be at least 1, got 0"),
    (["--seq-len", "-3"], r"--seq-len must be at least 1, got -3"),
    (["--depth", "0"], r"--depth must be at least 1, got 0"),
    (["--val-batches", "0"], r"--val-batches must be at least 1, got 0"),
    (["--top-k", "5"], r"--top-k \(5\) is not in \[1, --experts \(4\)\]"),
    (["--routing", "deepseek", "--experts", "1"],
     r"--top-k \(2, the deepseek routing's default\) is not in \[1, --experts \(1\)\]"),
    (["--routing", "deepseek", "--experts", "5"],
     r"--routing deepseek with --experts 5 and --top-k 2: num_experts \(5\) is not divisible"),
    (["--capacity-factor", "0"], r"--capacity-factor must be a finite number > 0"),
    (["--lr", "-1"], r"--lr must be a finite number >= 0, got -1.0"),
    (["--threads", "0"], r"--threads must be at least 1, got 0"),
    (["--seq-len", "100000"], r"--seq-len \(100000\) is longer than the validation text"),
])
def test_char_lm_refuses_bad_arguments_before_training(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        _load("char_lm").main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and re.search(r"error: " + message, err)


def test_char_lm_recipes_are_causal():
    """Both recipes' routings (causal capacity drops at top-1 and top-2; dropless) leave the
    outputs at a position independent of every sequence's later positions, as the example's
    docstring says; position priority (sequence after sequence, choice-major) does not."""
    import torch
    char_lm = _load("char_lm")
    gen = torch.Generator().manual_seed(0)

    def future_changes(routing, top_k, trials):
        torch.manual_seed(0)
        model = char_lm.CharLM(12, 16, 16, 2, 2, 4, top_k, routing).train()
        worst = 0.0
        for _ in range(trials):
            idx = torch.randint(0, 12, (4, 16), generator=gen)
            later = idx.clone()  # every sequence's second half changed
            later[:, 8:] = torch.randint(0, 12, (4, 8), generator=gen)
            outs = []
            for x in (idx, later):
                torch.manual_seed(1)  # the same jitter draws
                outs.append(model(x)[0][:, :8])
            worst = max(worst, (outs[0] - outs[1]).abs().max().item())
        return worst

    assert future_changes("switch", 1, 10) < 1e-5
    assert future_changes("switch", 2, 10) < 1e-5
    assert future_changes("deepseek", 2, 10) < 1e-5
    char_lm.ROUTING["position"] = lambda n: dict(capacity_factor=1.25, noise_policy="jitter")
    assert future_changes("position", 2, 10) > 1e-3
    assert future_changes("position", 1, 10) > 1e-3


def test_upcycle_any_model_example():
    """The plain-PyTorch ViT is moeified after dense training: the upcycled model's accuracy is
    the dense model's, then it trains on with its aux losses."""
    out = _load("upcycle_any_model").main(["--dense-steps", "6", "--moe-steps", "3"])
    assert out["upcycled_accuracy"] == out["dense_accuracy"]
    assert 0 <= out["moe_accuracy"] <= 1 and len(out["expert_load"]) == 4
    assert all(abs(sum(load) - 1) < 1e-5 for load in out["expert_load"])


def test_expert_parallel_example_under_torchrun(tmp_path):
    """The runnable expert-parallel example, 2 processes on gloo: experts split, the loss falls,
    rank 0 writes the full (global-expert) state dict, and the losses are one process's (keyed
    noise and dropout, global balance loss)."""
    import subprocess
    import sys

    import torch
    from _dist_harness import free_port

    out = tmp_path / "full.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", os.path.join(ROOT, "examples", "expert_parallel.py"),
         "--steps", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es), experts per rank 2 of 4" in proc.stdout, proc.stdout
    line = [ln for ln in proc.stdout.splitlines() if "loss" in ln and "->" in ln][0]
    first, last = (float(v) for v in line.split("; loss ")[1].split(";")[0].split(" -> "))
    assert last < 0.8 * first, line
    one = _load("expert_parallel").main(["--steps", "20", "--out", str(tmp_path / "one.pt")])
    assert abs(one - last) < 1e-5 * last, (one, last)
    state = torch.load(out)
    assert state["moes.0.experts.w1"].shape[0] == 4
    sent = []
    for flags in ([], ["--topk-groups", "1", "--dedup"]):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             f"--master_port={free_port()}", os.path.join(ROOT, "examples", "expert_parallel.py"),
             "--steps", "3", "--out", str(out), *flags],
            capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        sent.append(int(re.search(r"bytes_sent=([\d,]+)", proc.stdout)[1].replace(",", "")))
    assert sent[1] < 0.6 * sent[0], sent  # each token to one rank, once
    limited = float(re.search(r"-> ([\d.]+);", proc.stdout)[1])  # the group limit: as one process
    one = _load("expert_parallel").main(["--steps", "3", "--topk-groups", "1", "--out",
                                         str(tmp_path / "one.pt")])
    assert abs(one - limited) < 1e-5 * limited, (one, limited)
    with pytest.raises(SystemExit):
        _load("expert_parallel").main(["--experts", "3", "--topk-groups", "1"])


def test_drop_policy_benchmark_runs_and_compares_with_position():
    """benchmarks/drop_policy.py end to end on a few steps: one row per capacity and policy."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "drop_policy.py"),
                           "--steps", "2", "--val-batches", "1", "--seeds", "0",
                           "--capacity-factors", "0.5"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("     0.5")]
    assert [r[1] for r in rows] == ["position", "score", "causal"]
    assert rows[0][5] == "+0.000" and float(rows[2][3].rstrip("%")) > 0  # drops happened
    assert "commit" in proc.stdout and "validation over 1 batches" in proc.stdout


def test_routing_benchmark_runs_and_prints_ratios():
    """benchmarks/routing.py on tiny sizes: a row per (E, K) with every policy's ratio."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "routing.py"),
                           "--tokens", "256", "--d-model", "16", "--experts", "4",
                           "--top-k", "1", "2", "--seq-len", "32", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("  4 ")]
    assert [r[1] for r in rows] == ["1", "2"]
    assert all(len([w for w in r if w.endswith("x)")]) == 4 for r in rows)
    assert "commit" in proc.stdout and "T=256" in proc.stdout


def test_char_lm_drop_policy_and_capacity_options():
    out = _load("char_lm").main(["--steps", "2", "--batch", "4", "--seq-len", "16", "--top-k",
                                 "2", "--drop-policy", "position", "--capacity-factor", "0.5",
                                 "--val-batches", "2"])
    assert out["train_dropped_fraction"] > 0.2 and math.isfinite(out["val_loss"])

"""`moesaic compare`: runs side by side from their run dirs, written here by hand (no training)."""
import json
import os

import pytest

from moesaic.__main__ import main
from moesaic.train.compare import (MAX_DEPTH, CompareError, Default, config_differences,
                                   load_run, model_default, plot, report)


def write_run(path, accs, config=None, summary=True, shares=(0.5, 0.5)):
    os.makedirs(path)
    cfg = {"name": "x", "model": "vit_moe_tiny", "lr": 1e-3, "model_args": {},
           "epochs": len(accs), **(config or {})}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for i, a in enumerate(accs, 1):
            f.write(json.dumps({"epoch": i, "eval_accuracy": a, "train_loss": 2.0 / i,
                                "train_images": 100, "train_time_s": 0.5,
                                "dropped_fraction": 0.01,
                                "moe": [{"name": "blocks.1.ffn", "token_share": list(shares),
                                         "dropped_fraction": 0.01}]}) + "\n")
    if summary:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"best_eval_accuracy": max(accs), "final_eval_accuracy": accs[-1],
                       "epochs": len(accs), "train_images_per_second": 180.0,
                       "params_total": 1000, "params_active_per_token": 400,
                       **(summary if isinstance(summary, dict) else {})}, f)
    return str(path)


def test_table_differences_and_plot(tmp_path):
    a = write_run(tmp_path / "runs" / "exp" / "20261201-010000", [0.5, 0.9, 0.8])
    b = write_run(tmp_path / "runs" / "exp" / "20261201-020000", [0.6, 0.7],
                  config={"lr": 2e-3, "model_args": {"top_k": 2}, "epochs": 3}, summary=False,
                  shares=(0.75, 0.25))
    os.makedirs(tmp_path / "runs" / "exp" / "20261201-030000" / "checkpoints")  # just started
    out, runs = report([str(tmp_path / "runs" / "exp")])  # the folder: its runs
    plot(str(tmp_path / "c.png"), runs)
    plot(str(tmp_path / "c.pdf"), runs)  # the format the name asks for
    with open(tmp_path / "c.png", "rb") as f, open(tmp_path / "c.pdf", "rb") as g:
        assert f.read(4) == b"\x89PNG" and g.read(4) == b"%PDF"
    lines = out.splitlines()
    assert "best (epoch)" in lines[0]
    assert "90.00% (2)" in lines[2] and "80.00%" in lines[2] and "180" in lines[2]
    assert "1,000 (400)" in lines[2] and "1.000" in lines[2]
    assert "2 of 3 (running or stopped)" in lines[3] and "70.00% (2)" in lines[3]
    assert "200" in lines[3]
    assert "030000 (no finished epoch yet)" in out and out.count("20261201-030000") == 1
    assert "1.500" in lines[3]  # busiest expert 0.75 of a mean 0.5
    assert "lr" in out and "0.001 | 0.002" in out and "model_args.top_k  1 (default) | 2" in out
    assert report([str(tmp_path / "runs")])[0].count("20261201-0") == 3  # the runs root too
    assert os.path.getsize(tmp_path / "c.png") > 1000
    assert config_differences([load_run(a), load_run(a)]) == {}
    assert "the configs are the same" in report([a, a])[0] and "start" not in report([a])[0]
    c = write_run(tmp_path / "c", [0.5], summary={"initial_eval_accuracy": 0.25})
    lines = report([a, c])[0].splitlines()
    assert "start" in lines[0] and "25.00%" in lines[3] and "  -  " in lines[2]
    assert "procs" not in report([a, c])[0]  # one process on the CPU, or not recorded
    two = write_run(tmp_path / "two", [0.5], summary={"world_size": 2, "device": "cpu"})
    lines = report([a, two])[0].splitlines()
    assert "img/s  procs x device" in lines[0] and "2 x cpu" in lines[3]
    ep = write_run(tmp_path / "ep", [0.5], summary={"world_size": 2, "device": "cpu",
                                                    "ep_size": [2]})
    assert "2 x cpu, ep 2" in report([a, ep])[0].splitlines()[3]
    assert lines[2].split()[7:9] == ["180", "-"]  # a summary that predates the column
    old = write_run(tmp_path / "old", [0.5], config={"epochs": 3})
    with open(os.path.join(old, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(old, "config.json"), "w") as f:  # written before a key existed
        json.dump({k: v for k, v in cfg.items() if k != "upcycle"}, f)
    assert "upcycle" not in report([a, old])[0]


def test_a_run_stopped_mid_epoch_counts_its_completed_epochs(tmp_path):
    run = write_run(tmp_path / "r", [0.5, 0.6], config={"epochs": 2})
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    recs[-1]["partial_steps"] = 5
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    assert "1 of 2 (running or stopped)" in report([run])[0]


def test_bad_run_dirs_are_clear_errors(tmp_path, capsys):
    good = write_run(tmp_path / "good", [0.5])
    os.makedirs(tmp_path / "good" / "checkpoints")
    os.makedirs(tmp_path / "empty")
    open(tmp_path / "empty" / "metrics.jsonl", "w").close()
    broken = write_run(tmp_path / "broken", [0.5])
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write("{not json")
    with open(tmp_path / "good" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2}\n')
    with pytest.raises(CompareError, match="line 2 lacks epoch, eval_accuracy or train_loss"):
        report([good])
    good = write_run(tmp_path / "good2", [0.5])
    for path, msg in ((tmp_path / "none", "no run dir at"),
                      (tmp_path / "good" / "checkpoints", "has no metrics.jsonl"),
                      (tmp_path / "empty", "is empty: the run has not finished an epoch"),
                      (broken, "cannot read")):
        with pytest.raises(CompareError, match=msg):
            report([good, str(path)])
    assert main(["compare", str(tmp_path / "none")]) == 2
    assert "error: no run dir at" in capsys.readouterr().err
    assert main(["compare", good]) == 0
    assert "50.00% (1)" in capsys.readouterr().out
    assert main(["compare", good, "--plot", str(tmp_path / "no" / "dir" / "c.png")]) == 2
    captured = capsys.readouterr()
    assert "50.00% (1)" in captured.out and "cannot write the plot" in captured.err
    assert "c.png: No such file or directory" in captured.err and ".tmp" not in captured.err
    assert main(["compare", good, "--plot", str(tmp_path / "c.xyz")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the plot" in err and "xyz" in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("c.xyz")]


def test_a_model_args_entry_a_run_did_not_set_shows_the_models_value(tmp_path):
    dense = write_run(tmp_path / "dense", [0.5], config={"model_args": {"num_experts": 0}})
    moe = write_run(tmp_path / "moe", [0.6])  # vit_moe_tiny as registered: 4 experts, top-1
    shared = write_run(tmp_path / "shared", [0.6], config={"model_args": {"num_shared_experts": 1,
                                                                        "top_k": 1}})
    lines = report([dense, moe, shared])[0].splitlines()
    assert "  model_args.num_experts         0 | 4 (default) | 4 (default)" in lines
    assert "  model_args.num_shared_experts  (default) | 0 (default) | 1" in lines  # dense: no MoE
    assert not [x for x in lines if "top_k" in x]  # set to what the other runs used anyway
    assert model_default("vit_moe_lite6_prmoe", {}, "num_experts") == Default([4, 4, 8], True)
    assert model_default("widenet_cifar", {}, "normalize_weights") == Default(False, True)
    assert model_default("vit_moe_tiny", {"kernels": "no such"}, "top_k") == Default(1, True)
    mine = write_run(tmp_path / "mine", [0.5], config={"model": "not_registered_here"})
    other = write_run(tmp_path / "other", [0.5], config={"model": "not_registered_here",
                                                        "model_args": {"depth": 2}})
    assert "model_args.depth  (default) | 2" in report([mine, other])[0]
    assert config_differences([load_run(mine), load_run(mine)]) == {}


def test_a_folder_stands_for_its_runs_at_any_depth_and_says_what_it_skips(tmp_path):
    near = write_run(tmp_path / "runs" / "int1", [0.5])
    deep = write_run(tmp_path / "runs" / "digits_vit_moe" / "20261202-151039", [0.6])
    os.makedirs(tmp_path / "runs" / "int1" / "checkpoints" / "epoch_0001")
    write_run(tmp_path / "runs" / "int1" / "inner", [0.7])  # inside a run dir: not a run of its own
    write_run(tmp_path / ".hidden" / "r", [0.7])  # .git, .venv, ...: not searched
    os.makedirs(tmp_path / "notes" / "empty")
    os.symlink(tmp_path / "runs", tmp_path / "runs_link")  # the same runs twice: counted once
    out = report([str(tmp_path)])[0]
    assert near in out and deep in out and "inner" not in out and "hidden" not in out
    assert "runs_link" not in out and "skipped" not in out
    assert out.index("digits_vit_moe") < out.index("int1")  # name order
    far = tmp_path.joinpath(*"abcdef")
    farther = write_run(far / "run", [0.8])  # MAX_DEPTH + 1 folders down: noted, not compared
    write_run(far / "g" / "run", [0.9])  # further down still: not looked at
    os.makedirs(tmp_path / "runs" / "started" / "checkpoints")
    out = report([str(tmp_path)])[0]
    assert MAX_DEPTH == 6 and "80.00%" not in out and "90.00%" not in out
    skipped = [x for x in out.splitlines() if x.startswith("skipped")]
    assert skipped == [f"skipped: {tmp_path / 'runs' / 'started'} (no finished epoch yet); "
                       f"{farther} (more than 6 folders below the path given: name a folder "
                       "nearer them)"]
    assert "80.00%" in report([str(tmp_path / "a")])[0]  # a nearer folder finds it
    write_run(tmp_path.joinpath("only", *"abcdef", "run"), [0.5])
    with pytest.raises(CompareError, match=r"has finished an epoch yet; skipped: .* \(more than 6"):
        report([str(tmp_path / "only")])


def test_default_lookup_leaves_the_generators_alone():
    """Looking a default up builds the model on the meta device without moving torch's or
    Python's generator or the MoE layer counter: a model built next gets the same weights."""
    import random

    import torch

    import moesaic
    from moesaic.train.compare import model_default

    def built():
        return moesaic.models.create("vit_moe_tiny", num_classes=10).state_dict()

    moesaic.moe_set_seed(5)
    want, r = built(), random.random()
    moesaic.moe_set_seed(5)
    assert model_default("vit_moe_tiny", {"depth": 3}, "num_experts").value == 4
    got = built()
    assert random.random() == r and all(torch.equal(got[k], want[k]) for k in want)

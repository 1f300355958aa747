"""The examples run (a few steps each)."""
import importlib.util
import math
import os

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

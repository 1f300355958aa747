"""Command line: ``moesaic train ...`` and ``moesaic models`` (also ``python -m moesaic``).

Under torchrun every rank runs this same command: ``torchrun --nproc_per_node=2 -m moesaic
train --config configs/NAME.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import signal
import sys
import textwrap
import threading
import warnings
from dataclasses import fields
from typing import Optional

# config warnings about the learning-rate schedule, which `eval` leaves unsaid
SCHEDULE_WARNINGS = r"(min_lr|warmup_epochs) \(\S+\) (has no effect|exceeds epochs)"

EXAMPLES = """\
examples:
  moesaic train                                   # embedded default: ViT-MoE on 8x8 digits
  moesaic train --config configs/cifar10_vit_moe_lite6_prmoe.py
  moesaic train --config configs/cifar10_vit_lite6.py --set epochs=50 --set lr=1e-3
  moesaic train --set model_args.num_experts=8 --set name=digits_e8
  moesaic train --resume runs/digits_vit_moe/20261130-120000 --set epochs=60
  torchrun --nproc_per_node=2 -m moesaic train --config configs/cifar10_widenet.py
  torchrun --nproc_per_node=2 --max-restarts=3 -m moesaic train --config ...   # auto-resume
  moesaic eval runs/digits_vit_moe/20261130-120000 --best   # test accuracy of the best epoch
  moesaic train --set model_args.num_experts=0 --set name=digits_dense   # a dense twin, then:
  moesaic train --set init_from=runs/digits_dense/20261201-120000 --set upcycle=True \\
                --set eval_at_start=True                    # MoE upcycled from it (sparse upcycling)
  moesaic compare runs --plot cmp.png                       # every run side by side
"""


def _config_keys_help() -> str:
    from .train.config import TrainConfig, field_help

    docs = field_help()
    default = TrainConfig()
    lines = ["config keys, with the value a config file gets when it leaves the key out (the",
             "embedded default run sets some of them: see configs/digits_vit_moe.py). UPPER_CASE",
             "in a config file, lower_case with --set; --set model_args.KEY=VALUE sets one",
             "keyword of the model:"]
    for f in fields(TrainConfig):
        val = getattr(default, f.name)
        lines.append(f"  {f.name} = {val!r}")
        lines += textwrap.wrap(docs.get(f.name, ""), 76, initial_indent="      ",
                               subsequent_indent="      ")
    return "\n".join(lines)


def _key_value(text: str) -> str:
    """A --set argument: KEY=VALUE in one word (``--set epochs 5`` is a common slip)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE in one word, got {text!r} "
                                         f"(write --set {text}=VALUE)")
    return text


def _add_set(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        dest="overrides", type=_key_value, help=help)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moesaic", description="Mixture-of-Experts training and "
                                "tools. Run `moesaic COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser(
        "train", help="train a model from a config file (or the embedded default)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Train a model on one process or, under torchrun, on many (experts split over the
            ranks). With no --config, trains the embedded default: a small ViT-MoE on the 1,797
            8x8 handwritten digits that scikit-learn ships (about 30-40 s on 2 CPU cores).
            Writes runs/<name>/<timestamp>/ with config.json, metrics.jsonl, summary.json,
            curves.png, expert_load.png and checkpoints/. CIFAR-10 and CIFAR-100 are read from
            $DATA (see docs/training.md)."""),
        epilog=EXAMPLES + "\n" + _config_keys_help())
    t.add_argument("--config", metavar="FILE",
                   help="config file: plain Python with UPPER_CASE names (BATCH_SIZE = 512) or a "
                   "config() function returning a TrainConfig; also a run's config.json. "
                   "Default: the embedded digits config (or, with --resume, the checkpoint's).")
    _add_set(t, "override one config key (repeatable); VALUE is a Python literal (3, 1e-3, "
             "True, None, (0.9, 0.99)) or else a string, e.g. --set epochs=5 "
             "--set model_args.depth=2")
    t.add_argument("--resume", metavar="PATH_OR_RUN_DIR",
                   help="continue from a checkpoint folder, or from a run dir's latest "
                   "checkpoint; the run continues in that run dir unless --run-dir is given. "
                   "Exact (bit for bit) at the same world size and code version; another world size or "
                   "max_ep_size also works (augmentation, dropout and router noise are keyed by "
                   "image, so they stay the same; only torch's own RNG states, which a model's "
                   "unkeyed layers use, start fresh).")
    t.add_argument("--run-dir", metavar="DIR",
                   help="write the run here instead of runs/<name>/<timestamp>")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    e = sub.add_parser("eval", help="evaluate a checkpoint on its test set",
                       description="Build a checkpoint's model from its config (plus any --set), "
                       "load its weights and evaluate it on the test set: loss, accuracy and each "
                       "MoE layer's routing (token shares, dropped fraction). Capacity is counted "
                       "per eval batch, so with token dropping the numbers depend on "
                       "eval_batch_size (and on the number of processes): keep the run's to "
                       "reproduce its log. Runs under torchrun too. Writes nothing.")
    e.add_argument("path", metavar="PATH_OR_RUN_DIR",
                   help="a checkpoint folder, or a run dir (its latest checkpoint)")
    e.add_argument("--best", action="store_true",
                   help="the run's best checkpoint (best.json) instead of its latest")
    _add_set(e, "override one config key, e.g. --set eval_batch_size=100 or "
             "--set model_args.eval_capacity_factor=1.0")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    c = sub.add_parser("compare", help="compare runs: accuracy, speed, expert load, config "
                       "differences and curves",
                       description="Runs side by side from their run dirs (config.json, "
                       "metrics.jsonl, summary.json): the accuracy before training (runs with "
                       "eval_at_start), best and final accuracy, training images/s, parameters, "
                       "the last epoch's busiest expert over the mean load and dropped "
                       "fraction, then the config keys whose values differ (not name, "
                       "progress, plots, runs_root, timeout_s, eval_at_start; a model_args entry a "
                       "run left unset shows its model's value, looked up on the meta device: no "
                       "weights). Writes nothing unless --plot is given.")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run dirs; a folder of runs (runs/NAME, runs, or a folder above) stands for "
                   "every run dir up to 6 folders below it that has finished an epoch")
    c.add_argument("--plot", metavar="FILE.png",
                   help="also draw every run's eval accuracy and train loss curves into this file")
    m = sub.add_parser("models", help="list the model registry (moesaic models NAME describes one)",
                       description="The zoo's registered models with a line on each; with a NAME, "
                       "builds that model at its preset's image size and prints its shape, expert "
                       "counts, MoE settings, parameters (total and active per token) and FLOPs. "
                       "Models you register with moesaic.models.register (docs/models.md) are "
                       "known to the process that imports their module, not to this command.")
    m.add_argument("name", nargs="?", help="describe this model (builds it)")
    p.set_defaults(subparsers={"train": t, "eval": e, "compare": c, "models": m})
    return p


def _refuse_extra(sub: argparse.ArgumentParser, command: str, extra: list) -> None:
    """The command's own usage and a hint for arguments it does not take (argparse alone shows
    the top-level usage): the closest options, or where a stray path belongs."""
    options = [o for a in sub._actions for o in a.option_strings]
    hints = []
    for i, arg in enumerate(extra):
        value_of_option = i > 0 and extra[i - 1].startswith("-") and "=" not in extra[i - 1]
        close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=2, cutoff=0.6) \
            if arg.startswith("-") else []
        if close:
            hints.append(f"{arg} (did you mean {' or '.join(close)}?)")
        elif "=" in arg and not arg.startswith("-") and "--set" in options:
            hints.append(f"{arg} (each KEY=VALUE needs its own --set: --set {arg})")
        elif command == "train" and not arg.startswith("-") and not value_of_option:
            hints.append(f"{arg} (train takes no positional argument: --config FILE for a "
                         "config file, --resume RUN_DIR to continue a run)")
        else:
            hints.append(arg)
    sub.error(f"unrecognized arguments: {' '.join(hints)}")


def _checkpoint_config(ckpt: str, overrides: list):
    """A checkpoint's config plus ``overrides``. A max_ep_size from the checkpoint that does not
    divide this world size (a run resumed or evaluated on fewer processes) becomes None."""
    from .train import checkpoint
    from .train.config import apply_overrides, from_dict
    from .train.setup import world_size

    state = checkpoint.read_state(ckpt)
    cfg = apply_overrides(from_dict(state["config"], " (from the checkpoint)"), overrides)
    world = world_size()
    set_here = any(o.split("=", 1)[0].strip().lower() == "max_ep_size" for o in overrides)
    if cfg.max_ep_size is not None and world % cfg.max_ep_size and not set_here:
        warnings.warn(f"max_ep_size={cfg.max_ep_size} from the checkpoint's config does not "
                      f"divide this world size ({world}): using max_ep_size=None (the world "
                      "size); --set max_ep_size=N chooses another", stacklevel=3)
        cfg = dataclasses.replace(cfg, max_ep_size=None)
    return cfg


def _json_config(path: str):
    """A config saved as JSON (a run's config.json), with a config error for a missing,
    unreadable or malformed file."""
    from .train.config import ConfigError, from_dict
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"the config file {path!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"the config file {path!r} holds a {type(obj).__name__}, not an "
                          "object of config keys")
    return from_dict(obj, f" in {path}")


def _resolve_config(args):
    from .train import checkpoint
    from .train.config import apply_overrides, load_file, resolve

    if args.config is None and args.resume is not None:
        return _checkpoint_config(checkpoint.find(args.resume), args.overrides)
    if args.config is not None and args.config.endswith(".json"):
        return apply_overrides(_json_config(args.config), args.overrides)
    if args.config is not None:
        return apply_overrides(load_file(args.config), args.overrides)
    return resolve(None, args.overrides)


def _error(msg: str) -> None:
    sys.stderr.write(f"{_rank_prefix()}error: {msg}\n")  # one write: ranks' lines do not interleave
    sys.stderr.flush()


def _destroy_groups() -> None:
    """End of a command: tear the process group down if one was started (never imports it)."""
    if "moesaic.parallel.context" in sys.modules:
        from .parallel import destroy

        destroy()


def _train(args) -> int:
    from .train import checkpoint
    from .train.config import ConfigError
    from .train.data import DataError
    from .train.loop import NonFiniteLoss, TrainingInterrupted, train
    from .train.rundir import RunDirError

    def on_sigterm(signum, frame):  # a scheduler's preemption: stop like Ctrl-C
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        cfg = _resolve_config(args)
        if args.print_config:  # checked as training would check it before printing
            from .train.setup import check_model

            check_model(cfg)
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        train(cfg, run_dir=args.run_dir, resume=args.resume)
    except ConfigError as e:
        _error(f"config: {e}")
        return 2
    except RunDirError as e:
        _error(str(e))
        return 2
    except (DataError, checkpoint.CheckpointError, NonFiniteLoss) as e:
        _error(str(e))
        return 1
    except TrainingInterrupted as e:
        _error(str(e))
        return 130
    except KeyboardInterrupt:
        _error("interrupted while starting up, before training began" +
               (f"; the checkpoint {args.resume} is untouched" if args.resume else ""))
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        _destroy_groups()
    return 0


def _eval(args) -> int:
    from .train import checkpoint
    from .train.config import ConfigError
    from .train.data import DataError
    from .train.evaluate import evaluate_checkpoint, find_checkpoint

    try:
        ckpt = find_checkpoint(args.path, args.best)
        with warnings.catch_warnings():  # the lr schedule's warnings concern training only
            warnings.filterwarnings("ignore", message=SCHEDULE_WARNINGS)
            cfg = _checkpoint_config(ckpt, args.overrides)
        result = evaluate_checkpoint(cfg, ckpt)
    except ConfigError as e:
        _error(f"config: {e}")
        return 2
    except (DataError, checkpoint.CheckpointError) as e:
        _error(str(e))
        return 1
    finally:
        _destroy_groups()
    if os.environ.get("RANK", "0") != "0":
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']} (epoch {result['epoch']}): eval loss {result['eval_loss']:.4f}, "
          f"accuracy {100 * result['eval_accuracy']:.2f}%")
    for layer in result["moe"]:
        shares = " ".join(f"{100 * s:.0f}" for s in layer["token_share"])
        print(f"  {layer['name']}: token shares % [{shares}], dropped "
              f"{100 * layer['dropped_fraction']:.1f}%")
    return 0


def _compare(args) -> int:
    from .train.compare import CompareError, plot, report

    try:
        text, runs = report(args.runs)
    except CompareError as e:
        _error(str(e))
        return 2
    print(text)
    if args.plot is None:
        return 0
    try:
        plot(args.plot, runs)
    except ImportError as e:
        _error(f"--plot needs matplotlib (pip install 'moesaic[train]'): {e}")
        return 2
    except (OSError, ValueError) as e:  # ValueError: a format matplotlib doesn't write
        why = e.strerror if isinstance(e, OSError) and e.strerror else e  # not the temp name
        _error(f"cannot write the plot {args.plot}: {why}")
        return 2
    print(f"\ncurves: {args.plot}")
    return 0


def _models(name: Optional[str]) -> int:
    from . import models

    if name is None:
        names = models.list_models()
        width = max(map(len, names), default=0)
        for n in names:
            print(f"{n:<{width}}  {models.model_summary(n)}".rstrip())
        return 0
    try:
        print(models.describe(models.create(name)))
    except ValueError as e:
        _error(str(e))
        return 2
    print("(at the preset's own image size; `moesaic train` builds it for its dataset's images, "
          "and prints that model's summary when it starts)")
    return 0


def _rank_prefix() -> str:
    rank = os.environ.get("RANK")
    return f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """moesaic's own warnings as one line a user reads (no source path and code line)."""
    if category is UserWarning and f"{os.sep}moesaic{os.sep}" in filename:
        return f"{_rank_prefix()}warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


_default_format = warnings.formatwarning


def main(argv=None) -> int:
    warnings.formatwarning = _format_warning
    try:
        with warnings.catch_warnings():
            if os.environ.get("RANK", "0") != "0":  # every rank reads the same config: rank 0
                warnings.filterwarnings("ignore", category=UserWarning,  # speaks of it
                                        module=r"moesaic\.train\.config")
            return _main(argv)
    finally:
        warnings.formatwarning = _default_format


def _main(argv) -> int:
    args, extra = _parser().parse_known_args(argv)
    if extra:
        if args.command is None:
            _parser().parse_args(argv)  # argparse's own message
        _refuse_extra(args.subparsers[args.command], args.command, extra)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "models":
        return _models(args.name)
    _parser().print_help(sys.stderr)  # no command: usage, and the exit status of a usage error
    return 2


if __name__ == "__main__":
    sys.exit(main())

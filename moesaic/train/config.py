"""The training configuration: one typed dataclass, loaded from a plain-Python config file.

A config file is either plain Python with UPPER_CASE names (``BATCH_SIZE = 512``; each name is
the lower-case field name) or defines a function ``config()`` returning a :class:`TrainConfig`
(or a dict of fields). ``--set key=value`` overrides are applied on top. Everything is validated
before any work starts: an unknown key names the closest valid ones, a bad value names the field
and the value.
"""
from __future__ import annotations

import ast
import difflib
import math
import numbers
import os
import re
import runpy
import sys
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from dataclasses import replace as dataclass_replace
from typing import Any, Optional

from ..config import _plain

DATASETS = ("digits", "cifar10", "cifar100")
CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3}  # input channels of each dataset
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "constant")
AUTO_AUGMENT = (None, "cifar10")


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid :class:`TrainConfig`."""


@dataclass
class TrainConfig:
    """Everything one training run needs. Field docs are shown by ``moesaic train --help``."""

    name: str = "digits_vit_moe"  # run name: the run dir is runs/<name>/<timestamp>
    model: str = "vit_moe_tiny"  # a name from `moesaic models`
    model_module: Optional[str] = None  # a model outside the zoo: the Python file (or module name) that registers it, imported before the model is built; `moesaic train` records the file when the config's imports registered the model, so that eval and --resume find it
    model_args: dict = field(default_factory=dict)  # keywords for moesaic.models.create: the model's (depth, d_model, ...) and its MoE layers' (top_k, capacity_factor, drop_tokens, capacity_scope, ...; all in docs/models.md); not img_size/in_chans/num_classes (the dataset's) nor aux_loss_coef (aux_loss_weight)
    dataset: str = "digits"  # digits (scikit-learn's 8x8 digits, embedded), cifar10 or cifar100
    data_dir: Optional[str] = None  # cifar10 / cifar100 location; default $DATA
    batch_size: int = 64  # global batch: split evenly over the ranks
    accum_steps: int = 1  # micro-batches per optimizer step: each rank's share of the batch runs as this many forward/backward passes (less activation memory, the same global batch)
    eval_batch_size: int = 256  # global evaluation batch
    epochs: int = 30  # training epochs (the schedule spans all of them)
    steps_per_epoch: Optional[int] = None  # cap on optimizer steps per epoch (short smoke runs)
    max_steps: Optional[int] = None  # stop after this many steps in all (mid-epoch: not checkpointed)
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 0.0  # learning rate at the end of the cosine
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    betas: tuple = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    wd_exclude_norm_bias_embed: bool = False  # no weight decay on norms, biases, embeddings
    schedule: str = "cosine"  # cosine or constant (after warmup), stepped per optimizer step
    warmup_epochs: float = 0.0  # linear warmup length, in epochs
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    aux_loss_weight: float = 0.01  # weight of the MoE auxiliary (load-balance) loss
    clip_grad: Optional[float] = 1.0  # global gradient-norm clip (each expert counted once)
    norm_mean: Optional[tuple] = None  # per-channel input mean, pixels on the 0-1 scale (None: the training set's own; CIFAR-10: the full set's published values)
    norm_std: Optional[tuple] = None  # per-channel input std, pixels on the 0-1 scale (None: the training set's own; CIFAR-10: the full set's published values)
    crop_padding: int = 0  # random crop with this zero padding (0: off)
    hflip: bool = False  # random horizontal flip
    auto_augment: Optional[str] = None  # None or "cifar10" (AutoAugment's CIFAR-10 policy)
    randaug_ops: int = 0  # RandAugment: ops per image (0: off)
    randaug_magnitude: int = 9  # RandAugment magnitude, 0..30
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixup (0: off)
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) cutmix (0: off)
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # with both on: probability of cutmix rather than mixup
    precision: str = "auto"  # auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16
    device: str = "auto"  # auto, cpu or cuda
    grad_checkpointing: bool = False  # recompute blocks in the backward: less memory, more compute
    max_ep_size: Optional[int] = None  # expert-parallel size limit (default: world size)
    dedup_tokens: bool = False  # expert parallelism: a dropless (or capacity_scope="global") layer sends a token to a rank once, however many of its experts that rank holds (fewer bytes for top_k >= 2)
    init_from: Optional[str] = None  # fine-tune: start from this checkpoint folder's (or run dir's latest) weights; a head for another class count starts anew
    upcycle: bool = False  # with init_from: the checkpoint is a dense model (model_args num_experts=0): copy each of its MLPs into every expert of the MoE block at that place (sparse upcycling); routers start anew
    eval_at_start: bool = False  # evaluate once before the first step (a fine-tuned or upcycled start); logged, and kept in summary.json as initial_eval_accuracy
    seed: int = 0  # seeds weights, data order, augmentation, noise and dropout
    checkpoint_every: int = 10  # save every N epochs (also at the best accuracy and the end)
    keep_checkpoints: int = 2  # periodic checkpoints kept (the best one is always kept)
    threads: Optional[int] = None  # torch threads per process (default: cores / local ranks)
    runs_root: str = "runs"  # parent of runs/<name>/<timestamp>
    progress: bool = True  # progress bar on rank 0 (only when stderr is a terminal)
    plots: bool = True  # curves.png and expert_load.png, redrawn every epoch
    timeout_s: float = 300.0  # process-group timeout: a dead rank ends the job, never a hang

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        for n in ("norm_mean", "norm_std"):
            d[n] = None if d[n] is None else list(d[n])
        return d


def field_help() -> dict[str, str]:
    """Each field's one-line description (the comment after it in this file)."""
    import inspect

    src = inspect.getsource(TrainConfig)
    out = {}
    for line in src.splitlines():
        s = line.strip()
        if ":" in s and "#" in s and not s.startswith(("#", '"')):
            name = s.split(":", 1)[0].strip()
            out[name] = s.split("#", 1)[1].strip()
    return out


def _type_of(f) -> tuple[Any, bool]:
    """(base type, optional?) of a field annotation."""
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    args = typing.get_args(t)
    if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return t, False


def _coerce(name: str, value: Any, t, optional: bool) -> Any:
    value = _plain(value)  # numpy scalars as the Python bool, int or float they stand for
    bad = ConfigError(f"{name}: expected {t.__name__}{' or None' if optional else ''}, "
                      f"got {value!r} ({type(value).__name__})")
    if value is None:
        if optional:
            return None
        raise bad
    if t is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # --set name=123 parses as a number
        raise bad
    if t is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    if t is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_plain(x) for x in value)
        raise bad
    return value


def _raise_all(problems: list[str]) -> None:
    """One ConfigError naming every problem (one line when there is one)."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"the config has {len(problems)} problems:\n" +
                          "\n".join(f"  - {p}" for p in problems))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Type-check and range-check every field; returns ``cfg`` (types normalised in place).
    Every problem is reported at once: the types first, then (when they are right) the ranges."""
    problems: list[str] = []

    def _check(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    for f in fields(TrainConfig):
        t, optional = _type_of(f)
        try:
            value = _coerce(f.name, getattr(cfg, f.name), t, optional)
        except ConfigError as e:
            problems.append(str(e))
            continue
        numbers_in = value if isinstance(value, tuple) else (value,)
        _check(all(math.isfinite(v) for v in numbers_in
                   if isinstance(v, float)),
               f"{f.name} must be finite, got {value!r}")
        setattr(cfg, f.name, value)
    _raise_all(problems)
    c = cfg
    _check(c.name not in ("", ".", "..") and "/" not in c.name,
           f"name must be a non-empty folder name without '/' (not '.' or '..'), got {c.name!r}")
    _check(c.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {c.dataset!r}")
    for n in ("batch_size", "eval_batch_size", "epochs", "checkpoint_every", "keep_checkpoints",
              "accum_steps"):
        _check(getattr(c, n) >= 1, f"{n} must be >= 1, got {getattr(c, n)!r}")
    for n in ("steps_per_epoch", "max_steps", "max_ep_size", "threads"):
        v = getattr(c, n)
        _check(v is None or v >= 1, f"{n} must be None or >= 1, got {v!r}")
    _check(c.lr > 0, f"lr must be > 0, got {c.lr!r}")
    _check(0 <= c.min_lr <= c.lr, f"min_lr must be in [0, lr={c.lr}], got {c.min_lr!r}")
    if c.schedule == "constant" and c.min_lr > 0:
        warnings.warn(f"min_lr ({c.min_lr}) has no effect with schedule='constant'", stacklevel=2)
    _check(c.weight_decay >= 0, f"weight_decay must be >= 0, got {c.weight_decay!r}")
    _check(len(c.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in c.betas),
           f"betas must be two numbers in [0, 1), got {c.betas!r}")
    _check(c.eps > 0, f"eps must be > 0, got {c.eps!r}")
    _check(c.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {c.schedule!r}")
    _check(c.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {c.warmup_epochs!r}")
    if c.warmup_epochs > c.epochs:
        warnings.warn(f"warmup_epochs ({c.warmup_epochs}) exceeds epochs ({c.epochs}): the "
                      f"learning rate never reaches lr ({c.lr})", stacklevel=2)
    _check(0 <= c.seed < 2 ** 63, f"seed must be in [0, 2**63), got {c.seed!r}")
    taken = sorted({"img_size", "in_chans", "num_classes"} & set(c.model_args))
    _check(not taken, f"model_args {taken} are set from the dataset; remove them")
    _check("aux_loss_coef" not in c.model_args,
           f"model_args.aux_loss_coef ({c.model_args.get('aux_loss_coef')!r}) is set by the run "
           "config: use aux_loss_weight instead")
    _check(0 <= c.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {c.label_smoothing!r}")
    _check(c.aux_loss_weight >= 0, f"aux_loss_weight must be >= 0, got {c.aux_loss_weight!r}")
    _check(c.clip_grad is None or c.clip_grad > 0, f"clip_grad must be None or > 0, got {c.clip_grad!r}")
    channels, big = CHANNELS.get(c.dataset), []
    for n, low in (("norm_mean", -math.inf), ("norm_std", 0.0)):
        v = getattr(c, n)
        if v is None or channels is None:  # an unknown dataset is reported above
            continue
        if len(v) == channels and all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                                      and math.isfinite(x) and x > low for x in v):
            setattr(c, n, tuple(float(x) for x in v))  # ints as floats (_coerce made them plain)
            big += [n] if max(abs(x) for x in v) > 1 else []
        else:
            problems.append(f"{n} must be None or {channels} finite number"
                            f"{'s' if channels > 1 else ''}{' > 0' if low == 0 else ''} (one "
                            f"per channel of {c.dataset}), got {v!r}")
    if big:
        warnings.warn(f"{' and '.join(big)} above 1: pixels are scaled to [0, 1] before "
                      "normalisation (0-255 statistics would squash the inputs)", stacklevel=2)
    if c.dataset == "digits" and c.data_dir is not None:
        warnings.warn(f"data_dir ({c.data_dir!r}) is unused: the digits dataset ships with "
                      "scikit-learn (dataset='cifar10' or 'cifar100' reads data_dir)", stacklevel=2)
    _check(c.crop_padding >= 0, f"crop_padding must be >= 0, got {c.crop_padding!r}")
    _check(c.auto_augment in AUTO_AUGMENT, f"auto_augment must be one of {AUTO_AUGMENT}, got {c.auto_augment!r}")
    _check(c.randaug_ops >= 0, f"randaug_ops must be >= 0, got {c.randaug_ops!r}")
    _check(0 <= c.randaug_magnitude <= 30, f"randaug_magnitude must be in [0, 30], got {c.randaug_magnitude!r}")
    for n in ("mixup_alpha", "cutmix_alpha"):
        _check(getattr(c, n) >= 0, f"{n} must be >= 0, got {getattr(c, n)!r}")
    for n in ("mix_prob", "mix_switch_prob"):
        _check(0 <= getattr(c, n) <= 1, f"{n} must be in [0, 1], got {getattr(c, n)!r}")
    _check(c.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {c.precision!r}")
    _check(c.device in DEVICES, f"device must be one of {DEVICES}, got {c.device!r}")
    _check(c.timeout_s > 0, f"timeout_s must be > 0, got {c.timeout_s!r}")
    _raise_all(problems)
    return cfg


ALIASES = {"learning_rate": "lr", "lerning_rate": "lr", "learningrate": "lr", "wd": "weight_decay",
           "num_epochs": "epochs", "n_epochs": "epochs", "warmup": "warmup_epochs",
           "bs": "batch_size", "batchsize": "batch_size", "grad_clip": "clip_grad",
           "gradient_checkpointing": "grad_checkpointing",
           "activation_checkpointing": "grad_checkpointing", "grad_accum": "accum_steps",
           "grad_accum_steps": "accum_steps", "gradient_accumulation": "accum_steps",
           "ep_size": "max_ep_size"}  # names other tools use


def _unknown(key: str, where: str) -> ConfigError:
    names = [f.name for f in fields(TrainConfig)]
    close = difflib.get_close_matches(key.lower(), names, n=3, cutoff=0.5)
    alias = ALIASES.get(key.lower())
    if alias is not None and alias not in close:
        close = [alias, *close][:3]
    upper = key.isupper()
    hint = ", ".join(n.upper() if upper else n for n in close)
    msg = f"unknown config key {key!r}{where}"
    return ConfigError(msg + (f"; did you mean: {hint}?" if close else
                              "; see `moesaic train --help` for the valid keys"))


def from_dict(d: dict, where: str = "") -> TrainConfig:
    """Build and validate a config from ``{field: value}`` (keys case-insensitive)."""
    names = {f.name for f in fields(TrainConfig)}
    kwargs, unknown = {}, []
    for k, v in d.items():
        if k.lower() not in names:
            unknown.append(str(_unknown(k, where)))
        kwargs[k.lower()] = v
    _raise_all(unknown)
    return validate(TrainConfig(**kwargs))


def names_a_file(model_module: str) -> bool:
    """Whether a ``model_module`` is a file path (else a module name)."""
    return model_module.endswith(".py") or os.sep in model_module


def load_file(path: str) -> TrainConfig:
    """Run a config file and turn its UPPER_CASE names (or its ``config()``) into a config. A
    ``model_module`` beside the config file (a relative file, or a module name whose file is
    there) becomes that file's path."""
    cfg = _load_file(path)
    spec, folder = cfg.model_module, os.path.dirname(os.path.abspath(path))
    if spec is None or os.path.isabs(spec):
        return cfg
    beside = [os.path.join(folder, spec)] if names_a_file(spec) else [
        os.path.join(folder, *spec.split(".")) + ".py",
        os.path.join(folder, *spec.split("."), "__init__.py")]
    found = [p for p in beside if os.path.isfile(p)]
    return validate(dataclass_replace(cfg, model_module=found[0])) if found else cfg


def _line_in(path: str, e: BaseException) -> str:
    """' (line N)': where in the file ``path`` the exception ``e`` was raised, if it was."""
    line, target = None, os.path.abspath(path)
    tb = e.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" (line {line})"


def _refuse_bare_annotations(path: str, ns: dict) -> None:
    """``EPOCHS: 2`` (YAML habit) is a Python annotation that sets nothing: refuse an
    UPPER_CASE name annotated at the top level and never set, rather than train with the
    default (``EPOCHS: int`` then ``EPOCHS = 30`` is fine)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    bare = [(n.lineno, n.target.id) for n in tree.body if isinstance(n, ast.AnnAssign)
            and n.value is None and isinstance(n.target, ast.Name) and n.target.id.isupper()
            and n.target.id not in ns]
    if bare:
        line, name = bare[0]
        raise ConfigError(f"config file {path!r} (line {line}): `{name}: ...` annotates {name} "
                          f"without setting it; write `{name} = ...`"
                          + (f" (also {', '.join(n for _, n in bare[1:])})" if bare[1:] else ""))


def _load_file(path: str) -> TrainConfig:
    if not os.path.isfile(path):
        why = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "configs", os.path.basename(path))
        if not os.path.isabs(path) and os.path.isfile(shipped):
            why += f" here ({os.getcwd()}); the shipped one is {shipped}"
        raise ConfigError(f"config file {path!r} {why}")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path!r}: config files are Python (UPPER_CASE names, "
                          f"`EPOCHS = 30`) or a run's config.json, not {ext[1:].upper()}")
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)  # a config may import a base config that sits beside it
    before, bytecode = set(sys.modules), sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ beside the user's configs
    try:
        ns = runpy.run_path(path, run_name="moesaic_config")
    except Exception as e:
        raise ConfigError(f"config file {path!r} failed to run{_line_in(path, e)}: "
                          f"{type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(folder)
        sys.dont_write_bytecode = bytecode
        for name in set(sys.modules) - before:  # re-read on the next load, edits included
            if os.path.dirname(os.path.abspath(getattr(sys.modules[name], "__file__", None)
                                               or "/")) == folder:
                del sys.modules[name]
    _refuse_bare_annotations(path, ns)
    where = f" in {path}"
    fn = ns.get("config") or ns.get("get_config")
    upper = {k: v for k, v in ns.items() if k.isupper() and not k.startswith("_")
             and not isinstance(v, types.ModuleType) and not callable(v)}
    keys = {f.name for f in fields(TrainConfig)}
    named = {k: ALIASES.get(k.lower(), k.lower()) for k in ns if not k.isupper()}
    named = {k: key for k, key in named.items() if key in keys and not callable(ns[k])
             and not isinstance(ns[k], types.ModuleType)}
    lower = sorted(k for k, key in named.items() if key.upper() not in upper)
    if lower and not callable(fn):  # a config() may use lower-case helpers of its own
        raise ConfigError(f"config file {path!r}: {', '.join(lower)} would be ignored (config "
                          f"names are UPPER_CASE): write "
                          f"{', '.join(named[k].upper() for k in lower)}")
    for k, key in sorted(named.items()):  # a helper beside its key, or a forgotten override?
        if key.upper() in upper and not _same(upper[key.upper()], ns[k]):
            warnings.warn(f"config file {path!r} sets {k} = {ns[k]!r} and {key.upper()} = "
                          f"{upper[key.upper()]!r}: the run uses {key.upper()} (config names "
                          f"are UPPER_CASE; {k} is taken as a helper of the file's own)",
                          stacklevel=1)  # from this module: rank 0 alone shows it
    if callable(fn):
        if upper:
            raise ConfigError(f"config file {path!r} defines both config() and UPPER_CASE names "
                              f"({', '.join(sorted(upper))}); use one style")
        try:
            out = fn()
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"config() in {path!r} failed{_line_in(path, e)}: "
                              f"{type(e).__name__}: {e}") from e
        if isinstance(out, TrainConfig):
            return validate(out)
        if isinstance(out, dict):
            return from_dict(out, where)
        raise ConfigError(f"config() in {path!r} must return a TrainConfig or a dict, "
                          f"got {type(out).__name__}")
    return from_dict(upper, where)


def _same(a: Any, b: Any) -> bool:
    """Whether a lower-case helper repeats its UPPER_CASE key's value (harmless)."""
    try:
        return bool(a == b)
    except Exception:
        return False


def parse_value(text: str) -> Any:
    """A --set value: a Python literal (1e-3, None, True, (0.9, 0.99), {'depth': 2}) or a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"\s*[+-]?(nan|inf|infinity)\s*", text, re.IGNORECASE):
            return float(text)  # a number, so the check says it must be finite
        return text


_STR_FIELDS = {f.name for f in fields(TrainConfig) if _type_of(f)[0] is str}


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings; ``model_args.KEY=value`` sets one model keyword. Switching
    ``model`` while the config's ``model_args`` stay warns that they still apply."""
    d = cfg.to_dict()
    touched, unknown = set(), []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        value = parse_value(text.strip())
        if key.lower() in _STR_FIELDS and not isinstance(value, (str, type(None))):
            value = text.strip()  # a name or path that looks like a number keeps its text
        if key.lower().startswith("model_args."):
            d["model_args"] = {**d["model_args"], key.split(".", 1)[1]: value}
            touched.add("model_args")
            continue
        if key.lower() not in d:
            unknown.append(str(_unknown(key, " (from --set)")))
            continue
        d[key.lower()] = value
        touched.add(key.lower())
    _raise_all(unknown)
    if "model" in touched and d["model"] != cfg.model and cfg.model_args \
            and "model_args" not in touched:
        warnings.warn(f"model is now {d['model']!r} but the config's model_args "
                      f"{cfg.model_args} still apply to it; add --set model_args={{}} to build "
                      f"{d['model']!r} as registered", stacklevel=2)
    return from_dict(d)


def resolve(path: Optional[str], overrides: list[str]) -> TrainConfig:
    """The config a run uses: the file (or the embedded default) plus overrides."""
    if path is None:
        from .defaults import digits_default

        cfg = digits_default()
    else:
        cfg = load_file(path)
    return apply_overrides(cfg, overrides)


__all__ = ["TrainConfig", "ConfigError", "validate", "from_dict", "load_file", "apply_overrides",
           "resolve", "field_help"]

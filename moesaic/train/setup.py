"""A run's process set-up: the process group (also across torchrun restarts), device, precision,
threads and the model, shared by ``moesaic train`` and ``moesaic eval``."""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.util
import os
import signal
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .. import keyed, models
from ..parallel import init_distributed
from . import rundir
from .config import ConfigError, TrainConfig, names_a_file

FAULT_STEP_ENV = "MOESAIC_FAULT_STEP"  # test hook: kill a rank at this global step ...
FAULT_RANK_ENV = "MOESAIC_FAULT_RANK"  # ... on this rank, on the first attempt only
FAULT_SIGNAL_ENV = "MOESAIC_FAULT_SIGNAL"  # ... with this signal (default KILL; TERM, INT)


def world_size() -> int:
    """The process group's size once one exists, else torchrun's WORLD_SIZE (1 without it)."""
    return dist.get_world_size() if dist.is_initialized() else int(
        os.environ.get("WORLD_SIZE", "1"))


def start_processes(cfg: TrainConfig):
    """``init_distributed`` for a run, after checking that ``max_ep_size`` divides the world
    size (a config error that names both numbers, not a traceback)."""
    world = world_size()
    if cfg.max_ep_size is not None and world % cfg.max_ep_size:
        raise ConfigError(f"max_ep_size ({cfg.max_ep_size}) does not divide the world size "
                          f"({world}): use a divisor of it, or None (the world size)")
    return init_distributed(max_ep_size=cfg.max_ep_size, timeout_s=cfg.timeout_s)


def launcher() -> str:
    """How this run was started, for resume hints: torchrun with its per-machine process count
    (and node count) when it set the environment, else the plain command (``python3 -m
    moesaic`` when started so: the console script may not be on PATH)."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), world_size()
    if local is None or world <= 1:
        main_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "__main__.py")
        as_module = bool(sys.argv) and os.path.abspath(sys.argv[0]) == main_py
        return "python3 -m moesaic train" if as_module else "moesaic train"
    nodes = world // max(int(local), 1)
    nnodes = f" --nnodes={nodes} ..." if nodes > 1 else ""
    return f"torchrun --nproc_per_node={local}{nnodes} -m moesaic train"


def device_for(cfg: TrainConfig, ctx) -> torch.device:
    """``cfg.device``, checked: "auto" takes the process group's device (this rank's GPU)."""
    if cfg.device == "cpu":
        return torch.device("cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for, but CUDA is not available")
    return ctx.device


def precision_for(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype (None: float32). ``auto``: bf16 on CUDA (fp16 with loss scaling where
    bf16 is unsupported), float32 on CPU, where bf16 autocast (which works) was slower for the
    embedded default and about even for ViT-Lite-6 (docs/training.md has the numbers)."""
    p = cfg.precision
    if p == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if p == "fp16" and device.type != "cuda":
        raise ConfigError("precision: 'fp16' needs CUDA (loss scaling); use 'bf16' or 'fp32' on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def set_threads(cfg: TrainConfig) -> None:
    """``cfg.threads``, else the machine's cores shared among torchrun's local processes."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def init_for_restarts(timeout_s: float) -> None:
    """Start the process group on a store namespaced by torchrun's restart count.

    torchrun's workers share the agent's store across restarts, so a restarted group would read
    the dead attempt's addresses and fail to connect (seen with torch 2.13 and gloo). A
    per-attempt prefix keeps each attempt's keys apart. ``init_distributed`` then finds the
    group already started and uses it.
    """
    if (dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
            or world_size() <= 1):
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"moesaic/attempt_{rundir.restart_count()}", base)
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def maybe_fault(step: int, rank: int) -> None:
    """Test hook: SIGKILL (or ``$MOESAIC_FAULT_SIGNAL``) this rank at a given step on
    torchrun's first attempt."""
    at = os.environ.get(FAULT_STEP_ENV)
    if at is None or rundir.restart_count() > 0:
        return
    if int(at) == step and int(os.environ.get(FAULT_RANK_ENV, "0")) == rank:
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(FAULT_SIGNAL_ENV, "KILL")))


def record_model_module(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``model_module`` set to the file that registered ``cfg.model`` when that is
    not moesaic's own (a model the config file imported): the run's config.json then rebuilds
    it in ``moesaic eval`` and ``--resume`` without the config file."""
    spec = cfg.model_module
    if spec is not None:  # a file: absolute, so that eval finds it from any directory
        return (dataclasses.replace(cfg, model_module=os.path.abspath(spec))
                if names_a_file(spec) else cfg)
    source = models.registered_in(cfg.model)
    if source == "__main__":
        warnings.warn(f"model {cfg.model!r} is registered by the script being run, which the run "
                      f"dir cannot import again: moesaic eval and --resume will not know it "
                      f"unless model_module names a module that registers it", stacklevel=2)
        return cfg
    package = os.path.dirname(os.path.dirname(os.path.abspath(models.__file__)))
    if source is None or os.path.commonpath([package, source]) == package:
        return cfg
    return dataclasses.replace(cfg, model_module=source)


def import_model_module(cfg: TrainConfig) -> None:
    """Import ``cfg.model_module`` unless ``cfg.model`` is registered already: a file by its
    path (as part of its package when its folder has an ``__init__.py``; its folder on
    ``sys.path`` meanwhile, for its own imports), or a module name (the working directory on
    ``sys.path`` meanwhile, as ``python -m`` has it)."""
    spec = cfg.model_module
    if spec is None or cfg.model in models.list_models():
        return
    path, folder = None, os.getcwd()
    if names_a_file(spec):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"model_module {spec!r} does not exist (it registers model "
                              f"{cfg.model!r}; set model_module to where that file is now)")
        folder, name = os.path.split(path)
        parts = [] if name == "__init__.py" else [name[:-3] if name.endswith(".py") else name]
        while os.path.isfile(os.path.join(folder, "__init__.py")):
            folder, package = os.path.split(folder)
            parts.insert(0, package)
        named = all(p.isidentifier() for p in parts)  # exp.v2.py names no module
        spec = ".".join(parts)
    sys.path.insert(0, folder)
    try:
        if path is not None and not named:
            _run_file(path)
        else:
            importlib.import_module(spec)
    except Exception as e:
        raise ConfigError(f"model_module {cfg.model_module!r} (which registers model "
                          f"{cfg.model!r}) failed to import: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(folder)


def _run_file(path: str) -> None:
    """Import the Python file ``path`` under a module name of its own."""
    name = "moesaic_model_module_" + "".join(c if c.isalnum() else "_" for c in path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def check_kernels(model: torch.nn.Module, device: torch.device) -> None:
    """Refuse, before anything is written, MoE layers whose ``kernels`` cannot run on
    ``device`` (``"triton"`` without Triton, or on a CPU without ``TRITON_INTERPRET=1``)."""
    from ..layer import MoE
    from ..ops import select_ops

    for name, m in model.named_modules():
        if isinstance(m, MoE):
            try:
                select_ops(m.config.kernels, device)
            except RuntimeError as e:
                raise ConfigError(f"{name or 'model'}: {e}") from e


def check_model(cfg: TrainConfig) -> None:
    """Build the config's model on the meta device (no weights, no data), so a bad
    ``model_args`` fails as it would at the start of training."""
    from .data import SHAPES

    img_shape, num_classes = SHAPES[cfg.dataset]
    with torch.device("meta"):
        build_model(cfg, img_shape, num_classes)


def build_model(cfg: TrainConfig, img_shape: tuple, num_classes: int) -> torch.nn.Module:
    """The registry model with the dataset's image shape. ``aux_loss_weight`` is the MoE layers'
    ``aux_loss_coef`` (the balance loss's weight); ``model_args.z_loss_coef`` weighs the z loss
    unchanged, and the training loss adds the layers' aux loss as it is."""
    C, H, _ = img_shape
    kw = {"img_size": H, "in_chans": C, "num_classes": num_classes,
          "aux_loss_coef": cfg.aux_loss_weight}
    kw.update(cfg.model_args)
    import_model_module(cfg)
    try:
        model = models.create(cfg.model, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {cfg.model!r} with model_args {cfg.model_args}: {e}") from e
    keyed.key_dropouts_(model)  # a registered model's own nn.Dropout: masks keyed by image too
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"grad_checkpointing=True but model {cfg.model!r} "
                              f"({type(model).__name__}) has no set_grad_checkpointing method")
        model.set_grad_checkpointing(True)
    return model

"""Training system: ``moesaic train`` (see docs/training.md).

``train(cfg)`` runs one configured job on one process or under torchrun; configs are
:class:`TrainConfig` dataclasses loaded from plain-Python files.
"""
from .config import ConfigError, TrainConfig, apply_overrides, from_dict, load_file, resolve
from .data import DataError
from .defaults import digits_default
from .loop import NonFiniteLoss, Trainer, train

__all__ = ["train", "Trainer", "TrainConfig", "ConfigError", "DataError", "NonFiniteLoss",
           "load_file", "from_dict", "apply_overrides", "resolve", "digits_default"]

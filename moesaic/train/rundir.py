"""Where a run writes: ``runs/<name>/<timestamp>``, chosen once by rank 0 and shared.

Under torchrun with ``--max-restarts``, restarted workers must find the same run dir to resume
from its latest checkpoint. Rank 0 tags the dir with a key of the launching agent (torchrun's
run id, the host and the agent's process id, all unchanged across restarts); a restarted rank 0
(``TORCHELASTIC_RESTART_COUNT`` > 0) finds the dir by that key. A fresh launch never looks it
up: torchrun's default run id is "none", so in a container with a fixed host name and agent
process id a later job has the same key.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import torch.distributed as dist

from .dist import multi_process

ELASTIC_FILE = "elastic_key"


def elastic_key() -> Optional[str]:
    """A key that stays the same across torchrun restarts of one job (None outside torchrun)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    return f"{run_id}:{socket.gethostname()}:{os.getppid()}"


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _find_by_key(parent: str, key: str) -> Optional[str]:
    if not os.path.isdir(parent):
        return None
    for name in sorted(os.listdir(parent), reverse=True):
        f = os.path.join(parent, name, ELASTIC_FILE)
        if os.path.isfile(f):
            with open(f) as fh:
                if fh.read().strip() == key:
                    return os.path.join(parent, name)
    return None


def _new_dir(parent: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = os.path.join(parent, stamp), 1
    while os.path.exists(path):
        path = os.path.join(parent, f"{stamp}-{i}")
        i += 1
    return path


class RunDirError(ValueError):
    """The run dir asked for already holds another run."""


def holds_run(path: str) -> bool:
    """A run that can be resumed: one with a checkpoint (a run stopped before its first
    checkpoint leaves nothing to continue, so its folder may be reused)."""
    return os.path.isfile(os.path.join(path, "checkpoints", "latest.json"))


def choose(runs_root: str, name: str, given: Optional[str],
           resuming: bool = False) -> tuple[str, bool]:
    """(run dir, found again after a torchrun restart). Rank 0 only. A given dir that already
    holds a run is refused unless resuming (or restarted by torchrun): a new run would
    overwrite its metrics and mix its checkpoints with the old ones."""
    key = elastic_key()
    if given is not None:
        if holds_run(given) and not resuming and restart_count() == 0:
            raise RunDirError(f"run dir {given} already holds a run (checkpoints/latest.json): "
                              f"continue it with --resume {given}, or pass another --run-dir")
        path, again = given, False
    else:
        parent = os.path.join(runs_root, name)
        restarted = key is not None and restart_count() > 0  # a fresh launch never looks:
        found = _find_by_key(parent, key) if restarted else None  # its key may repeat
        path, again = (found, True) if found is not None else (_new_dir(parent), False)
    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
    if key is not None:
        with open(os.path.join(path, ELASTIC_FILE), "w") as f:
            f.write(key)
    return path, again or (given is not None and restart_count() > 0)


def shared_choice(runs_root: str, name: str, given: Optional[str], is_main: bool,
                  resuming: bool = False) -> tuple[str, bool]:
    """Rank 0 chooses; every rank gets the same answer (or the same error)."""
    out: list = [None]
    if is_main:
        try:
            out = [choose(runs_root, name, given, resuming)]
        except RunDirError as e:
            out = [e]
        except OSError as e:  # e.g. no permission: every rank must hear of it, not time out
            where = given or os.path.join(runs_root, name)
            out = [RunDirError(f"cannot create the run dir ({where}): {e}")]
    if multi_process():
        dist.broadcast_object_list(out, src=0)
    if isinstance(out[0], RunDirError):
        raise out[0]
    return out[0]

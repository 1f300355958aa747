"""Run a function on N real processes (spawn + gloo) with a hard deadline, and collect results.

Each rank gets the torchrun-style environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK)
so ``moesaic.init_distributed`` runs its real code path, and one intra-op thread (2-core box).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, out_path, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    try:
        result = ("ok", fn(rank, world, *args))
    except BaseException as e:  # report everything, including assertion failures
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    with open(out_path, "wb") as f:
        pickle.dump(result, f)
    os._exit(0)


def run_ranks(fn, world: int, *args, timeout: float = 90.0, allow_errors: bool = False):
    """Run ``fn(rank, world, *args)`` on ``world`` processes; returns per-rank results, or raises
    AssertionError with every failing rank's traceback (``allow_errors``: return the
    ("error", text) pairs instead)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"rank{r}.pkl") for r in range(world)]
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, paths[r], args))
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join(5)
        results = []
        for r, path in enumerate(paths):
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append(("error", f"rank {r} left no result (hung: {r in hung}, "
                                         f"exit code {procs[r].exitcode})"))
    if hung:
        raise AssertionError(f"ranks {hung} still running after {timeout} s: {results}")
    if allow_errors:
        return results
    errors = [f"rank {r}: {text}" for r, (status, text) in enumerate(results) if status != "ok"]
    assert not errors, "\n".join(errors)
    return [value for _, value in results]

"""Progress bars: drawn on a terminal (stderr), never into a log file or pipe."""
from __future__ import annotations

import os
import sys


def on_terminal(enabled: bool) -> bool:
    """Whether to draw: asked for, and stderr is a terminal."""
    return enabled and sys.stderr is not None and sys.stderr.isatty()


def _terminal_columns(stream) -> int:
    """The terminal's width, 0 when it reports none (a pty opened without a size)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar that vanishes when done; disabled off a terminal. A terminal that reports no
    size (``script``, some CI runners) gets 80 x 24 (tqdm took its rows as -1 and drew
    nothing)."""
    from tqdm import tqdm

    shown = on_terminal(enabled)
    sized = shown and _terminal_columns(sys.stderr) > 0
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=sized,
                ncols=None if sized else 80, nrows=None if sized else 24, unit=unit,
                mininterval=0.5, disable=not shown)

"""Entry point for the two-agent torchrun test: one process per 'machine', checks one training
step against the one-process run and writes ``ok <rank> <world>`` to $MOESAIC_TEST_OUT/<rank>."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moesaic  # noqa: E402
from _dist_workers import check_equivalence  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    ctx = moesaic.init_distributed(timeout_s=60)
    check_equivalence(ctx.rank, ctx.world_size, ctx, 31, steps=1, experts=(4,))
    with open(os.path.join(os.environ["MOESAIC_TEST_OUT"], str(ctx.rank)), "w") as f:
        f.write(f"ok {ctx.rank} {ctx.world_size} {os.environ.get('GROUP_RANK')}")
    moesaic.destroy()


if __name__ == "__main__":
    main()

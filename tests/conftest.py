import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def one_thread():
    """Tiny shapes: one torch thread avoids oversubscription on a shared 2-core box. Modules of
    such tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def reset_parallel_state():
    """Each test starts and ends as a fresh single process: no parallel context installed by
    init_distributed and no layer-seed base left by moe_set_seed."""
    from moesaic.parallel.layout import set_context, set_layer_seed_base

    set_context(None)
    set_layer_seed_base(None)
    yield
    set_context(None)
    set_layer_seed_base(None)

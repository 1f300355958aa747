import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


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

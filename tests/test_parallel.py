"""Expert parallelism in real processes on gloo: equivalence with one process, layouts,
replicated experts, a two-agent torchrun job and failing ranks. (~100 s on the shared 2-core box.)"""
import os
import subprocess
import sys
import time

import pytest

from _dist_harness import free_port, run_ranks
import _dist_workers as workers

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_ranks_match_one_process():
    """ep 2: dropless (pyramid [4, 2], clipping) and capacity-with-room, three AdamW steps each;
    aux loss per rank; one replicated expert; per-rank noise; grad checkpointing; deep copies;
    recovery from a backward that raised; set-up rules; model mismatch fails at set-up."""
    assert run_ranks(workers.two_ranks, 2, timeout=120) == [True, True]


def test_four_ranks_ep2_edp2_and_pyramid():
    """ep 2 x edp 2, the [2, 4] pyramid on 4 ranks (2-expert layer replicated twice), and the
    same experts for max_ep_size 1, 2 and 4."""
    assert run_ranks(workers.four_ranks, 4, timeout=150) == [True] * 4


def test_triton_ops_through_all_to_all():
    pytest.importorskip("triton")
    assert run_ranks(workers.triton_ops_match_torch, 2, timeout=120) == [True, True]


def test_rank_raising_mid_step_ends_the_others():
    results = run_ranks(workers.dies_mid_step, 2, "raise", 20.0, timeout=60, allow_errors=True)
    assert results[1][0] == "error" and "fails on purpose" in results[1][1]
    status, (kind, msg, elapsed, timeout_s) = results[0]
    assert status == "ok" and kind == "CommError", results[0]
    assert "peer rank" in msg and "[0, 1]" in msg
    assert elapsed < timeout_s


def test_stalled_rank_times_out_with_clear_error():
    results = run_ranks(workers.dies_mid_step, 2, "hang", 2.0, timeout=60)
    kind, msg, elapsed, timeout_s = results[0]
    assert kind == "CommError" and "timeout" in msg, results[0]
    assert timeout_s <= elapsed < timeout_s + 5
    assert results[1][0] == "slept"


def test_two_torchrun_agents_nnodes_2(tmp_path):
    """The multi-machine path: two torchrun agents (one per 'node') meet at a c10d rendezvous
    on 127.0.0.1, one process each."""
    port = free_port()
    env = dict(os.environ, MOESAIC_TEST_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=moesaic-test",
           "--max-restarts=0", "--monitor-interval=0.2",
           os.path.join(HERE, "_dist_torchrun_main.py")]
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    outputs = []
    for a in agents:
        try:
            outputs.append(a.communicate(timeout=max(1, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for b in agents:
                b.kill()
            pytest.fail("torchrun agents did not finish within 120 s")
    assert [a.returncode for a in agents] == [0, 0], "\n".join(outputs)
    done = sorted(open(tmp_path / r).read() for r in os.listdir(tmp_path))
    assert [d.split()[:3] for d in done] == [["ok", "0", "2"], ["ok", "1", "2"]]
    assert sorted(d.split()[3] for d in done) == ["0", "1"]  # two distinct nodes (GROUP_RANK)

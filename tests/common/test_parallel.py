"""Mesh and multi-process start-up checks that need no second process."""

import time

import jax
import numpy as np
import pytest

from common import parallel
from tests.conftest import free_port, run_python


def test_mesh_spans_all_devices_and_replicate_round_trips():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    tree = {"a": np.arange(6.0).reshape(2, 3), "b": np.int32(4)}
    back = parallel.to_host(parallel.replicate(mesh, tree))
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert int(back["b"]) == 4
    sharded = parallel.shard_batch(mesh, np.arange(12.0).reshape(3, 4), axis=1)
    assert sharded.shape == (3, 4)
    assert tuple(sharded.sharding.spec) == (None, "data")


def test_bad_multi_process_flags_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="needs --coordinator_address"):
        parallel.initialize_distributed(None, 2, 0)
    with pytest.raises(ValueError, match=r"--process_id=2 is outside 0..1"):
        parallel.initialize_distributed("localhost:1234", 2, 2)
    with pytest.raises(ValueError, match="--num_processes is 1"):
        parallel.initialize_distributed("localhost:1234", 1, 0)
    with pytest.raises(ValueError, match="not host:port"):
        parallel.wait_for_coordinator("localhost", 1)


def test_an_unreachable_coordinator_times_out_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="No coordinator answered at 127.0.0.1:1 within 1"):
        parallel.initialize_distributed("127.0.0.1:1", 2, 1, timeout_s=1)
    assert time.monotonic() - start < 30


def test_a_process_count_no_other_process_joins_fails_after_the_timeout_naming_the_flags(tmp_path):
    """Process 0 of a run whose `--num_processes` counts a process that never starts."""
    address = f"localhost:{free_port()}"
    start = time.monotonic()
    proc = run_python(["-m", "launch.gan", f"--workdir={tmp_path}", "--num_processes=2",
                       "--process_id=0", f"--coordinator_address={address}",
                       "--distributed_timeout=2"], check=False, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 100
    assert (f"did not all start with --coordinator_address={address} and --num_processes=2"
            in proc.stderr)
    assert not (tmp_path / "checkpoints").exists()

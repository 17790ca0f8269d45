"""The GAN launcher end to end: the sharded step, the demo, NaN and bad input (kill and resume and
several processes: tests/test_scale_out.py)."""

import dataclasses
import re
import textwrap

import jax
import numpy as np
import pytest

from common import checkpoints, metrics, workdirs
from common import config as config_lib
from gan import train
from tests.conftest import run_python

TINY_FLAGS = ["--model=mlp", "--dataset=digits", "--batch_size=32", "--loss=minimax",
              "--schedule=sequential", "--optimizer=sgd_momentum", "--learning_rate=0.1",
              "--log_every=1", "--sample_every=1000"]


def _final_params(workdir, config):
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    ckpts = checkpoints.Checkpoints(workdir, save_every=1)
    restored, step = ckpts.restore_latest(state)
    ckpts.close()
    return restored, step


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh
    from common import parallel
    from gan import train
    assert jax.device_count() == 4, jax.devices()
    # SGD: Adam's m / sqrt(v) turns float noise in a near-zero gradient into a step of size lr.
    config = train.Config(model="dcgan", schedule="sequential", d_steps=2, batch_size=8, seed=5,
                          optimizer="sgd_momentum", learning_rate=0.05)
    real = np.random.default_rng(0).uniform(-1, 1, (2, 8, 28, 28, 1)).astype(np.float32)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        state = parallel.replicate(mesh, train.create_train_state(config, jax.random.PRNGKey(0)))
        step = train.jit_train_step(config, mesh)
        for _ in range(2):
            state, m = step(state, parallel.shard_batch(mesh, real, axis=1))
        assert len(state.d_params["conv0"]["kernel"].sharding.device_set) == len(devices)
        results.append(parallel.to_host((state.g_params, state.g_batch_stats, state.d_params, m)))
    flat = [jax.tree.leaves(r) for r in results]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(*flat))
    print("MAXDIFF", diff)
    try:
        parallel.check_global_batch(6, parallel.make_mesh())
    except ValueError as e:
        print("ERROR", e)
""")


@pytest.mark.slow
def test_sharded_step_on_4_devices_equals_the_single_device_step():
    proc = run_python(["-c", SHARDED_SCRIPT],
                      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    diff = float(re.search(r"MAXDIFF (\S+)", proc.stdout).group(1))
    assert diff < 1e-5, proc.stdout
    assert "batch size 6 is not divisible by the 4 devices" in proc.stdout


@pytest.mark.slow
def test_demo_config_runs_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    run_python(["-m", "launch.gan", "--flagfile=launch/configs/demo.flags", f"--workdir={workdir}",
                "--num_steps=3", "--log_every=1", "--checkpoint_every=3", "--sample_every=3"])
    assert (workdir / "samples.png").exists()
    assert (workdir / "samples" / "step_0000003.png").exists()
    assert (workdir / "losses.png").exists() and (workdir / "flags.txt").exists()
    rows = metrics.read_metrics(str(workdir))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(rows[0])
    assert (workdir / "checkpoints" / "3").is_dir()
    assert list((workdir / "tensorboard").iterdir())


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = train.Config(model="mlp", dataset="digits", batch_size=32, optimizer="sgd_momentum",
                          learning_rate=1e12, num_steps=30, checkpoint_every=1, log_every=10,
                          sample_every=1000)
    with pytest.raises(FloatingPointError, match=r"Non-finite metrics at step \d+") as error:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    last_good = int(re.search(r"checkpoint \(step (\d+)\)", str(error.value)).group(1))
    assert last_good == bad_step - 1
    restored, step = _final_params(str(tmp_path), config)
    assert step == last_good
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))


def test_max_minutes_stops_at_a_checkpoint_and_the_same_command_continues(tmp_path):
    config = train.Config(model="mlp", dataset="digits", batch_size=32, optimizer="sgd_momentum",
                          learning_rate=0.1, num_steps=6, checkpoint_every=2, log_every=1,
                          sample_every=1000, max_minutes=1e-9)
    train.train_and_evaluate(config, str(tmp_path / "limited"))
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path / "limited"))] == [1, 2]
    assert _final_params(str(tmp_path / "limited"), config)[1] == 2
    assert (tmp_path / "limited" / "samples.png").exists()  # the pictures of where it stopped
    continued = train.train_and_evaluate(dataclasses.replace(config, max_minutes=0.0),
                                         str(tmp_path / "limited"))  # resumes: tested elsewhere
    assert int(continued.step) == 6
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path / "limited"))] == list(
        range(1, 7))
    with pytest.raises(ValueError, match="max_minutes must be >= 0"):
        dataclasses.replace(config, max_minutes=-1.0).validate()


def test_a_workdir_of_another_configuration_is_refused(tmp_path):
    started = train.Config(model="mlp", dataset="digits", batch_size=32, loss="minimax",
                           schedule="sequential", optimizer="sgd_momentum", learning_rate=0.1,
                           log_every=1, sample_every=1000, num_steps=1)
    with workdirs.claim(str(tmp_path), config_lib.to_dict(started)):
        pass
    proc = run_python(["-m", "launch.gan", f"--workdir={tmp_path}", "--num_steps=1", *TINY_FLAGS,
                       "--loss=non_saturating"], check=False)
    assert proc.returncode != 0
    assert "different configuration (loss: 'minimax' -> 'non_saturating'" in proc.stderr
    assert "--overwrite" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing of the refused run was written


def test_unknown_flag_values_name_the_allowed_ones(tmp_path):
    proc = run_python(["-m", "launch.gan", f"--workdir={tmp_path}", "--loss=lsgan"], check=False)
    assert proc.returncode != 0
    assert "minimax" in proc.stderr and "non_saturating" in proc.stderr
    with pytest.raises(ValueError, match="choose one of mnist, fashion_mnist, kmnist, digits"):
        train.Config(dataset="cifar").validate()
    with pytest.raises(ValueError, match="use --schedule=sequential"):
        train.Config(d_steps=3).validate()

"""The GAN launcher end to end: sharding, several processes, kill and resume, bad input."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

from common import checkpoints, metrics
from gan import train
from tests.conftest import REPO, run_python

TINY_FLAGS = ["--model=mlp", "--dataset=digits", "--batch_size=32", "--loss=minimax",
              "--schedule=sequential", "--optimizer=sgd_momentum", "--learning_rate=0.1",
              "--log_every=1", "--sample_every=1000"]


def _fingerprint(output: str) -> str:
    return re.findall(r"Parameter fingerprint at step \d+: (\S+)", output)[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


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
    config = train.Config(model="dcgan", schedule="sequential", d_steps=2, batch_size=8, seed=5)
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


def test_sharded_step_on_4_devices_equals_the_single_device_step():
    proc = run_python(["-c", SHARDED_SCRIPT],
                      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    diff = float(re.search(r"MAXDIFF (\S+)", proc.stdout).group(1))
    assert diff < 1e-4, proc.stdout
    assert "batch size 6 is not divisible by the 4 devices" in proc.stdout


def test_two_processes_through_jax_distributed_hold_identical_parameters(tmp_path):
    port = _free_port()
    workdir = str(tmp_path / "run")
    args = ["-m", "launch.gan", f"--workdir={workdir}", "--num_steps=4", "--checkpoint_every=2",
            *TINY_FLAGS, "--num_processes=2", f"--coordinator_address=localhost:{port}",
            "--distributed_timeout=120"]
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, *args, f"--process_id={i}"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert _fingerprint(outputs[0]) == _fingerprint(outputs[1])
    assert "global batch 32 = 2 devices x 16, 2 processes" in outputs[0]
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one copy: process 1 wrote nothing

    # The checkpoint written by 2 processes restores in this 1-process run.
    config = train.Config(**{**json.load(open(os.path.join(workdir, "config.json")))})
    _, step = _final_params(workdir, config)
    assert step == 4


def test_kill_after_a_checkpoint_then_rerun_ends_like_an_uninterrupted_run(tmp_path):
    flags = ["--num_steps=12", "--checkpoint_every=3", *TINY_FLAGS]
    straight = run_python(["-m", "launch.gan", f"--workdir={tmp_path / 'straight'}", *flags])

    workdir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "launch.gan", f"--workdir={workdir}", *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "3").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_python(cmd[1:])
    assert "Resumed from the checkpoint of step" in resumed.stderr or proc.returncode == 0
    assert _fingerprint(resumed.stderr) == _fingerprint(straight.stderr)

    config = train.Config(**json.load(open(workdir / "config.json")))
    a, _ = _final_params(str(tmp_path / "straight"), config)
    b, step = _final_params(str(workdir), config)
    assert step == 12
    chex.assert_trees_all_equal(a, b)
    drop = ("steps_per_s", "images_per_s")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in metrics.read_metrics(d)]
            for d in (tmp_path / "straight", workdir)]
    assert rows[0] == rows[1] and len(rows[0]) == 12


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


def test_a_workdir_of_another_configuration_is_refused(tmp_path):
    started = train.Config(model="mlp", dataset="digits", batch_size=32, loss="minimax",
                           schedule="sequential", optimizer="sgd_momentum", learning_rate=0.1,
                           log_every=1, sample_every=1000, num_steps=1)
    checkpoints.claim_workdir(str(tmp_path), dataclasses.asdict(started))
    proc = run_python(["-m", "launch.gan", f"--workdir={tmp_path}", "--num_steps=1", *TINY_FLAGS,
                       "--loss=non_saturating"], check=False)
    assert proc.returncode != 0
    assert "different configuration (loss: 'minimax' -> 'non_saturating')" in proc.stderr
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

"""Every launcher through preemption, damage, a second writer, several devices and processes.

For each launcher a tiny run goes to `Launcher.steps` steps on one device without interruption;
then the same run is (a) killed with SIGKILL in the middle of writing a checkpoint chosen by the
test's seed, its newest finished checkpoint damaged, and run again; (b) run by 2 processes of 2
simulated devices each through `jax.distributed` (gloo) up to an earlier checkpoint, which 1
process on 1 device restores to finish the run; (c) sent SIGTERM once it holds its workdir (while
a second run on the same workdir is refused), then run again. All must end with the uninterrupted
run's parameters (compared through the fingerprint every launcher logs) and metrics: exactly for
(a) and (c), to float tolerance for (b), whose reductions sum in another order over 4 devices.

Most of each launcher process's time is starting Python and JAX and tracing the steps, so the
test starts as few of them as covers each case: (a) is one restart for two kinds of damage.
"""

import dataclasses
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from common import metrics
from common import workdirs
from tests.conftest import (REPO, kill_when_exists, logged_fingerprint, run_processes, run_python,
                            subprocess_env)

CHECKPOINT_EVERY = 2
SEED = 20261127


@dataclasses.dataclass(frozen=True)
class Launcher:
    module: str
    flags: tuple[str, ...]
    steps_flag: str = "num_steps"  # the flag that sets the run's length in steps
    steps: int = 8  # the run's length (NAS: a shorter budget, each step trains new children)


LAUNCHERS = {
    "gan": Launcher("launch.gan", (
        "--model=mlp", "--dataset=digits", "--batch_size=32", "--loss=minimax",
        "--schedule=sequential", "--optimizer=sgd_momentum", "--learning_rate=0.1",
        "--log_every=1", "--sample_every=4")),
    "learned_optimizer": Launcher("launch.learned_optimizer", (
        "--task=quadratic", "--hidden_size=8", "--meta_batch_size=8", "--horizon=10",
        "--unroll_length=5", "--log_every=1", "--validate_every=2", "--num_validation_tasks=8",
        "--evaluate=false")),
    "maml": Launcher("launch.maml", (
        "--dataset=sinusoid", "--shots=5", "--queries=5", "--meta_batch_size=8", "--log_every=1",
        "--eval_every=6", "--eval_episodes_during_training=8",
        "--evaluate=false")),
    "nas": Launcher("launch.nas", (
        "--algorithm=reinforce", "--architectures_per_step=1", "--controller_hidden_size=8",
        "--controller_num_layers=1", "--controller_learning_rate=0.05", "--space=cnn",
        "--child_dataset=digits", "--num_layers=1", "--filter_sizes=1", "--filter_sizes=3",
        "--num_filters=4", "--num_filters=8", "--strides=1", "--strides=2",
        "--child_batch_size=8", "--child_validation_size=200", "--final_num_steps=10",
        "--log_every=1", "--child_num_steps=10", "--child_steps_per_call=2",
        "--max_proposals_factor=1"), steps_flag="budget", steps=6),
}


def command(launcher: Launcher, workdir, num_steps: int) -> list[str]:
    return ["-m", launcher.module, f"--workdir={workdir}", f"--{launcher.steps_flag}={num_steps}",
            f"--checkpoint_every={CHECKPOINT_EVERY}", *launcher.flags]


def resumed_step(output: str) -> int:
    found = re.findall(r"Resumed from the checkpoint of (?:meta-)?step (\d+)", output)
    assert len(found) == 1, output[-3000:]
    return int(found[0])


def metric_rows(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock rates."""
    return [{k: v for k, v in row.items() if not k.endswith("_per_s")}
            for row in metrics.read_metrics(str(workdir))]


def assert_rows_close(rows, expected, rtol):
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for row, want in zip(rows, expected):
        assert row.keys() == want.keys()
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=rtol, abs=1e-6), (row["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_killed_sharded_and_multi_process_runs_end_like_an_uninterrupted_run(name, tmp_path):
    launcher = LAUNCHERS[name]
    steps = launcher.steps
    straight = run_python(command(launcher, tmp_path / "straight", steps))
    expected = logged_fingerprint(straight.stderr)
    expected_rows = metric_rows(tmp_path / "straight")

    # (a) SIGKILL while checkpoint `kill_at` is being written, and the finished checkpoint before
    # it damaged (a file truncated): the run moves that one aside and resumes from the one before.
    kill_at = random.Random(f"{SEED}-{name}").choice(range(3 * CHECKPOINT_EVERY, steps + 1,
                                                           CHECKPOINT_EVERY))
    killed = tmp_path / "killed"
    checkpoints = killed / "checkpoints"
    kill_when_exists(command(launcher, killed, steps),
                     checkpoints / f"{kill_at}.orbax-checkpoint-tmp")
    assert not (checkpoints / str(kill_at)).exists(), "the kill landed after the save finished"
    assert glob.glob(str(checkpoints / f"{kill_at}.orbax-checkpoint-tmp*"))
    damaged = kill_at - CHECKPOINT_EVERY
    files = glob.glob(str(checkpoints / str(damaged) / "state" / "**" / "d" / "*"), recursive=True)
    os.truncate(max(files, key=os.path.getsize), 10)
    resumed = run_python(command(launcher, killed, steps))
    assert f"checkpoints/{damaged} is damaged" in resumed.stderr
    assert resumed_step(resumed.stderr) == damaged - CHECKPOINT_EVERY
    assert logged_fingerprint(resumed.stderr) == expected
    assert metric_rows(killed) == expected_rows

    # (b) Two processes of 2 simulated devices each, the same global batch over 4 devices, to an
    # earlier checkpoint; then one process on one device finishes from that checkpoint.
    shared = tmp_path / "two"
    outputs = run_processes(command(launcher, shared, steps - CHECKPOINT_EVERY),
                            env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert logged_fingerprint(outputs[0]) == logged_fingerprint(outputs[1])
    assert "process 1 of 2, 2 local / 4 global devices" in outputs[1]
    assert len(os.listdir(shared / "tensorboard")) == 1, "only process 0 writes event files"
    two_rows = metric_rows(shared)  # one copy: a second writer would repeat the steps
    assert_rows_close(two_rows, expected_rows[:len(two_rows)], rtol=1e-4)
    finished = run_python(command(launcher, shared, steps))
    assert resumed_step(finished.stderr) == steps - CHECKPOINT_EVERY
    assert float(logged_fingerprint(finished.stderr)) == pytest.approx(float(expected), rel=1e-5)

    # (c) SIGTERM once the run holds its workdir (the process stopped meanwhile, so that a second
    # run on the same workdir finds it alive and is refused); it saves at the next step boundary.
    preempted = tmp_path / "preempted"
    proc = subprocess.Popen([sys.executable, *command(launcher, preempted, steps)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while not (preempted / workdirs.LOCK_FILE).exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    second = run_python(command(launcher, preempted, steps), check=False)
    assert second.returncode != 0
    assert f"is in use by process {proc.pid}" in second.stderr.strip().splitlines()[-1]
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped = re.findall(r"Stopped by SIGTERM after saving the checkpoint of step (\d+)", output)
    assert stopped and 0 < int(stopped[0]) < steps, output[-3000:]
    resumed = run_python(command(launcher, preempted, steps))
    assert resumed_step(resumed.stderr) == int(stopped[0])
    assert logged_fingerprint(resumed.stderr) == expected
    assert metric_rows(preempted) == expected_rows


"""Every launcher through preemption, on several devices and on several processes.

For each launcher a tiny run goes to `STEPS` steps on one device without interruption; then the
same run is (a) killed with SIGKILL in the middle of writing a checkpoint chosen by the test's seed
and run again, and (b) run by 2 processes of 2 simulated devices each through `jax.distributed`
(gloo) up to an earlier checkpoint, which 1 process on 1 device restores to finish the run. Both
must end with the uninterrupted run's parameters (compared through the fingerprint every launcher
logs) and metrics: exactly for (a), to float tolerance for (b), whose reductions sum in another
order over 4 devices.
"""

import dataclasses
import glob
import os
import random
import re

import pytest

from common import metrics
from tests.conftest import kill_when_exists, logged_fingerprint, run_processes, run_python

STEPS = 6
CHECKPOINT_EVERY = 2
SEED = 20261127


@dataclasses.dataclass(frozen=True)
class Launcher:
    module: str
    flags: tuple[str, ...]
    steps_flag: str = "num_steps"  # the flag that sets the run's length in steps


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
        "--dataset=sinusoid", "--shots=5", "--queries=5", "--batch_size=8", "--log_every=1",
        "--eval_every=4", "--eval_episodes_during_training=8",
        "--evaluate=false")),
    "nas": Launcher("launch.nas", (
        "--algorithm=reinforce", "--architectures_per_step=1", "--controller_hidden_size=8",
        "--controller_num_layers=1", "--learning_rate=0.05", "--space=cnn", "--dataset=digits",
        "--num_layers=1", "--filter_sizes=3", "--num_filters=4", "--strides=1", "--strides=2",
        "--batch_size=8", "--validation_size=200", "--final_num_steps=10", "--log_every=1",
        "--num_steps=10"), steps_flag="budget"),
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


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_killed_sharded_and_multi_process_runs_end_like_an_uninterrupted_run(name, tmp_path):
    launcher = LAUNCHERS[name]
    straight = run_python(command(launcher, tmp_path / "straight", STEPS))
    expected = logged_fingerprint(straight.stderr)
    expected_rows = metric_rows(tmp_path / "straight")

    # (a) SIGKILL while checkpoint `kill_at` is being written: the one before it stays usable.
    kill_at = random.Random(f"{SEED}-{name}").choice(range(2 * CHECKPOINT_EVERY, STEPS + 1,
                                                           CHECKPOINT_EVERY))
    killed = tmp_path / "killed"
    checkpoints = killed / "checkpoints"
    kill_when_exists(command(launcher, killed, STEPS),
                     checkpoints / f"{kill_at}.orbax-checkpoint-tmp")
    assert not (checkpoints / str(kill_at)).exists(), "the kill landed after the save finished"
    assert glob.glob(str(checkpoints / f"{kill_at}.orbax-checkpoint-tmp*"))
    resumed = run_python(command(launcher, killed, STEPS))
    assert resumed_step(resumed.stderr) == kill_at - CHECKPOINT_EVERY
    assert logged_fingerprint(resumed.stderr) == expected
    assert metric_rows(killed) == expected_rows

    # (b) Two processes of 2 simulated devices each, the same global batch over 4 devices, to an
    # earlier checkpoint; then one process on one device finishes from that checkpoint.
    shared = tmp_path / "two"
    outputs = run_processes(command(launcher, shared, STEPS - CHECKPOINT_EVERY),
                            env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert logged_fingerprint(outputs[0]) == logged_fingerprint(outputs[1])
    assert "process 1 of 2, 2 local / 4 global devices" in outputs[1]
    assert len(os.listdir(shared / "tensorboard")) == 1, "only process 0 writes event files"
    two_rows = metric_rows(shared)  # one copy: a second writer would repeat the steps
    assert_rows_close(two_rows, expected_rows[:len(two_rows)], rtol=1e-4)
    finished = run_python(command(launcher, shared, STEPS))
    assert resumed_step(finished.stderr) == STEPS - CHECKPOINT_EVERY
    assert float(logged_fingerprint(finished.stderr)) == pytest.approx(float(expected), rel=1e-5)

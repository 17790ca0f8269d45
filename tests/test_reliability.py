"""What a workdir guarantees (common/workdirs.py, common/checkpoints.py, common/metrics.py): one
writer, the configuration stored with the checkpoints, damaged checkpoints moved aside, changed
bytes detected, a full disk reported in one line, strict-JSON metrics, gaps reported. The launchers
go through the same code; tests/test_scale_out.py runs each launcher through preemption, a second
writer and a damaged newest checkpoint."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import checkpoints, metrics, workdirs
from common.data import CorruptDataError
from nas.search_space import MacroBenchmark
from tests.conftest import run_python

CONFIG = {"learning_rate": 0.1, "num_steps": 10, "eval": {"every": 2}}


def state(value: float = 0.0):
    return {"w": jnp.arange(1000, dtype=jnp.float32) + value, "step": jnp.int32(value)}


def write_checkpoints(path, steps=(2, 4, 6), config=CONFIG):
    with workdirs.claim(str(path), config):
        with checkpoints.Checkpoints(str(path), 2, config=config) as ckpts:
            for step in steps:
                ckpts.save(step, state(step), force=True)


def largest_array_file(path, step) -> str:
    pattern = path / "checkpoints" / str(step) / "state" / "**" / "d" / "*"
    return max(glob.glob(str(pattern), recursive=True), key=os.path.getsize)


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    with workdirs.claim(str(tmp_path), CONFIG):
        with pytest.raises(workdirs.WorkdirError, match=f"in use by process {os.getpid()}"):
            with workdirs.claim(str(tmp_path), CONFIG):
                pass
        assert json.load(open(tmp_path / workdirs.LOCK_FILE))["pid"] == os.getpid()
    assert not (tmp_path / workdirs.LOCK_FILE).exists(), "released on exit"


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / workdirs.LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": __import__("socket").gethostname()}))
    with workdirs.claim(str(tmp_path), CONFIG):
        assert json.load(open(tmp_path / workdirs.LOCK_FILE))["pid"] == os.getpid()
    assert f"from process {dead.pid}" in caplog.text


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(workdirs.WorkdirError, match="is a file, not a directory"):
        with workdirs.claim(str(path), CONFIG):
            pass


def test_the_config_stored_in_the_checkpoints_refuses_another_config(tmp_path):
    write_checkpoints(tmp_path)
    os.remove(tmp_path / workdirs.CONFIG_FILE)
    other = {**CONFIG, "learning_rate": 0.2}
    token = workdirs.RECORDS.set({"flags.txt": "--learning_rate=0.2"})
    try:
        with pytest.raises(workdirs.WorkdirConflictError,
                           match=r"learning_rate: 0.1 -> 0.2; from the checkpoint of step 6"):
            with workdirs.claim(str(tmp_path), other, resumable_keys=("num_steps",)):
                pass
    finally:
        workdirs.RECORDS.reset(token)
    assert not (tmp_path / "flags.txt").exists(), "flags.txt is written only for an accepted run"
    assert not (tmp_path / workdirs.CONFIG_FILE).exists()
    # A resumable key may change; the same config is accepted and its records written.
    token = workdirs.RECORDS.set({"flags.txt": "--num_steps=20"})
    try:
        with workdirs.claim(str(tmp_path), {**CONFIG, "num_steps": 20},
                           resumable_keys=("num_steps",)):
            pass
    finally:
        workdirs.RECORDS.reset(token)
    assert (tmp_path / "flags.txt").read_text() == "--num_steps=20"
    # Nested keys are compared flag-style.
    with pytest.raises(workdirs.WorkdirConflictError, match="eval_every: 2 -> 3"):
        with workdirs.claim(str(tmp_path), {**CONFIG, "eval": {"every": 3}}):
            pass


def test_truncated_config_json_is_named(tmp_path):
    write_checkpoints(tmp_path, steps=(2,))
    path = tmp_path / workdirs.CONFIG_FILE
    path.write_text(path.read_text()[:10])
    with pytest.raises(workdirs.WorkdirError, match=f"{path} is not valid JSON"):
        with workdirs.claim(str(tmp_path), CONFIG):
            pass


def test_a_checkpoint_past_num_steps_is_refused(tmp_path):
    write_checkpoints(tmp_path)
    with pytest.raises(workdirs.WorkdirError, match="checkpoint of step 6, past the requested 5"):
        with workdirs.claim(str(tmp_path), CONFIG, num_steps=5):
            pass


@pytest.mark.parametrize("damage", ["truncated", "bytes_changed"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_saved_again(tmp_path, damage, caplog):
    write_checkpoints(tmp_path)
    path = largest_array_file(tmp_path, 6)
    size = os.path.getsize(path)
    if damage == "truncated":
        os.truncate(path, size // 2)
    else:  # 64 random bytes, the size unchanged: the files still parse
        with open(path, "r+b") as f:
            f.seek(size // 2)
            f.write(np.random.default_rng(0).bytes(64))
        assert os.path.getsize(path) == size
    with checkpoints.Checkpoints(str(tmp_path), 2, config=CONFIG) as ckpts:
        restored, step = ckpts.restore_latest(state())
        assert step == 4 and ckpts.last_good == 4
        np.testing.assert_array_equal(restored["w"], state(4)["w"])
        ckpts.save(6, state(6), force=True)  # the same step again, no StepAlreadyExistsError
    assert (tmp_path / "checkpoints" / "6.damaged").is_dir()
    damaged_lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged_lines) == 1 and "\n" not in damaged_lines[0]
    with checkpoints.Checkpoints(str(tmp_path), 2, config=CONFIG) as ckpts:
        assert ckpts.restore_latest(state())[1] == 6


def test_checksums_see_every_word_and_every_dtype():
    tree = {"f": jnp.ones((3, 5)), "i": jnp.arange(4), "b": jnp.array([True, False]),
            "h": jnp.ones(3, jnp.bfloat16), "k": jax.random.PRNGKey(3)}
    base = checkpoints.checksums(tree)
    assert base == checkpoints.checksums(jax.tree.map(jnp.copy, tree))
    for name, changed in [("f", tree["f"].at[2, 4].set(1.0000001)), ("i", tree["i"].at[0].add(1)),
                          ("b", tree["b"].at[1].set(True)), ("h", tree["h"].at[0].set(2)),
                          ("k", tree["k"].at[1].add(1))]:
        assert checkpoints.checksums({**tree, name: changed}) != base, name
    swapped = tree["f"].at[0, 0].set(2.0).at[0, 1].set(0.0)  # a permutation-invariant sum misses
    assert checkpoints.checksums({**tree, "f": swapped}) != checkpoints.checksums(
        {**tree, "f": tree["f"].at[0, 0].set(0.0).at[0, 1].set(2.0)})


def test_a_full_disk_stops_the_save_with_one_line(tmp_path, monkeypatch):
    write_checkpoints(tmp_path, steps=(2,))
    with checkpoints.Checkpoints(str(tmp_path), 2, config=CONFIG) as ckpts:
        ckpts.restore_latest(state())
        usage = checkpoints.shutil.disk_usage(ckpts.directory)
        monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                            lambda _: usage._replace(free=1234))
        with pytest.raises(checkpoints.CheckpointError) as error:
            ckpts.save(4, state(4), force=True)
    message = str(error.value)
    assert "\n" not in message and "1,234 bytes free" in message and str(tmp_path) in message
    assert "checkpoint of step 2 is intact" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_metrics_stay_strict_json_and_a_non_finite_value_stops(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": 1.0})
    with pytest.raises(FloatingPointError, match=r"step 2: \{'accuracy': nan\}"):
        writer.write(2, {"accuracy": float("nan"), "loss": 0.5})
    lines = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
    assert [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in lines] == [
        {"step": 1, "loss": 1.0}]
    pending = metrics.PendingMetrics(last_checkpoint=4)
    with pytest.raises(FloatingPointError, match=r"last good checkpoint \(step 4\) is intact"):
        pending.check(5, {"test_accuracy": np.float32("inf")})


def test_missing_metrics_rows_are_reported_on_resume(tmp_path, caplog):
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    for step in (10, 20, 30, 40):
        writer.write(step, {"loss": 1.0})
    rows = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
    (tmp_path / metrics.METRICS_FILE).write_text("\n".join([rows[0], rows[3]]) + "\n")
    metrics.MetricWriter(str(tmp_path), resume_step=40, tensorboard=False, log_every=10)
    assert "lacks the rows of 2 logged steps before the checkpoint of step 40 (steps 20 to 30)" \
        in caplog.text


@pytest.mark.parametrize("deleted", [False, True])
def test_resume_checks_the_rows_against_the_interval_they_were_logged_at(tmp_path, caplog,
                                                                        deleted):
    """Logged every 10 steps up to the checkpoint of step 40, continued with --log_every=5: no
    rows are missing (steps 5, 15, ... were never due), unless one of the 10s was deleted."""
    state = {"w": np.zeros(3, np.float32)}
    with checkpoints.resume(str(tmp_path), 40, {"log_every": 10}, state, 10) as (ckpts, _, _, w):
        for step in (10, 20, 30, 40):
            w.write(step, {"loss": 1.0})
        ckpts.save(40, state, force=True)
    if deleted:
        rows = (tmp_path / metrics.METRICS_FILE).read_text().splitlines()
        (tmp_path / metrics.METRICS_FILE).write_text("\n".join(rows[:1] + rows[2:]) + "\n")
    with checkpoints.resume(str(tmp_path), 40, {"log_every": 5}, state, 5) as (_, _, start, _):
        assert start == 40
    assert ("lacks the rows of 1 logged steps before the checkpoint of step 40 (steps 20 to 20)"
            in caplog.text) == deleted
    assert ("lacks the rows" in caplog.text) == deleted


@pytest.mark.parametrize("launcher, flags, message", [
    ("gan", ["--num_steps=0"], "Error: num_steps must be positive, got 0."),
    ("gan", ["--num_steps=-5"], "Error: num_steps must be positive, got -5."),
    ("learned_optimizer", ["--workdir={file}"], "Error: --workdir {file} is a file, not a "
                                                 "directory; pass a directory."),
])
def test_bad_input_ends_with_one_line(tmp_path, launcher, flags, message):
    file = tmp_path / "a_file"
    file.write_text("")
    flags = [f.format(file=file) for f in flags]
    if not any(f.startswith("--workdir") for f in flags):
        flags.append(f"--workdir={tmp_path / 'run'}")
    proc = run_python(["-m", f"launch.{launcher}", *flags], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == message.format(file=file)
    assert not (tmp_path / "run").exists()


def test_a_truncated_nas_bench_macro_file_is_named(tmp_path):
    path = tmp_path / "nas-bench-macro_cifar10.json"
    path.write_text('{"00000000": {"test_acc": [90.1, 90')
    with pytest.raises(CorruptDataError, match=f"{path} is not valid JSON"):
        MacroBenchmark(str(tmp_path))

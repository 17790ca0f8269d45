"""Checkpoints (restore latest, skip unreadable, refuse another config), metrics, pictures."""

import json
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from common import checkpoints, images, metrics, workdirs


def _state(value):
    return {"w": np.full((3, 2), value, np.float32), "step": np.array(int(value), np.int32)}


def test_restore_latest_and_skip_an_unreadable_checkpoint(tmp_path):
    with checkpoints.Checkpoints(str(tmp_path), save_every=1, max_to_keep=3) as ckpts:
        for step in (1, 2, 3):
            ckpts.save(step, _state(step))
    with checkpoints.Checkpoints(str(tmp_path), save_every=1) as ckpts:
        restored, step = ckpts.restore_latest(_state(0))
    assert step == 3
    chex.assert_trees_all_equal(restored, _state(3))
    # Damage the newest checkpoint's array data: the previous one is restored instead.
    newest = tmp_path / "checkpoints" / "3"
    for root, _, files in os.walk(newest):
        for name in files:
            if "ocdbt" in root or name.startswith("manifest"):
                open(os.path.join(root, name), "wb").close()
    with checkpoints.Checkpoints(str(tmp_path), save_every=1) as ckpts:
        restored, step = ckpts.restore_latest(_state(0))
    assert step == 2
    chex.assert_trees_all_equal(restored, _state(2))


def test_no_checkpoint_gives_back_the_target(tmp_path):
    with checkpoints.Checkpoints(str(tmp_path), save_every=5) as ckpts:
        restored, step = ckpts.restore_latest(_state(7))
    assert step == 0
    chex.assert_trees_all_equal(restored, _state(7))


def claim(workdir, config, **kwargs):
    with workdirs.claim(workdir, config, **kwargs):
        pass


def test_claim_workdir(tmp_path):
    workdir = str(tmp_path / "run")
    claim(workdir, {"lr": 0.1, "num_steps": 10}, resumable_keys=["num_steps"])
    claim(workdir, {"lr": 0.1, "num_steps": 20}, resumable_keys=["num_steps"])
    with pytest.raises(workdirs.WorkdirConflictError, match=r"lr: 0.1 -> 0.2.*--overwrite"):
        claim(workdir, {"lr": 0.2, "num_steps": 20})
    open(os.path.join(workdir, "old_file"), "w").close()
    claim(workdir, {"lr": 0.2, "num_steps": 20}, overwrite=True)
    assert not os.path.exists(os.path.join(workdir, "old_file"))
    assert json.load(open(os.path.join(workdir, "config.json")))["lr"] == 0.2
    # A key added to the code after the run started counts as its default, and only as that.
    claim(workdir, {"lr": 0.2, "num_steps": 20, "split": "train"}, defaults={"split": "train"})
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"lr": 0.2, "num_steps": 20}, f)
    with pytest.raises(workdirs.WorkdirConflictError, match="split: 'train' -> 'test'"):
        claim(workdir, {"lr": 0.2, "num_steps": 20, "split": "test"}, defaults={"split": "train"})


def test_metric_writer_drops_rows_after_the_resumed_checkpoint(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": np.float32(step / 2), "vec": np.arange(2)})
    writer.close()
    assert metrics.read_metrics(str(tmp_path))[1] == {"step": 2, "loss": 1.0, "vec": [0, 1]}
    writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
    writer.write(3, {"loss": 9.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(str(tmp_path))] == [
        (1, 0.5), (2, 1.0), (3, 9.0)]
    assert os.listdir(tmp_path / "tensorboard")


def test_check_finite_names_the_step_and_metric():
    metrics.check_finite(3, {"loss": np.float32(1.0), "count": np.int32(2)}, None)
    with pytest.raises(FloatingPointError, match=r"step 7: \{'g_loss': nan\}.*step 5\) is intact"):
        metrics.check_finite(7, {"d_loss": 1.0, "g_loss": float("nan")}, 5)


def test_pending_metrics_come_back_in_order_and_name_the_first_bad_step():
    pending = metrics.PendingMetrics(last_checkpoint=None)
    for loss in (1.0, 2.0, 3.0):
        pending.add({"loss": jnp.float32(loss)})
    assert [float(r["loss"]) for r in pending.fetch(3)] == [1.0, 2.0, 3.0]
    pending.checkpointed(3)
    for loss in (4.0, float("inf"), float("nan")):
        pending.add({"loss": jnp.float32(loss)})
    with pytest.raises(FloatingPointError, match=r"step 5: \{'loss': inf\}.*step 3\) is intact"):
        pending.fetch(6)
    assert [metrics.due(d, 4, 10) for d in (3, 4, 8, 9, 10)] == [False, True, True, False, True]


def test_pending_metrics_keep_at_most_two_steps_in_flight():
    """`add` waits for the step two before the newest: a loop never runs far ahead of the device
    (a preemption is acted on within two steps)."""
    waited = []

    class Step:
        def __init__(self, i):
            self.i = i

        def block_until_ready(self):
            waited.append(self.i)
            return self

    pending = metrics.PendingMetrics(last_checkpoint=None)
    for i in range(5):
        pending.add({"loss": Step(i)})
        assert waited == list(range(max(0, i - 1))), (i, waited)


def test_image_grid_places_each_image():
    tiles = np.stack([np.full((2, 3, 1), v, np.uint8) for v in (10, 20, 30)])
    grid = images.image_grid(tiles, ncols=2, pad=1)
    assert grid.shape == (1 + 2 * 3, 1 + 2 * 4, 1)
    assert grid[1, 1, 0] == 10 and grid[1, 5, 0] == 20 and grid[4, 1, 0] == 30
    assert grid[4, 5, 0] == 255  # the empty cell stays white
    floats = images.image_grid(np.array([[[[-1.0]], [[1.0]]]]), value_range=(-1, 1), pad=0)
    assert floats[:, 0, 0].tolist() == [0, 255]


def test_pictures_are_written(tmp_path):
    path = images.save_image_grid(str(tmp_path / "a" / "grid.png"), np.zeros((4, 5, 5, 1)))
    curves = images.save_curves(str(tmp_path / "c.png"), {"x": ([0, 1], [1.0, 2.0])})
    from PIL import Image
    assert Image.open(path).size == ((2 * 7 + 2) * 3, (2 * 7 + 2) * 3)
    assert Image.open(curves).size[0] > 100

"""Meta-training end to end: sinusoid learning vs the pretrained baseline, resume, Omniglot from a
zip the test writes, and the sharded meta-step on 4 simulated devices."""

import dataclasses
import json
import textwrap
import zipfile

import jax
import numpy as np
import pytest

from common import checkpoints, metrics, omniglot, workdirs
from maml import evaluate, tasks, train
from maml.core import MetaConfig
from maml.evaluate import EvalConfig
from tests.conftest import run_python, shared_data
from tests.maml.test_tasks import write_tiny_archive


SINUSOID = train.Config(dataset="sinusoid", shots=10, queries=10, meta_batch_size=25,
                        inner=MetaConfig(lr=0.01), meta_lr=1e-3,
                        eval=EvalConfig(inner_steps=1, episodes=200, episodes_during_training=50,
                                        baseline_steps=1500, every=1000),
                        log_every=500, checkpoint_every=1000)


@pytest.mark.slow
def test_sinusoid_meta_training_beats_the_pretrained_baseline(tmp_path):
    config = dataclasses.replace(SINUSOID, num_steps=2000)
    train.train_and_evaluate(config, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    maml_mse = results["mse_vs_inner_steps"]["maml"]["10"][1][0]
    baseline_mse = results["mse_vs_inner_steps"]["pretrained"]["10"][1][0]
    maml_before = results["mse_vs_inner_steps"]["maml"]["10"][0][0]
    # Pretrained predicts about the mean sinusoid (MSE ~ E[A^2]/2 ~ 4) and one step barely helps.
    assert baseline_mse > 2.5
    assert maml_mse < 0.5 * baseline_mse, (maml_mse, baseline_mse)
    assert maml_mse < 0.8 * maml_before, "adaptation itself must lower the loss"
    for picture in ("sinusoid_fits.png", "mse_vs_inner_steps.png", "test_loss.png"):
        assert (tmp_path / picture).stat().st_size > 1000


def final_params(workdir, config):
    with checkpoints.Checkpoints(workdir, config.checkpoint_every) as ckpts:
        state, step = ckpts.restore_latest(train.create_train_state(config, jax.random.PRNGKey(0)))
    return step, jax.tree.map(np.asarray, state.meta_params)


def test_omniglot_end_to_end_from_archives(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_tiny_archive(data_dir / "images_background.zip",
                       characters=(("Alpha", 4), ("Beta", 3)), drawings=4)
    write_tiny_archive(data_dir / "images_evaluation.zip", characters=(("Gamma", 3),),
                       drawings=4)
    config = train.Config(dataset="omniglot", data_dir=str(data_dir), cache_dir=str(tmp_path),
                          ways=3, shots=1, queries=1, meta_batch_size=2, filters=4,
                          inner=MetaConfig(lr=0.4), train_characters=6, num_steps=3,
                          log_every=1, checkpoint_every=3,
                          eval=EvalConfig(inner_steps=2, every=3, episodes=60,
                                          episodes_during_training=10))
    train.train_and_evaluate(config, str(tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    mean, ci = results["accuracy"]
    assert results["episodes"] == 60 and 0 <= mean <= 1 and 0 < ci < 0.3
    rows = metrics.read_metrics(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [1, 2, 3] and "test_accuracy" in rows[-1]
    assert (tmp_path / "run" / "test_accuracy.png").exists()


SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np
    from jax.sharding import Mesh
    from common import parallel
    from maml import core, tasks, train

    images = np.random.default_rng(0).integers(0, 256, (12, 4, 28, 28), np.uint8)
    config = train.Config(dataset="omniglot", ways=3, filters=4, conv_impl="patches",
                          meta_lr=1e-2, inner=core.MetaConfig(steps=1, lr=0.4,
                                                              learn_lr="per_parameter"))
    learner = train.make_learner(config)
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        state = parallel.replicate(mesh, train.create_train_state(config, jax.random.PRNGKey(0)))
        step = train.jit_train_step(config, mesh, learner)
        for s in range(2):
            batch = parallel.shard_batch(mesh, tasks.episodes(images, 0, s, 4, 3, 1, 2))
            state, out = step(state, batch)
        finals.append(jax.tree.map(np.asarray, (state.meta_params, out)))
    assert len(jax.devices()) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), *finals)
    print("SHARDED_OK", float(finals[1][1]["meta_loss"]))
""")


@pytest.mark.slow
def test_sharded_meta_step_on_4_devices_equals_single_device():
    proc = run_python(["-c", SHARDED_SCRIPT], timeout=600)
    assert "SHARDED_OK" in proc.stdout


def separable_omniglot(characters=20, drawings=6, seed=0) -> omniglot.Omniglot:
    """Trivially separable "characters": each a random pattern of 7x7-pixel blocks, its drawings
    that pattern with 2% of the pixels flipped."""
    rng = np.random.default_rng(seed)
    blocks = rng.random((characters, 1, 4, 4)) < 0.5
    pattern = np.kron(blocks, np.ones((1, 1, 7, 7), bool))
    flips = rng.random((characters, drawings, 28, 28)) < 0.02
    names = np.array([f"synthetic/character{c:02d}" for c in range(characters)])
    return omniglot.Omniglot(((pattern ^ flips) * 255).astype(np.uint8),
                             np.array(["synthetic"] * characters), names, "synthetic")


def test_adaptation_takes_separable_episodes_from_chance_to_over_90_percent():
    config = train.Config(dataset="omniglot", ways=5, shots=1, queries=3, filters=8,
                          rotate=False, train_characters=10, inner=MetaConfig(lr=0.4),
                          eval=EvalConfig(inner_steps=5))
    source = tasks.TaskSource("omniglot", 0, 5, 1, 3, rotate=False, train_characters=10,
                              data=separable_omniglot())
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    results = evaluate.classification_results(
        train.make_adapter(config, train.make_learner(config)), state.meta_params, source,
        num_episodes=100, inner_steps=5)
    before, ci = results["accuracy_vs_inner_steps"][0]
    assert abs(before - 1 / 5) < max(2 * ci, 0.03), "un-adapted: labels are a random order"
    after, _ = results["accuracy"]
    assert after > 0.9, results["accuracy_vs_inner_steps"]


@pytest.mark.slow
def test_max_minutes_stops_at_a_checkpoint_and_the_same_command_continues(tmp_path, caplog):
    """Stopped at every checkpoint and resumed (Meta-SGD: the learned rates are state too), the
    run ends with the uninterrupted run's parameters and losses; another inner rate is refused."""
    config = dataclasses.replace(
        SINUSOID, num_steps=8, checkpoint_every=3, log_every=1,
        inner=MetaConfig(lr=0.01, learn_lr="per_parameter"),
        eval=dataclasses.replace(SINUSOID.eval, every=100, episodes=50, baseline_steps=2))
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    timed = dataclasses.replace(config, max_minutes=1e-9)  # out of time at every checkpoint
    caplog.set_level("INFO")
    for stop in (3, 6):
        assert int(train.train_and_evaluate(timed, str(tmp_path / "timed")).step) == stop
        assert f"Stopping after meta-iteration {stop} of 8: --max_minutes=1e-09" in caplog.text
        assert not (tmp_path / "timed" / "results.json").exists(), "evaluated an unfinished run"
    assert int(train.train_and_evaluate(timed, str(tmp_path / "timed")).step) == 8
    assert (tmp_path / "timed" / "results.json").exists()
    _, a = final_params(str(tmp_path / "straight"), config)
    _, b = final_params(str(tmp_path / "timed"), config)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    rows_a = metrics.read_metrics(str(tmp_path / "straight"))
    rows_b = metrics.read_metrics(str(tmp_path / "timed"))
    assert [r["meta_loss"] for r in rows_a] == [r["meta_loss"] for r in rows_b]
    assert workdirs.out_of_time(0.0, 1.0, 61.0) and not workdirs.out_of_time(0.0, 1.0, 59.0)
    assert not workdirs.out_of_time(0.0, 0.0, 1e9), "0: no limit"
    with pytest.raises(workdirs.WorkdirConflictError, match="inner_lr"):
        train.train_and_evaluate(dataclasses.replace(config, inner=dataclasses.replace(
                                     config.inner, lr=0.5)),
                                 str(tmp_path / "straight"))


def test_alphabet_split_trains_on_background_alphabets_and_is_recorded(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    background, evaluation = tasks.BACKGROUND_ALPHABETS, tasks.EVALUATION_ALPHABETS
    write_tiny_archive(data_dir / "images_background.zip",
                       characters=((background[0], 3), (background[5], 2)), drawings=4)
    write_tiny_archive(data_dir / "images_evaluation.zip",
                       characters=((evaluation[3], 3),), drawings=4)
    data = omniglot.load_omniglot(str(data_dir), str(tmp_path))
    source = tasks.TaskSource("omniglot", 0, 3, 1, 1, data_dir=str(data_dir),
                              cache_dir=str(tmp_path), split="alphabets")
    np.testing.assert_array_equal(source.train_images, data.images[:5])
    np.testing.assert_array_equal(source.test_images, data.images[5:])
    config = train.Config(dataset="omniglot", learner="protonet", split="alphabets",
                          data_dir=str(data_dir), cache_dir=str(tmp_path), ways=3, train_ways=4,
                          shots=1, queries=1, meta_batch_size=2, filters=4, num_steps=2,
                          log_every=1, checkpoint_every=2,
                          eval=EvalConfig(every=2, episodes=20, episodes_during_training=10))
    train.train_and_evaluate(config, str(tmp_path / "run"))
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["split"] == "alphabets" and stored["train_ways"] == 4
    assert json.loads((tmp_path / "run" / "results.json").read_text())["ways"] == 3
    with pytest.raises(ValueError, match="alphabet names"):
        tasks.alphabet_split(np.array(["Latin", "train07"]))


def test_the_real_archives_split_into_lakes_background_and_evaluation_sets():
    counts = {}
    for archive in omniglot.ARCHIVES:
        with zipfile.ZipFile(shared_data("omniglot", archive)) as f:
            counts[archive] = sorted({tuple(n.split("/")[1:3]) for n in f.namelist()
                                      if n.endswith(".png")})
    characters = counts["images_background.zip"] + counts["images_evaluation.zip"]
    train_ids, test_ids = tasks.split_characters(np.array([a for a, _ in characters]),
                                                 "alphabets", seed=0)
    assert len(train_ids) == 964 and len(test_ids) == 659
    np.testing.assert_array_equal(train_ids, np.arange(964))
    assert len({characters[i][0] for i in train_ids}) == 30
    assert len({characters[i][0] for i in test_ids}) == 20
    random_train, random_test = tasks.split_characters(np.array([a for a, _ in characters]),
                                                       "random", seed=0)
    assert len(random_train) == 1200 and len(random_test) == 423

"""Meta-training end to end: sinusoid learning vs the pretrained baseline, resume, Omniglot from a
zip the test writes, and the sharded meta-step on 4 simulated devices."""

import dataclasses
import json
import textwrap

import jax
import numpy as np
import pytest

from common import checkpoints, metrics
from maml import train
from tests.conftest import run_python
from tests.maml.test_tasks import write_tiny_archive


@pytest.fixture(autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of equal configs in one test compile once (persistent cache in a temp dir)."""
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


SINUSOID = train.Config(dataset="sinusoid", shots=10, queries=10, batch_size=25, inner_lr=0.01,
                        meta_lr=1e-3, test_inner_steps=1, eval_episodes=200,
                        eval_episodes_during_training=50, baseline_steps=1500,
                        log_every=500, checkpoint_every=1000, eval_every=1000)


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
    ckpts = checkpoints.Checkpoints(workdir, config.checkpoint_every)
    state, step = ckpts.restore_latest(train.create_train_state(config, jax.random.PRNGKey(0)))
    ckpts.close()
    return step, jax.tree.map(np.asarray, state.meta_params)


def test_resume_gives_the_numbers_of_an_uninterrupted_run(tmp_path):
    config = dataclasses.replace(SINUSOID, num_steps=8, checkpoint_every=3, log_every=1,
                                 eval_every=100, eval_episodes=50, baseline_steps=2,
                                 learn_inner_lr="per_parameter")
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    train.train_and_evaluate(dataclasses.replace(config, num_steps=5), str(tmp_path / "resumed"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    step_a, a = final_params(str(tmp_path / "straight"), config)
    step_b, b = final_params(str(tmp_path / "resumed"), config)
    assert step_a == step_b == 8
    jax.tree.map(np.testing.assert_array_equal, a, b)
    rows_a = metrics.read_metrics(str(tmp_path / "straight"))
    rows_b = metrics.read_metrics(str(tmp_path / "resumed"))
    assert [r["meta_loss"] for r in rows_a] == [r["meta_loss"] for r in rows_b]
    with pytest.raises(checkpoints.WorkdirConflictError, match="inner_lr"):
        train.train_and_evaluate(dataclasses.replace(config, inner_lr=0.5),
                                 str(tmp_path / "straight"))


def test_omniglot_end_to_end_from_archives(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_tiny_archive(data_dir / "images_background.zip",
                       characters=(("Alpha", 4), ("Beta", 3)), drawings=4)
    write_tiny_archive(data_dir / "images_evaluation.zip", characters=(("Gamma", 3),),
                       drawings=4)
    config = train.Config(dataset="omniglot", data_dir=str(data_dir), cache_dir=str(tmp_path),
                          ways=3, shots=1, queries=1, batch_size=2, filters=4, inner_lr=0.4,
                          test_inner_steps=2, train_characters=6, num_steps=3, log_every=1,
                          checkpoint_every=3, eval_every=3, eval_episodes=60,
                          eval_episodes_during_training=10)
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
    import jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    from common import parallel
    from maml import core, models, tasks

    images = np.random.default_rng(0).integers(0, 256, (12, 4, 28, 28), np.uint8)
    model = models.Conv4(3, filters=4, conv_impl="patches")
    learner = tasks.classification_learner(model)
    config = core.MetaConfig(inner_steps=1, inner_lr=0.4, learn_inner_lr="per_parameter")
    optimizer = core.make_optimizer(1e-2)
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
        fast, slow = models.init_split(model, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
        mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        state = parallel.replicate(mesh, core.create_meta_state(config, fast, slow, optimizer))
        step = core.make_meta_step(learner, config, optimizer, mesh)
        for s in range(2):
            batch = parallel.shard_batch(mesh, tasks.episodes(images, 0, s, 4, 3, 1, 2))
            state, out = step(state, batch)
        finals.append(jax.tree.map(np.asarray, (state.meta_params, out)))
    assert len(jax.devices()) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), *finals)
    print("SHARDED_OK", float(finals[1][1]["meta_loss"]))
""")


def test_sharded_meta_step_on_4_devices_equals_single_device():
    proc = run_python(["-c", SHARDED_SCRIPT], timeout=600)
    assert "SHARDED_OK" in proc.stdout

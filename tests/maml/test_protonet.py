"""Prototypical Networks against numpy, on separable episodes, and trained on real Omniglot."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import config as config_lib
from common import metrics, parallel
from maml import evaluate, protonet, tasks, train
from maml.evaluate import EvalConfig
from tests.conftest import shared_data
from tests.maml.test_train import separable_omniglot


def numpy_episode(embed_support, embed_query, support_y, query_y, ways):
    """Prototypes, squared distances, mean cross-entropy and accuracy, written out in numpy."""
    centres = np.stack([embed_support[support_y == k].mean(0) for k in range(ways)])
    distances = np.array([[np.sum((q - c) ** 2) for c in centres] for q in embed_query])
    logits = -distances
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    loss = -log_p[np.arange(len(query_y)), query_y].mean()
    return centres, distances, loss, np.mean(logits.argmax(1) == query_y)


def test_prototypes_distances_and_loss_equal_numpy():
    rng = np.random.default_rng(0)
    support = rng.normal(size=(12, 7)).astype(np.float32)
    labels = np.array([2, 0, 1, 3] * 3)  # any order, 3 shots of 4 classes
    queries = rng.normal(size=(5, 7)).astype(np.float32)
    centres, distances, _, _ = numpy_episode(support, queries, labels, np.zeros(5, int), 4)
    np.testing.assert_allclose(protonet.prototypes(support, labels, 4), centres, rtol=1e-5)
    np.testing.assert_allclose(protonet.squared_distances(queries, centres), distances,
                               rtol=1e-5)
    # The episode loss of the embedding network, from its own embeddings in numpy.
    model = protonet.Embedding(filters=8)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    images = np.random.default_rng(1).integers(0, 256, (10, 5, 28, 28), np.uint8)
    task = tasks.task_slice(tasks.episodes(images, 0, 0, 1, ways=4, shots=2, queries=3), 0)
    embed = lambda x: np.asarray(model.apply({"params": params}, x))  # noqa: E731
    assert embed(task["support"]["x"]).shape == (8, 8)  # 28 -> 14 -> 7 -> 3 -> 1, 8 filters
    _, _, loss, accuracy = numpy_episode(embed(task["support"]["x"]), embed(task["query"]["x"]),
                                         task["support"]["y"], task["query"]["y"], 4)
    value, metrics = protonet.episode_loss(model, params, task, 4, "transductive")
    np.testing.assert_allclose(value, loss, rtol=1e-4)
    np.testing.assert_allclose(metrics["accuracy"], accuracy)


def test_support_statistics_make_each_query_independent():
    model = protonet.Embedding(filters=4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    images = np.random.default_rng(1).integers(0, 256, (10, 5, 28, 28), np.uint8)
    task = tasks.task_slice(tasks.episodes(images, 0, 0, 1, ways=3, shots=1, queries=2), 0)
    _, query = protonet.embed_episode(model, params, task["support"]["x"], task["query"]["x"],
                                      "support")
    _, first = protonet.embed_episode(model, params, task["support"]["x"],
                                      task["query"]["x"][:1], "support")
    np.testing.assert_allclose(query[:1], first, rtol=1e-5, atol=1e-6)


def test_a_few_training_steps_separate_separable_episodes():
    """10-way training episodes of 20 synthetic characters; 5-way test episodes of 10 others."""
    config = train.Config(dataset="omniglot", learner="protonet", ways=5, train_ways=10,
                          shots=1, queries=3, meta_batch_size=2, filters=8, rotate=False,
                          train_characters=20, meta_lr=1e-2)
    source = tasks.TaskSource("omniglot", 0, 5, 1, 3, rotate=False, train_characters=20,
                              train_ways=10, data=separable_omniglot(characters=30))
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    adapter = train.make_adapter(config, None)
    before = evaluate.classification_results(adapter, state.meta_params, source, 100, 0)
    assert before["test_inner_steps"] == 0 and len(before["accuracy_vs_inner_steps"]) == 1
    step = train.jit_train_step(config, parallel.make_mesh(), None)
    for s in range(10):
        batch = source.local_train_batch(s, 2)
        assert batch["support"]["x"].shape[1] == 10 and batch["query"]["x"].shape[1] == 30
        state, _ = step(state, batch)
    after = evaluate.classification_results(adapter, state.meta_params, source, 100, 0)
    assert before["accuracy"][0] < 0.85 and after["accuracy"][0] > 0.95, (before, after)


@pytest.fixture(scope="module")
def omniglot_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("omniglot_cache"))


@pytest.mark.slow
def test_short_training_beats_chance_on_omniglot(tmp_path, omniglot_cache):
    data_dir = shared_data("omniglot", "images_evaluation.zip").rsplit("/", 1)[0]
    shared_data("omniglot", "images_background.zip")
    config = train.Config(dataset="omniglot", learner="protonet", data_dir=data_dir,
                          cache_dir=omniglot_cache, split="alphabets", ways=5, train_ways=20,
                          shots=1, queries=1, train_queries=5, meta_batch_size=1, filters=32,
                          lr_halve_every=2000, num_steps=40, log_every=10, checkpoint_every=40,
                          eval=EvalConfig(every=40, episodes=200, episodes_during_training=20))
    train.train_and_evaluate(config, str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["learner"] == "protonet" and stored["split"] == "alphabets"
    mean, ci = results["accuracy"]
    assert results["episodes"] == 200 and ci < 0.05
    assert mean > 0.65, f"5-way accuracy {mean:.3f}: chance is 0.2, an untrained embedding ~0.5"
    rows = metrics.read_metrics(str(tmp_path))
    assert rows[-1]["loss"] < rows[0]["loss"]
    # The final checkpoint on the same episodes gives the same numbers; 20-way is harder.
    again = train.evaluate_checkpoint(str(tmp_path), 5, 1, 200)
    assert again["step"] == 40
    np.testing.assert_allclose(again["accuracy"], results["accuracy"], rtol=1e-6)
    wider = train.evaluate_checkpoint(str(tmp_path), 20, 1, 50)
    assert 0.2 < wider["accuracy"][0] < mean and wider["ways"] == 20, wider
    assert (tmp_path / "results_20way1shot.json").exists()


def test_maml_is_evaluated_only_at_its_own_ways(tmp_path):
    config = train.Config(dataset="omniglot", ways=5)
    metrics.write_json(str(tmp_path / "config.json"), config_lib.to_dict(config))
    with pytest.raises(ValueError, match="has 5 outputs; it cannot be evaluated 20-way"):
        train.evaluate_checkpoint(str(tmp_path), 20, 1)

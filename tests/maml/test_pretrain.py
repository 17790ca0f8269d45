"""The pretrain-then-fine-tune-the-head baseline: global labels against the images they name, its
loss against numpy, the head fit on separable features, and a short training on separable
episodes."""

import jax
import jax.numpy as jnp
import numpy as np

from common import parallel
from maml import evaluate, pretrain, tasks, train
from tests.maml.test_train import separable_omniglot


def test_global_classes_name_the_character_and_rotation_of_each_image():
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 28, 28), np.uint8)
    batch = tasks.episodes(images, 0, 3, 2, ways=4, shots=1, queries=2, with_classes=True)
    x, y = pretrain.global_batch(jax.tree.map(jnp.asarray, batch))
    assert x.shape == (2 * 4 * 3, 28, 28, 1) and y.shape == (24,)
    pixels = np.rint(np.asarray(x)[..., 0] * 255).astype(np.uint8)
    for image, label in zip(pixels, np.asarray(y)):
        character, rotation = divmod(int(label), tasks.ROTATIONS)
        drawings = np.rot90(images[character], rotation, axes=(-2, -1))
        assert any(np.array_equal(image, d) for d in drawings), label
    assert tasks.num_train_classes("random", 1200, True) == 4800
    assert tasks.num_train_classes("alphabets", 1200, False) == 964


def test_classification_loss_equals_numpy():
    model = pretrain.Classifier(num_classes=28, filters=4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
    assert set(params) == {"embedding", "head"}
    images = np.random.default_rng(1).integers(0, 256, (7, 5, 28, 28), np.uint8)
    batch = jax.tree.map(jnp.asarray, tasks.episodes(images, 0, 0, 2, ways=3, shots=1,
                                                     queries=1, with_classes=True))
    x, y = pretrain.global_batch(batch)
    logits = np.asarray(model.apply({"params": params}, x), np.float64)
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    expected = -log_p[np.arange(len(y)), np.asarray(y)].mean()
    loss, metrics = pretrain.classification_loss(model, params, batch)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(1) == np.asarray(y)))


def test_fitted_head_classifies_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 3
    support_y = np.repeat(np.arange(5), 2)
    query_y = np.tile(np.arange(5), 4)
    support = centres[support_y] + rng.normal(size=(10, 16)) * 0.5
    query = centres[query_y] + rng.normal(size=(20, 16)) * 0.5
    head = pretrain.fit_head(jnp.asarray(support, jnp.float32), jnp.asarray(support_y), 5,
                             steps=100, lr=0.01)
    predictions = np.argmax(query @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), -1)
    assert np.mean(predictions == query_y) == 1.0
    untrained = pretrain.fit_head(jnp.asarray(support, jnp.float32), jnp.asarray(support_y), 5,
                                  steps=0, lr=0.01)
    assert not np.any(np.asarray(untrained["kernel"])), "zero-initialised"


def test_a_few_training_steps_separate_separable_episodes():
    """Classes: 20 synthetic characters; 5-way test episodes of 10 others, head refitted."""
    config = train.Config(dataset="omniglot", learner="pretrain", ways=5, train_ways=10,
                          shots=1, queries=3, meta_batch_size=2, filters=8, rotate=False,
                          train_characters=20, meta_lr=1e-2)
    source = tasks.TaskSource("omniglot", 0, 5, 1, 3, rotate=False, train_characters=20,
                              train_ways=10, data=separable_omniglot(characters=30),
                              with_classes=True)
    state = train.create_train_state(config, jax.random.PRNGKey(0))
    assert state.meta_params["head"]["kernel"].shape[-1] == 20
    adapter = train.make_adapter(config, None)
    step = train.jit_train_step(config, parallel.make_mesh(), None)
    losses = []
    for s in range(30):
        state, step_metrics = step(state, source.local_train_batch(s, 2))
        losses.append(float(step_metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    after = evaluate.classification_results(adapter, state.meta_params, source, 100, 0)
    assert after["accuracy"][0] > 0.95, after

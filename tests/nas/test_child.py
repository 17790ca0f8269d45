"""Child networks: shapes build and train, vanishing feature maps are handled, compile caching,
and data-parallel training on 4 simulated devices equal to 1 device."""

import textwrap

import jax
import numpy as np
import optax
import pytest

from common import data
from nas import child, evaluate, train
from nas import history as history_lib
from nas.search_space import cnn_space
from tests.conftest import run_python

CONFIG = child.ChildConfig(num_steps=60, batch_size=16, learning_rate=1e-2, steps_per_call=5,
                           eval_batch_size=32, validation_size=40)


def generated_data(n=200, size=12, seed=0) -> child.ChildData:
    """Two classes: noise (0), or noise with a bright 4x4 square somewhere (1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, size=n).astype(np.int32)
    images = rng.integers(0, 60, size=(n, size, size, 1)).astype(np.uint8)
    for image, label in zip(images, labels):
        if label:
            r, c = rng.integers(size - 4, size=2)
            image[r:r + 4, c:c + 4] += 150
    dataset = data.Dataset(images, labels, "generated", "train", "test")
    train, validation = child.carve_validation(dataset, CONFIG.validation_size)
    return child.ChildData(train, validation, validation)


DATA = generated_data()
SHAPES = [((3, 3, 8, 1),),
          ((5, 1, 8, 2), (1, 5, 12, 1)),
          ((3, 3, 8, 2), (7, 7, 8, 2), (1, 1, 8, 1))]


@pytest.fixture(scope="module")
def trainer():
    """One trainer for the module, so each architecture shape compiles once."""
    return child.ChildTrainer(CONFIG, DATA)


@pytest.mark.parametrize("layers", SHAPES)
def test_children_of_several_shapes_build_and_reduce_loss(trainer, layers):
    params, info = trainer.train(layers)
    kernels = [params[f"Conv_{i}"]["kernel"].shape for i in range(len(layers))]
    in_channels = [1] + [f for _, _, f, _ in layers[:-1]]
    assert kernels == [(fh, fw, c, f) for (fh, fw, f, _), c in zip(layers, in_channels)]
    side = 12
    for _, _, _, stride in layers:
        side = -(-side // stride)  # SAME padding: ceil(n / s)
    assert info["params"] == sum(fh * fw * c * f + f for (fh, fw, f, _), c
                                 in zip(layers, in_channels)) + side * side * layers[-1][2] * 2 + 2
    assert info["loss_end"] < info["loss_start"] - 0.05
    assert 0.0 <= trainer.accuracy(layers, params, DATA.validation) <= 1.0


def test_accuracy_counts_correct_predictions_with_a_padded_last_batch(trainer):
    layers = SHAPES[0]
    params, _ = trainer.train(layers, num_steps=10)
    logits = trainer.compiled(layers).model.apply(
        {"params": params}, data.to_float(DATA.validation.images))
    want = np.mean(np.argmax(logits, -1) == DATA.validation.labels)  # 40 = 32 + 8 padded
    assert trainer.accuracy(layers, params, DATA.validation) == pytest.approx(want)


def test_compiled_steps_are_cached_per_architecture_shape(trainer):
    layers = ((3, 3, 8, 2),)
    _, first = trainer.train(layers, num_steps=10)
    shapes = len(trainer._compiled)
    _, second = trainer.train(layers, num_steps=25)  # another length: the same compiled chunk
    assert first["compile_s"] > 0 and second["compile_s"] == 0
    assert len(trainer._compiled) == shapes


def test_unrolled_train_chunk_equals_one_jitted_adam_step_at_a_time(trainer):
    """13 steps in chunks of 5 (the last: 3 active, 2 skipped) give the parameters and losses of 13 plain
    Adam steps on the same minibatches, each its own jitted call."""
    layers = SHAPES[1]
    params, info = trainer.train(layers, num_steps=13)
    compiled = trainer.compiled(layers)
    optimizer = optax.adam(CONFIG.learning_rate)

    @jax.jit
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(child.child_loss, argnums=1)(compiled.model, params,
                                                                       images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    want, opt_state = child.make_init(compiled.model, optimizer, trainer.seed,
                                      DATA.train.image_shape)()
    losses = []
    for s in range(13):
        idx = data.batch_indices(len(DATA.train), CONFIG.batch_size, trainer.seed, s)
        want, opt_state, loss = step(want, opt_state, DATA.train.images[idx],
                                     DATA.train.labels[idx])
        losses.append(float(loss))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), params,
                 want)
    assert info["loss_end"] == pytest.approx(losses[-1], rel=1e-5)  # the last tenth: 1 step


def test_compile_cache_keeps_the_most_recent_shapes_and_frees_the_others():
    """Evicted shapes give back their memory mappings: an unbounded cache crashed long searches
    at the kernel's limit on mappings (about 100 shapes)."""
    def mappings():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    trainer = child.ChildTrainer(CONFIG, DATA, max_cached_shapes=2)
    shapes = [((k, 1, 4, 2),) for k in (1, 3, 5, 7)] + [((1, k, 4, 2),) for k in (3, 5, 7)]
    counts = []
    for layers in shapes[:3] + [shapes[1]] + shapes[3:]:  # shapes[1] is used again
        trainer.train(layers, num_steps=2)
        counts.append(mappings())
        if layers == shapes[3]:
            assert list(trainer._compiled) == [shapes[1], shapes[3]]  # least recent evicted
    assert list(trainer._compiled) == shapes[-2:]
    per_shape = counts[1] - counts[0]
    assert per_shape > 50, counts  # a compiled child maps many pages of code
    assert counts[-1] - counts[1] < per_shape, counts  # 5 more shapes, no more mappings


def test_feature_map_sizes_by_formula():
    layers = ((3, 3, 8, 2), (7, 5, 8, 1), (1, 1, 8, 2))
    assert child.feature_map_sizes(layers, (28, 28), "SAME") == [(14, 14), (14, 14), (7, 7)]
    assert child.feature_map_sizes(layers, (28, 28), "VALID") == [(13, 13), (7, 9), (4, 5)]


def test_vanishing_feature_map_is_a_clear_error_and_a_zero_reward():
    space = cnn_space(2)
    # layer 0: 7x7 stride 2 on 12x12 VALID -> 3x3; layer 1: 7x7 -> nothing
    architecture = (3, 3, 0, 1, 3, 3, 0, 1)
    assert child.cnn_layers(space, architecture) == ((7, 7, 24, 2), (7, 7, 24, 2))
    valid_config = child.ChildConfig(**{**CONFIG.__dict__, "padding": "VALID"})
    trainer = child.ChildTrainer(valid_config, DATA)
    with pytest.raises(child.VanishingFeatureMapError, match="Layer 1"):
        trainer.train(child.cnn_layers(space, architecture))
    objective = child.ChildObjective(space, trainer)
    reward, info = objective(architecture)
    assert reward == 0.0 and "Layer 1" in info["error"]


def test_search_over_real_children(trainer, tmp_path):
    """Random search on a 1-layer space of tiny children, through the search loop."""
    space = cnn_space(1, filter_sizes=(3,), num_filters=(8,), strides=(1, 2))
    objective = child.ChildObjective(space, trainer)
    config = train.Config(algorithm="random", budget=4, seed=1)
    summary = train.train_and_evaluate(config, str(tmp_path), space=space, objective=objective)
    history = history_lib.read_history(str(tmp_path))
    assert summary["evaluations"] == 2 == space.size  # the search ends with the space exhausted
    assert len(history) == summary["proposals"] and not history[-1].cached
    for r in history:
        assert r.reward == r.info["validation_accuracy"]
        assert r.cached or r.info["train_s"] > 0
    assert summary["best"]["reward"] == max(r.reward for r in history)
    final = evaluate.final_test(objective, tuple(summary["best"]["architecture"]), 20)
    assert 0.0 <= final["test_accuracy"] <= 1.0 and final["num_steps"] == 20


SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np
    import pytest
    from jax.sharding import Mesh
    from common import data, parallel
    from nas import child

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (96, 12, 12, 1), np.uint8)
    labels = (images[:, :6].mean((1, 2, 3)) > images[:, 6:].mean((1, 2, 3))).astype(np.int32)
    train, validation = child.carve_validation(
        data.Dataset(images, labels, "generated", "train", "test"), 36)
    config = child.ChildConfig(num_steps=12, batch_size=8, learning_rate=1e-2, steps_per_call=5,
                               eval_batch_size=10, validation_size=36)
    layers = ((3, 3, 4, 2),)
    runs = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
        trainer = child.ChildTrainer(config, child.ChildData(train, validation), mesh)
        params, info = trainer.train(layers)
        assert all(len(x.devices()) == len(devices) for x in jax.tree.leaves(params))
        runs.append((parallel.to_host(params), info, trainer.accuracy(layers, params, validation),
                     trainer.eval_batch_size))
    (one, one_info, one_acc, one_eval), (four, four_info, four_acc, four_eval) = runs
    assert (one_eval, four_eval) == (10, 12)  # rounded up to a multiple of the 4 devices
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), one, four)
    for key in ("loss_start", "loss_end"):
        assert four_info[key] == pytest.approx(one_info[key], rel=1e-5)
    model = trainer.compiled(layers).model
    logits = model.apply({"params": four}, data.to_float(validation.images))
    correct = int(np.sum(np.argmax(logits, -1) == validation.labels))
    assert four_acc == one_acc == correct / len(validation)
    try:
        child.ChildTrainer(child.ChildConfig(batch_size=6), child.ChildData(train, validation))
    except ValueError as e:
        assert "child batch size 6 is not divisible by the 4 devices" in str(e), e
    else:
        raise AssertionError("a batch of 6 on 4 devices was accepted")
    print("SHARDED_OK", one_acc, one_info["loss_end"] - four_info["loss_end"])
""")


def test_child_training_on_4_devices_equals_1_device():
    """Minibatches and evaluation batches split over 4 simulated devices: the same parameters,
    losses and validation accuracy as on 1 device, and the accuracy equals a direct count."""
    proc = run_python(["-c", SHARDED_SCRIPT], timeout=600)
    assert "SHARDED_OK" in proc.stdout

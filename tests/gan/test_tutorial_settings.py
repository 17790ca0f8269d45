"""The TensorFlow DCGAN tutorial's settings, pinned: the DCGAN against the tutorial's layers written
out with lax (LeakyReLU 0.3, batch norm momentum 0.99 and epsilon 1e-3, the layer shapes) in values
and gradients, its dropout rate 0.3 measured on the masks, Adam(1e-4, epsilon 1e-7) against Adam's
formulas, and the committed `dcgan_*.flags` (batch 256, noise 100, ...) and
`goodfellow_mlp_mnist.flags` (the paper code's `mnist.yaml`), parsed as their launcher does.

Written to fail when one of these settings changes: each value below is the tutorial's (or the
paper code's), not read from the code under test.
"""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gan import dropout, models, train
from tests.conftest import run_python

# The tutorial's settings (Keras defaults where the tutorial relies on them).
LEAKY_SLOPE = 0.3
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
DROPOUT_RATE = 0.3
ADAM = {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-7}
BATCH_SIZE = 256
NOISE_DIM = 100

_NHWC = ("NHWC", "HWIO", "NHWC")


def _leaky(x):
    return jnp.where(x >= 0, x, LEAKY_SLOPE * x)


def _batch_norm(x, params, stats, train_mode):
    """Batch norm over all axes but the last: y = (x - m) / sqrt(v + eps) * scale + bias with the
    batch's (biased) mean and variance in training, the running averages otherwise; the running
    averages move as a <- momentum a + (1 - momentum) batch."""
    axes = tuple(range(x.ndim - 1))
    if train_mode:
        mean, var = jnp.mean(x, axes), jnp.var(x, axes)
        new_stats = {"mean": BN_MOMENTUM * stats["mean"] + (1 - BN_MOMENTUM) * mean,
                     "var": BN_MOMENTUM * stats["var"] + (1 - BN_MOMENTUM) * var}
    else:
        mean, var, new_stats = stats["mean"], stats["var"], stats
    y = (x - mean) / jnp.sqrt(var + BN_EPSILON) * params["scale"] + params["bias"]
    return y, new_stats


def reference_generator(params, stats, z, train_mode):
    """The tutorial's generator: Dense(7*7*256, no bias) -> BN -> LReLU -> reshape 7x7x256 ->
    ConvT(128, 5, 1) -> BN -> LReLU -> ConvT(64, 5, 2) -> BN -> LReLU -> ConvT(1, 5, 2) -> tanh,
    with flax's transposed-convolution convention (lax.conv_transpose, SAME)."""
    batch = z.shape[0]
    new_stats = {}
    x = z @ params["dense"]["kernel"]
    chex.assert_shape(x, (batch, 7 * 7 * 256))
    x, new_stats["bn0"] = _batch_norm(x, params["bn0"], stats["bn0"], train_mode)
    x = _leaky(x).reshape(batch, 7, 7, 256)
    for i, (stride, shape) in enumerate(((1, (7, 7, 128)), (2, (14, 14, 64)), (2, (28, 28, 1)))):
        x = lax.conv_transpose(x, params[f"deconv{i}"]["kernel"], (stride, stride), "SAME",
                               dimension_numbers=_NHWC)
        chex.assert_shape(x, (batch, *shape))
        if i < 2:
            x, new_stats[f"bn{i + 1}"] = _batch_norm(x, params[f"bn{i + 1}"],
                                                     stats[f"bn{i + 1}"], train_mode)
            x = _leaky(x)
    return jnp.tanh(x), new_stats


def reference_discriminator(params, x):
    """The tutorial's discriminator without dropout (inference): Conv(64, 5, 2) -> LReLU ->
    Conv(128, 5, 2) -> LReLU -> flatten -> Dense(1)."""
    batch = x.shape[0]
    for i, shape in enumerate(((14, 14, 64), (7, 7, 128))):
        p = params[f"conv{i}"]
        x = _leaky(lax.conv_general_dilated(x, p["kernel"], (2, 2), "SAME",
                                            dimension_numbers=_NHWC) + p["bias"])
        chex.assert_shape(x, (batch, *shape))
    x = x.reshape(batch, 7 * 7 * 128)
    return (x @ params["dense"]["kernel"] + params["dense"]["bias"])[:, 0]


def _float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _perturbed(tree, seed, scale=0.1):
    """`tree` + scale * N(0, 1): batch-norm scales and biases away from 1 and 0, running averages
    away from 0 and 1, so that every parameter's role is visible in the output."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([a + scale * jax.random.normal(k, a.shape, a.dtype)
                              for a, k in zip(leaves, keys)])


def test_the_dcgan_has_the_tutorials_layer_shapes():
    generator, discriminator, value_range = models.get_models("dcgan")
    g_vars = generator.init(jax.random.PRNGKey(0), jnp.zeros((2, NOISE_DIM)), train=False)
    d_vars = discriminator.init(jax.random.PRNGKey(1), jnp.zeros((2, 28, 28, 1)), train=False)
    assert jax.tree.map(jnp.shape, g_vars["params"]) == {
        "dense": {"kernel": (100, 12544)},
        "bn0": {"scale": (12544,), "bias": (12544,)},
        "deconv0": {"kernel": (5, 5, 256, 128)},
        "bn1": {"scale": (128,), "bias": (128,)},
        "deconv1": {"kernel": (5, 5, 128, 64)},
        "bn2": {"scale": (64,), "bias": (64,)},
        "deconv2": {"kernel": (5, 5, 64, 1)}}
    assert jax.tree.map(jnp.shape, d_vars["params"]) == {
        "conv0": {"kernel": (5, 5, 1, 64), "bias": (64,)},
        "conv1": {"kernel": (5, 5, 64, 128), "bias": (128,)},
        "dense": {"kernel": (6272, 1), "bias": (1,)}}
    assert value_range == (-1.0, 1.0) and models.NOISE_DIM == NOISE_DIM


@pytest.mark.parametrize("train_mode", [True, False])
def test_generator_is_the_tutorials_in_values_gradients_and_batch_statistics(train_mode):
    generator = models.get_models("dcgan")[0]  # what training uses
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.PRNGKey(0), (4, NOISE_DIM), jnp.float64)
        variables = _float64(generator.init(jax.random.PRNGKey(1), z, train=False))
        params = _perturbed(variables["params"], 2)
        stats = jax.tree.map(jnp.abs, _perturbed(variables["batch_stats"], 3, 0.5))
        probe = jax.random.normal(jax.random.PRNGKey(4), (4, 28, 28, 1), jnp.float64)

        def ours(params, z):
            out = generator.apply({"params": params, "batch_stats": stats}, z, train=train_mode,
                                  mutable=["batch_stats"])
            images_, new_stats = out
            return jnp.sum(probe * images_), (images_, new_stats["batch_stats"])

        def reference(params, z):
            images_, new_stats = reference_generator(params, stats, z, train_mode)
            return jnp.sum(probe * images_), (images_, new_stats)

        results = [jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(params, z)
                   for f in (ours, reference)]
        (_, (images_ours, stats_ours)), grads_ours = results[0]
        (_, (images_ref, stats_ref)), grads_ref = results[1]
        chex.assert_trees_all_close(images_ours, images_ref, atol=1e-10)
        chex.assert_trees_all_close(stats_ours, stats_ref, atol=1e-10)
        chex.assert_trees_all_close(grads_ours, grads_ref, atol=1e-9, rtol=1e-7)


def test_discriminator_is_the_tutorials_in_values_and_gradients():
    discriminator = models.get_models("dcgan")[1]  # what training uses
    with jax.enable_x64(True):
        x = jax.random.uniform(jax.random.PRNGKey(0), (3, 28, 28, 1), jnp.float64, -1, 1)
        params = _perturbed(_float64(discriminator.init(jax.random.PRNGKey(1), x,
                                                        train=False)["params"]), 2)

        def probe_loss(logits):
            return jnp.sum(jnp.sin(3.0 * logits))

        def ours(params, x):
            return probe_loss(discriminator.apply({"params": params}, x, train=False))

        def reference(params, x):
            return probe_loss(reference_discriminator(params, x))

        results = [jax.jit(jax.value_and_grad(f, (0, 1)))(params, x) for f in (ours, reference)]
        chex.assert_trees_all_close(results[0], results[1], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("impl", ["unrolled", "flax"])
def test_discriminator_drops_30_percent_after_each_leaky_relu(impl):
    """The two dropout layers, observed in a training-mode pass: each zeroes a fraction 0.3 of its
    (post-LeakyReLU) input and scales the rest by 1 / 0.7."""
    discriminator = models.DCGANDiscriminator(dropout=impl)
    assert models.get_models("dcgan")[1].dropout_rate == DROPOUT_RATE
    x = jax.random.uniform(jax.random.PRNGKey(0), (8, 28, 28, 1), jnp.float32, -1, 1)
    variables = discriminator.init(jax.random.PRNGKey(1), x, train=False)
    seen = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, (dropout.Dropout, nn.Dropout)):
            seen.append((np.asarray(args[0]), np.asarray(out)))
        return out

    with nn.intercept_methods(record):
        discriminator.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert [inp.shape for inp, _ in seen] == [(8, 14, 14, 64), (8, 7, 7, 128)]
    for inp, out in seen:
        nonzero = inp != 0
        kept = out != 0
        dropped = 1.0 - kept[nonzero].mean()  # 50,176 and 25,088 draws: sd < 0.003
        assert abs(dropped - DROPOUT_RATE) < 0.015, dropped
        np.testing.assert_allclose(out[kept], inp[kept] / (1 - DROPOUT_RATE), rtol=1e-6)


def _adam_by_formula(grads, learning_rate, b1, b2, eps):
    """Adam's updates (Kingma & Ba, Algorithm 1; Keras' epsilon outside the square root):
    m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2, u_t = -lr (m_t / (1 - b1^t)) /
    (sqrt(v_t / (1 - b2^t)) + eps)."""
    m = v = np.zeros_like(grads[0])
    updates = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        updates.append(-learning_rate * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    return updates


def test_default_optimizer_is_the_tutorials_adam():
    # Gradients of order epsilon, where eps = 1e-7 and the optax default 1e-8 differ by 2x.
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=5) * scale for scale in (1e-7, 3e-7, 1.0)]
    tx = train.make_optimizer(train.Config())
    with jax.enable_x64(True):
        params = jnp.zeros(5)
        state = tx.init(params)
        ours = []
        for g in grads:
            update, state = tx.update(jnp.asarray(g), state, params)
            ours.append(np.asarray(update))
    np.testing.assert_allclose(ours, _adam_by_formula(grads, **ADAM), rtol=1e-9)


# Parses each flag file as `python -m launch.gan --flagfile=...` would; prints its config.
CONFIGS_OF_FLAGFILES = """
import json, sys
from common import config as config_lib
from launch import flags as launch_flags
from launch import gan
configs = {}
for path in sys.argv[1:]:
    launch_flags.parse_flagfile(path)
    configs[path] = config_lib.to_dict(gan.make_config())
print(json.dumps(configs))
"""

TUTORIAL = {"model": "dcgan", "loss": "non_saturating", "schedule": "simultaneous", "d_steps": 1,
            "optimizer": "adam", "learning_rate": ADAM["learning_rate"], "adam_b1": ADAM["b1"],
            "adam_b2": ADAM["b2"], "adam_eps": ADAM["eps"], "noise": "normal",
            "noise_dim": NOISE_DIM, "batch_size": BATCH_SIZE, "num_epochs": 50}
# Radford et al. (2016)'s optimizer on the tutorial's networks, at batch 64.
RADFORD = {**TUTORIAL, "learning_rate": 2e-4, "adam_b1": 0.5, "batch_size": 64, "num_epochs": 3}
# goodfeli/adversarial's mnist.yaml: SGD(0.1, momentum 0.5 -> 0.7 from epoch 1 to epoch 250, lr
# decay 1.000004 down to 1e-6), batch 100, Gaussian noise of dimension 100, k = 1.
GOODFELLOW = {"model": "mlp", "loss": "minimax", "schedule": "sequential", "d_steps": 1,
              "optimizer": "sgd_momentum", "learning_rate": 0.1, "momentum": 0.5,
              "final_momentum": 0.7, "momentum_saturate_epochs": 249,
              "momentum_saturate_steps": 0, "lr_decay": 1.000004, "min_learning_rate": 1e-6,
              "noise": "normal", "noise_dim": 100, "batch_size": 100, "dataset": "mnist"}
EXPECTED = {"dcgan_fashion_mnist.flags": {**TUTORIAL, "dataset": "fashion_mnist"},
            "dcgan_mnist.flags": {**TUTORIAL, "dataset": "mnist"},
            "dcgan_fashion_mnist_fast.flags": {**RADFORD, "dataset": "fashion_mnist"},
            "goodfellow_mlp_mnist.flags": GOODFELLOW}


@pytest.fixture(scope="module")
def flagfile_configs():
    paths = [f"launch/configs/{name}" for name in EXPECTED]
    configs = json.loads(run_python(["-c", CONFIGS_OF_FLAGFILES, *paths]).stdout.splitlines()[-1])
    return {path.rsplit("/", 1)[1]: config for path, config in configs.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_flag_files_hold_the_papers_settings(flagfile_configs, name):
    config = flagfile_configs[name]
    assert {k: config[k] for k in EXPECTED[name]} == EXPECTED[name]


def test_tutorial_flag_files_sample_once_per_epoch(flagfile_configs):
    for name, images in (("dcgan_fashion_mnist.flags", 60_000), ("dcgan_mnist.flags", 60_000)):
        config = train.from_dict(flagfile_configs[name])
        assert config.sample_every == train.steps_per_epoch(config, images) == 234


def _momentum_at(tx, params, step: int) -> float:
    """The momentum `tx` (inject_hyperparams SGD) uses at update `step` (0-based): its state with
    every step counter (its integer scalars) set to `step`, updated once."""
    state = jax.tree.map(lambda x: jnp.full_like(x, step)
                         if jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 0 else x,
                         tx.init(params))
    return float(tx.update(jnp.zeros_like(params), state, params)[1].hyperparams["momentum"])


@pytest.mark.parametrize("num_images,steps_per_epoch", [(60_000, 600), (50_000, 500)])
def test_goodfellow_momentum_saturates_at_epoch_250(flagfile_configs, num_images,
                                                    steps_per_epoch):
    """pylearn2's MomentumAdjustor(start=1, saturate=250) sets the momentum of epoch e + 1 (after e
    epochs) to 0.5 + 0.2 min(e / 249, 1), whatever the number of steps per epoch: MNIST's 60,000
    training images or the paper code's first 50,000, at batch 100."""
    config = train.from_dict(flagfile_configs["goodfellow_mlp_mnist.flags"])
    epoch_steps = train.steps_per_epoch(config, num_images)
    assert epoch_steps == steps_per_epoch
    tx = train.make_optimizer(config, epoch_steps)
    params = jnp.zeros(3)
    for epochs in (0, 1, 100, 200, 248, 249, 250, 400):
        expected = 0.5 + 0.2 * min(epochs / 249, 1.0)
        assert _momentum_at(tx, params, epochs * epoch_steps) == pytest.approx(expected,
                                                                               abs=1e-6)
    with pytest.raises(ValueError, match="steps per epoch"):
        train.make_optimizer(config)


def test_momentum_ramp_in_epochs_follows_the_training_split(tmp_path):
    """The training loop derives the ramp's steps from the split it loaded (the digits here)."""
    config = train.Config(model="mlp", dataset="digits", batch_size=32, loss="minimax",
                          schedule="sequential", optimizer="sgd_momentum", learning_rate=0.1,
                          momentum=0.5, final_momentum=0.7, momentum_saturate_epochs=0.5,
                          num_steps=3, log_every=1, checkpoint_every=3, sample_every=1000)
    epoch_steps = train.steps_per_epoch(config, len(train.load_training_images(config)))
    ramp = round(0.5 * epoch_steps)
    assert ramp > 3
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    # The last update was update 2 (0-based): momentum 0.5 + 0.2 * 2 / ramp.
    momentum = float(state.d_opt_state.hyperparams["momentum"])
    assert momentum == pytest.approx(0.5 + 0.2 * 2 / ramp, abs=1e-6)


def test_momentum_ramp_in_both_epochs_and_steps_is_refused():
    with pytest.raises(ValueError, match="not both"):
        train.Config(optimizer="sgd_momentum", momentum_saturate_epochs=2,
                     momentum_saturate_steps=10).validate()

"""DCGAN shapes and parameter counts against the TensorFlow tutorial's Keras summary, and the
sub-pixel transposed convolution against lax.conv_transpose."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from gan import models, spectral, subpixel


def test_dcgan_matches_the_keras_summary():
    generator, discriminator, _ = models.get_models("dcgan")
    g_vars = generator.init(jax.random.PRNGKey(0), jnp.zeros((2, 100)), train=False)
    d_vars = discriminator.init(jax.random.PRNGKey(1), jnp.zeros((2, 28, 28, 1)), train=False)
    assert optax.tree.size(g_vars["params"]) == 2_305_472
    assert optax.tree.size(g_vars["batch_stats"]) == 25_472
    assert optax.tree.size(d_vars["params"]) == 212_865
    images = generator.apply(g_vars, jnp.zeros((3, 100)), train=False)
    chex.assert_shape(images, (3, 28, 28, 1))
    chex.assert_shape(discriminator.apply(d_vars, images, train=False), (3,))
    shapes = jax.tree.map(jnp.shape, g_vars["params"])
    assert shapes["deconv0"]["kernel"] == (5, 5, 256, 128)
    assert shapes["deconv1"]["kernel"] == (5, 5, 128, 64)
    assert shapes["deconv2"]["kernel"] == (5, 5, 64, 1)


def test_phase_and_lax_generators_are_the_same_function():
    phase = models.DCGANGenerator(conv_transpose="phase")
    reference = models.DCGANGenerator(conv_transpose="lax")
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 100))
    variables = reference.init(jax.random.PRNGKey(1), z, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        phase.init(jax.random.PRNGKey(1), z, train=False))
    out_phase, stats_phase = phase.apply(variables, z, train=True, mutable=["batch_stats"])
    out_ref, stats_ref = reference.apply(variables, z, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(out_phase, out_ref, atol=2e-5)
    chex.assert_trees_all_close(stats_phase, stats_ref, atol=2e-5, rtol=1e-4)


def test_goodfellow_mlp_gan_shapes():
    generator, discriminator, value_range = models.get_models("mlp")
    g_vars = generator.init(jax.random.PRNGKey(0), jnp.zeros((2, 100)))
    d_vars = discriminator.init(jax.random.PRNGKey(1), jnp.zeros((2, 28, 28, 1)), train=False)
    images = generator.apply(g_vars, jnp.ones((2, 100)))
    chex.assert_shape(images, (2, 28, 28, 1))
    assert value_range == (0.0, 1.0) and float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert jax.tree.map(jnp.shape, d_vars["params"])["h0"]["Dense_0"]["kernel"] == (784, 1200)


def test_maxout_is_the_max_over_pieces():
    layer = models.Maxout(units=3, pieces=4, init_scale=1.0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5))
    variables = layer.init(jax.random.PRNGKey(1), x)
    dense = variables["params"]["Dense_0"]
    linear = np.asarray(x @ dense["kernel"] + dense["bias"]).reshape(2, 3, 4)
    chex.assert_trees_all_close(layer.apply(variables, x), linear.max(-1), rtol=1e-5)


def _assert_same_values_and_gradients(ours, reference, x_shape, w_shape, seed):
    """ours(x, w) == reference(x, w) and so are the gradients of a nonlinear probe loss, in
    float64 on normal x and w."""
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=x_shape))
        w = jnp.asarray(rng.normal(size=w_shape))
        chex.assert_trees_all_close(jax.jit(ours)(x, w), reference(x, w), atol=1e-12)
        probe = jnp.asarray(rng.normal(size=reference(x, w).shape))
        grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(probe * jnp.tanh(f(x, w))), (0, 1)))(
            x, w) for f in (ours, reference)]
        chex.assert_trees_all_close(grads[0], grads[1], atol=1e-12)


_NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("kernel,stride,size", [(5, 2, 7), (5, 2, 14), (5, 1, 7), (4, 2, 5),
                                                (3, 3, 4), (2, 2, 3)])
def test_subpixel_conv_transpose_equals_lax_in_values_and_gradients(kernel, stride, size):
    _assert_same_values_and_gradients(
        lambda x, w: subpixel.conv_transpose(x, w, (stride, stride)),
        lambda x, w: lax.conv_transpose(x, w, (stride, stride), "SAME", dimension_numbers=_NHWC),
        (2, size, size + 1, 3), (kernel, kernel, 3, 4), kernel * 10 + stride)


@pytest.mark.parametrize("kernel,stride,size", [(5, 2, 28), (5, 2, 14), (4, 2, 6), (3, 3, 6),
                                                (5, 2, 7)])
def test_phase_strided_conv_equals_lax_in_values_and_gradients(kernel, stride, size):
    _assert_same_values_and_gradients(
        lambda x, w: subpixel.conv(x, w, (stride, stride)),
        lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                              dimension_numbers=_NHWC),
        (2, size, size, 3), (kernel, kernel, 3, 4), kernel * 10 + stride + size)


@pytest.mark.parametrize("pads", [((1, 1), (1, 1)), ((2, 0), (0, 1)), ((-1, 2), (1, -1))])
def test_shift_add_correlation_equals_lax_in_values_and_gradients(pads):
    _assert_same_values_and_gradients(
        lambda x, k: subpixel.shift_add_correlation(x, k, pads),
        lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_NHWC),
        (2, 6, 5, 3), (3, 2, 3, 4), len(str(pads)))


@pytest.mark.parametrize("size,kernel,pads", [(7, 5, ((2, 2), (2, 2))), (7, 3, ((1, 1), (1, 1))),
                                               (6, 3, ((2, 0), (0, 1))), (5, 2, ((0, 1), (1, 2)))])
def test_spectral_correlation_equals_lax_in_values_and_gradients(size, kernel, pads):
    _assert_same_values_and_gradients(
        lambda x, k: spectral.correlation(x, k, pads),
        lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pads, dimension_numbers=_NHWC),
        (2, size, size + 1, 3), (kernel, kernel, 3, 4), size + kernel)


def test_the_dcgan_7x7_correlations_take_the_spectral_form():
    for x_shape, k_shape, pads in (((2, 7, 7, 256), (5, 5, 256, 128), ((2, 2), (2, 2))),
                                   ((2, 7, 7, 128), (3, 3, 128, 256), ((1, 1), (1, 1)))):
        jaxpr = str(jax.make_jaxpr(lambda x, k, pads=pads: subpixel.correlation(x, k, pads))(
            jnp.zeros(x_shape), jnp.zeros(k_shape)))
        assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


def _discriminator_grads(discriminator, variables, x, train, key):
    def loss(params, x):
        logits = discriminator.apply({"params": params}, x, train=train, rngs={"dropout": key})
        return jnp.sum(jnp.sin(logits))
    return jax.jit(jax.value_and_grad(loss, (0, 1)))(variables["params"], x)


def test_fast_and_reference_discriminators_are_the_same_function():
    fast = models.DCGANDiscriminator()
    reference = models.DCGANDiscriminator(conv="lax", dropout="flax")
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 28, 28, 1))
    variables = reference.init(jax.random.PRNGKey(1), x, train=False)
    chex.assert_trees_all_equal(variables, fast.init(jax.random.PRNGKey(1), x, train=False))
    key = jax.random.PRNGKey(2)
    # Training mode, float32: the same dropout masks, so equal up to float rounding.
    results = [_discriminator_grads(d, variables, x, True, key) for d in (fast, reference)]
    chex.assert_trees_all_close(results[0], results[1], atol=1e-5, rtol=1e-4)
    # float64 without dropout (whose float64 masks come from 64-bit uniforms in nn.Dropout).
    with jax.enable_x64(True):
        variables64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), variables)
        results = [_discriminator_grads(d, variables64, x.astype(jnp.float64), False, key)
                   for d in (fast, reference)]
        chex.assert_trees_all_close(results[0], results[1], atol=1e-12)

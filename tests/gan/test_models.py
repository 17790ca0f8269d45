"""DCGAN shapes and parameter counts against the TensorFlow tutorial's Keras summary, and the
sub-pixel transposed convolution against lax.conv_transpose."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from gan import models, subpixel


def test_dcgan_matches_the_keras_summary():
    generator, discriminator, _ = models.get_models("dcgan")
    g_vars = generator.init(jax.random.PRNGKey(0), jnp.zeros((2, 100)), train=False)
    d_vars = discriminator.init(jax.random.PRNGKey(1), jnp.zeros((2, 28, 28, 1)), train=False)
    assert models.count_parameters(g_vars["params"]) == 2_305_472
    assert models.count_parameters(g_vars["batch_stats"]) == 25_472
    assert models.count_parameters(d_vars["params"]) == 212_865
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


@pytest.mark.parametrize("kernel,stride,size", [(5, 2, 7), (5, 2, 14), (5, 1, 7), (4, 2, 5),
                                                (3, 3, 4), (2, 2, 3)])
def test_subpixel_conv_transpose_equals_lax_in_values_and_gradients(kernel, stride, size):
    rng = np.random.default_rng(kernel * 10 + stride)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, size, size + 1, 3)))
        w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)))

        def reference(x, w):
            return lax.conv_transpose(x, w, (stride, stride), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def ours(x, w):
            return subpixel.conv_transpose(x, w, (stride, stride))

        chex.assert_trees_all_close(ours(x, w), reference(x, w), atol=1e-12)
        probe = jnp.asarray(rng.normal(size=reference(x, w).shape))
        grads = [jax.grad(lambda x, w, f=f: jnp.sum(probe * jnp.tanh(f(x, w))), (0, 1))(x, w)
                 for f in (ours, reference)]
        chex.assert_trees_all_close(grads[0], grads[1], atol=1e-12)

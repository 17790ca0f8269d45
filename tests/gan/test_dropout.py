"""The unrolled Threefry dropout against jax.random.bits and flax's nn.Dropout."""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gan import dropout, models


@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 7, 7, 8)])
@pytest.mark.parametrize("typed", [False, True])
def test_random_bits_equal_jax_random_bits(shape, typed):
    key = jax.random.key(11) if typed else jax.random.PRNGKey(11)
    key = jax.random.fold_in(key, 3)
    np.testing.assert_array_equal(jax.jit(dropout.random_bits, static_argnums=1)(key, shape),
                                  jax.random.bits(key, shape))


def test_threefry2x32_known_answer():
    # Random123's known-answer vector for Threefry-2x32-20, key and counter all ones.
    key = jnp.array([0xFFFFFFFF, 0xFFFFFFFF], jnp.uint32)
    ones = jnp.array([0xFFFFFFFF], jnp.uint32)
    out = dropout.threefry2x32(key, ones, ones)
    assert [int(out[0][0]), int(out[1][0])] == [0x1CB996FC, 0xBB002BE7]


def test_random_bits_refuse_other_generators():
    with pytest.raises(ValueError, match="threefry2x32"):
        dropout.random_bits(jax.random.key(0, impl="rbg"), (4,))


@pytest.mark.parametrize("rate", [0.3, 1.0])
def test_dropout_equals_flax_dropout_in_values_and_gradients(rate):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 9, 8))
    key = jax.random.PRNGKey(42)

    @functools.partial(jax.jit, static_argnums=0)
    def apply(module, x):
        return module.apply({}, x, rngs={"dropout": key})

    ours = dropout.Dropout(rate)
    reference = nn.Dropout(rate, deterministic=False)
    y = apply(ours, x)
    np.testing.assert_array_equal(y, apply(reference, x))
    probe = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    grads = [jax.grad(lambda x, m=m: jnp.sum(probe * apply(m, x)))(x) for m in (ours, reference)]
    np.testing.assert_array_equal(grads[0], grads[1])
    if 0.0 < rate < 1.0:
        kept = y != 0
        assert abs(float(jnp.mean(kept)) - (1.0 - rate)) < 0.05
        chex.assert_trees_all_close(y[kept] * (1 - rate), x[kept], rtol=1e-6)
    np.testing.assert_array_equal(dropout.Dropout(rate, deterministic=True).apply({}, x), x)


def _rounds_outside_conditionals(hlo: str) -> tuple[int, int]:
    """(computations holding Threefry's 20 rounds that are not a conditional's branch nor called
    from one, branch computations) of a compiled module's text."""
    bodies = dict(re.findall(r"^%?(\S+) \([^\n]*\) -> [^\n]* \{\n(.*?)\n\}", hlo, re.S | re.M))
    rounds = {name for name, body in bodies.items() if body.count(" xor(") >= 20}
    branches = {b for group in re.findall(r"branch_computations=\{([^}]*)\}", hlo)
                for b in re.findall(r"%?([\w.\-]+)", group)}
    inside = set(branches)
    for branch in branches:
        inside |= set(re.findall(r"calls=%?([\w.\-]+)", bodies.get(branch, "")))
    return len(rounds - inside), len(branches)


def test_each_mask_is_computed_once_in_a_compiled_gradient():
    """The discriminator's gradient reads each mask in its forward and backward loops; the 20
    rounds must be compiled only inside the conditionals (one per mask, two branches each), not
    copied into those loops."""
    discriminator = models.DCGANDiscriminator()
    x = jnp.zeros((2, 28, 28, 1))
    params = discriminator.init(jax.random.PRNGKey(0), x, train=False)["params"]

    def loss(params, x):
        logits = discriminator.apply({"params": params}, x, train=True,
                                     rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.sum(logits ** 2)

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(params, x).compile().as_text()
    assert _rounds_outside_conditionals(hlo) == (0, 4)

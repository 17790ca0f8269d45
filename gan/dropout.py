"""Dropout with the same masks as `flax.linen.Dropout`, bit for bit, generated faster on CPU.

`nn.Dropout(rate)` keeps x[i] with probability q = 1 - rate and scales it by 1 / q:

    y[i] = x[i] / q  if  u[i] < q  else 0,     u[i] = (bits[i] >> 9) * 2^-23,

with `bits = jax.random.bits(key, x.shape)` (`jax.random.bernoulli`'s uniform floats). Under the
default threefry PRNG with `jax_threefry_partitionable`, those bits are

    bits[i] = a ^ b,   (a, b) = threefry2x32(key, (0, i)),   i the flat index,

i.e. Threefry-2x32 with 20 rounds (Salmon et al., 2011) of a 64-bit counter. XLA's CPU lowering of
`jax.random.bits` runs the rounds as a while loop over whole arrays with rotation amounts read at
run time, much slower than the same rounds unrolled with constant rotations, which XLA fuses
into one vectorised loop together with the comparison and the select. `random_bits` is that
unrolled form; `Dropout` uses it with the key `nn.Dropout` would draw, so masks, outputs and
gradients are those of `nn.Dropout`.

Each mask is read by several loops of a training step: the forward select, and the backward
select of every gradient that flows through the layer. XLA's CPU fusion copies an elementwise
producer into each of its consumers, so it would run the 20 rounds once per consumer, and it
removes `lax.optimization_barrier` before fusing. `materialised_keep_mask` computes the mask as
the result of a conditional whose two branches are that same computation: a conditional's result
is a buffer, written once and read by every consumer.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, d: int) -> jax.Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32, 20 rounds, of the counter words (x0, x1) under key words key[0], key[1]."""
    ks = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, r) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Equals `jax.random.bits(key, shape)` (uint32) for a threefry key, raw or typed."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
        if impl != "threefry2x32":
            raise ValueError(f"random_bits needs a threefry2x32 key, got a key of {impl}")
        key = jax.random.key_data(key)
    if not jax.config.jax_threefry_partitionable:
        raise ValueError("random_bits reproduces jax.random.bits with jax_threefry_partitionable")
    size = math.prod(shape)
    if size >= 2 ** 32:
        raise ValueError(f"random_bits supports fewer than 2^32 values, got shape {shape}")
    counter = lax.iota(jnp.uint32, size).reshape(shape)
    a, b = threefry2x32(key, jnp.zeros_like(counter), counter)
    return a ^ b


def keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """Equals `jax.random.bernoulli(key, keep_prob, shape)` (float32 uniforms, mode 'low')."""
    mantissa = random_bits(key, shape) >> np.uint32(9)
    uniform = lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32) - 1.0
    return uniform < jnp.float32(keep_prob)


def materialised_keep_mask(key: jax.Array, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
    """`keep_mask`, computed once per step however many loops read it (see the module's
    docstring): both branches of the conditional are `keep_mask`, so its predicate, a bit of the
    key known only at run time, does not change the result."""
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    mask = lambda k: keep_mask(k, keep_prob, shape)  # noqa: E731
    return lax.cond(words[0] & np.uint32(1), mask, mask, key)


class Dropout(nn.Module):
    """Drop-in for `nn.Dropout(rate, deterministic)` (no `broadcast_dims`): same key from the
    'dropout' rng collection, same mask, same output."""

    rate: float
    deterministic: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        mask = materialised_keep_mask(self.make_rng("dropout"), keep_prob, x.shape)
        return lax.select(mask, x / keep_prob, jnp.zeros_like(x))

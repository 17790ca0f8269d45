"""The LSTM cell both recurrent users share (the learned optimizer, the NAS controller), as a pure
function of fused weights:

    i, f, g, o = split(x W_x + h W_h + b, 4)
    c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g),    h' = σ(o) ⊙ tanh(c')

It is the function of `flax.linen.LSTMCell` (tested equal, parameters mapped gate by gate); the
fused [in, 4H] layout makes one matrix product per step, which the learned optimizer applies to
every coordinate of the optimizee at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lstm_cell(params: dict[str, jax.Array], x: jax.Array, h: jax.Array, c: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """One step: x [..., in], h and c [..., H], params w_x [in, 4H], w_h [H, 4H], b [4H] ->
    (h', c')."""
    gates = x @ params["w_x"] + h @ params["w_h"] + params["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c

"""The LSTM cell both recurrent users share (the learned optimizer, the NAS controller), as a pure
function of fused weights:

    i, f, g, o = split(x W_x + h W_h + b, 4)
    c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g),    h' = σ(o) ⊙ tanh(c')

It is the function of `flax.linen.LSTMCell` (tested equal, parameters mapped gate by gate); the
fused [in, 4H] layout makes one matrix product per step.

`lstm_cell` takes row vectors (batch first, features last); `lstm_cell_columns` is the same cell on
column vectors (features first, batch last), for the learned optimizer's batch of every coordinate
of the optimizee: there each gate is a contiguous [H, N] block, and the gates' elementwise work and
the weight gradient (a product over N) run on long rows rather than on rows of H values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gates_to_state(gates: jax.Array, c: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(h', c') from the pre-activations [i, f, g, o] stacked along `axis`, and the cell c."""
    i, f, g, o = jnp.split(gates, 4, axis=axis)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def lstm_cell(params: dict[str, jax.Array], x: jax.Array, h: jax.Array, c: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
    """One step: x [..., in], h and c [..., H], params w_x [in, 4H], w_h [H, 4H], b [4H] ->
    (h', c')."""
    return gates_to_state(x @ params["w_x"] + h @ params["w_h"] + params["b"], c, axis=-1)


def lstm_cell_columns(params: dict[str, jax.Array], x: jax.Array, h: jax.Array, c: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """`lstm_cell` on columns: x [in, N], h and c [H, N], the same params -> (h', c') [H, N];
    one product [4H, in + H] @ [in + H, N]."""
    weights = jnp.concatenate([params["w_x"], params["w_h"]]).T
    gates = weights @ jnp.concatenate([x, h]) + params["b"][:, None]
    return gates_to_state(gates, c, axis=0)

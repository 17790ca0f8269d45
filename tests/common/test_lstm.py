"""The shared LSTM cell is flax's LSTMCell with its gates' weights fused; its column form is the
same function."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.lstm import lstm_cell, lstm_cell_columns


def test_lstm_cell_equals_flax_lstm_cell_in_values_and_gradients():
    inputs, hidden = 3, 5
    x, h, c = jax.random.normal(jax.random.PRNGKey(0), (3, 4, max(inputs, hidden)))
    x, h, c = x[:, :inputs], h[:, :hidden], c[:, :hidden]
    cell = nn.LSTMCell(hidden, gate_fn=nn.sigmoid, activation_fn=nn.tanh)
    flax_params = cell.init(jax.random.PRNGKey(1), (c, h), x)["params"]
    flax_params = jax.tree.map(lambda p: p + 0.1, flax_params)  # non-zero biases too
    gates = "ifgo"

    def fused(flax_params):
        return {"w_x": jnp.concatenate([flax_params[f"i{g}"]["kernel"] for g in gates], axis=1),
                "w_h": jnp.concatenate([flax_params[f"h{g}"]["kernel"] for g in gates], axis=1),
                "b": jnp.concatenate([flax_params[f"h{g}"]["bias"] for g in gates])}

    def ours(flax_params, x):
        return lstm_cell(fused(flax_params), x, h, c)

    def theirs(flax_params, x):
        (new_c, new_h), _ = cell.apply({"params": flax_params}, (c, h), x)
        return new_h, new_c

    for a, b in zip(ours(flax_params, x), theirs(flax_params, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda p, x: sum(jnp.sum(jnp.sin(t)) for t in f(p, x))  # noqa: E731
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(flax_params, x)),
                    jax.tree.leaves(jax.grad(loss(theirs), argnums=(0, 1))(flax_params, x))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_column_cell_equals_the_row_cell_in_values_and_gradients():
    inputs, hidden, batch = 3, 5, 7
    keys = jax.random.split(jax.random.PRNGKey(2), 6)
    params = {"w_x": jax.random.normal(keys[0], (inputs, 4 * hidden)),
              "w_h": jax.random.normal(keys[1], (hidden, 4 * hidden)),
              "b": jax.random.normal(keys[2], (4 * hidden,))}
    x = jax.random.normal(keys[3], (batch, inputs))
    h, c = (jax.random.normal(k, (batch, hidden)) for k in keys[4:])

    def rows(params, x, h, c):
        return lstm_cell(params, x, h, c)

    def columns(params, x, h, c):
        new_h, new_c = lstm_cell_columns(params, x.T, h.T, c.T)
        return new_h.T, new_c.T

    for a, b in zip(columns(params, x, h, c), rows(params, x, h, c)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda *args: sum(jnp.sum(jnp.sin(t)) for t in f(*args))  # noqa: E731
    for a, b in zip(jax.tree.leaves(jax.grad(loss(columns), argnums=(0, 1, 2, 3))(params, x, h, c)),
                    jax.tree.leaves(jax.grad(loss(rows), argnums=(0, 1, 2, 3))(params, x, h, c))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

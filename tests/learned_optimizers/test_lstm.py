"""The LSTM optimizer against hand computations: preprocessing, update, state, composition,
files."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_optimizers import lstm


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lstm_by_hand(phi, x, h, c):
    """One coordinate: x [in], h and c [L, H] -> (output, h', c'), in float64 numpy."""
    phi = jax.tree.map(lambda a: np.asarray(a, np.float64), phi)
    hidden = h.shape[1]
    inputs, new_h, new_c = x, [], []
    for layer in range(h.shape[0]):
        p = phi[f"layer{layer}"]
        z = inputs @ p["w_x"] + h[layer] @ p["w_h"] + p["b"]
        i, f, g, o = (z[k * hidden:(k + 1) * hidden] for k in range(4))
        cell = sigmoid(f) * c[layer] + sigmoid(i) * np.tanh(g)
        inputs = sigmoid(o) * np.tanh(cell)
        new_h.append(inputs)
        new_c.append(cell)
    return inputs @ phi["output"]["w"] + phi["output"]["b"], np.stack(new_h), np.stack(new_c)


def test_preprocessing_both_branches_and_threshold():
    p = 10.0
    threshold = np.float32(jnp.exp(-p))  # e^-p as the float32 computation sees it
    g = np.array([3.0, -0.25, 1e-6, -2e-5, 0.0, threshold, np.nextafter(threshold, np.float32(0))],
                 np.float32)
    got = np.asarray(lstm.preprocess(jnp.asarray(g), "log_sign", p))
    expected = [(np.log(abs(v)) / p, np.sign(v)) if abs(v) >= threshold else (-1.0, np.exp(p) * v)
                for v in g.astype(np.float64)]
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[5], [-1.0, 1.0], atol=1e-6)  # large branch at the threshold
    np.testing.assert_allclose(got[6], [-1.0, 1.0], atol=1e-6)  # small branch just below it
    np.testing.assert_array_equal(np.asarray(lstm.preprocess(jnp.asarray(g), "identity"))[:, 0], g)


@pytest.mark.parametrize("preprocessing", lstm.PREPROCESSING)
def test_update_equals_lstm_by_hand_per_coordinate(preprocessing):
    phi = lstm.init_meta_params(jax.random.PRNGKey(1), preprocessing, hidden_size=5,
                                output_init_scale=1.0)
    scale = 0.3
    tx = lstm.lstm_optimizer(phi, scale, preprocessing)
    params = {"a": jnp.array([1.0]), "b": jnp.array(-2.0)}
    state = tx.init(params)
    column = {"a": 0, "b": 1}  # the coordinates' order in the state (ravel_pytree's)
    h = {name: np.zeros((2, 5)) for name in params}
    c = {name: np.zeros((2, 5)) for name in params}
    for grads in ({"a": jnp.array([0.5]), "b": jnp.array(-1e-7)},
                  {"a": jnp.array([-3.0]), "b": jnp.array(2e-2)}):
        updates, state = tx.update(grads, state, params)
        for name in params:
            g = float(np.asarray(grads[name]).reshape(()))
            x = (np.array([g]) if preprocessing == "identity" else
                 np.array([np.log(abs(g)) / 10, np.sign(g)]) if abs(g) >= np.exp(-10) else
                 np.array([-1.0, np.exp(10) * g]))
            out, h[name], c[name] = lstm_by_hand(phi, x, h[name], c[name])
            assert updates[name].shape == params[name].shape
            np.testing.assert_allclose(np.asarray(updates[name]).reshape(()), scale * out,
                                       rtol=1e-5, atol=1e-7)
            for layer in range(2):
                np.testing.assert_allclose(np.asarray(state.h[layer][:, column[name]]),
                                           h[name][layer], rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(np.asarray(state.c[layer][:, column[name]]),
                                           c[name][layer], rtol=1e-5, atol=1e-7)


def test_state_holds_every_coordinate_per_layer():
    phi = lstm.init_meta_params(jax.random.PRNGKey(0), hidden_size=7, num_layers=3)
    params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}, "scalar": jnp.zeros(())}
    state = lstm.lstm_optimizer(phi).init(params)
    for layers in (state.h, state.c):
        assert [s.shape for s in layers] == [(7, 16)] * 3
    updates, _ = lstm.lstm_optimizer(phi).update(params, state, params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)


def test_composes_inside_optax_chain():
    phi = lstm.init_meta_params(jax.random.PRNGKey(2), output_init_scale=1.0)
    learned = lstm.lstm_optimizer(phi, 0.1)
    chained = optax.chain(optax.clip_by_global_norm(1.0), learned, optax.scale(-2.0))
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
    grads = {"w": jnp.full((2, 3), 4.0), "b": jnp.array([3.0, -4.0])}
    norm = np.sqrt(6 * 16 + 9 + 16)
    clipped = jax.tree.map(lambda g: g / norm, grads)
    expected, _ = learned.update(clipped, learned.init(params), params)
    got, state = chained.update(grads, chained.init(params), params)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), -2.0 * np.asarray(e), rtol=1e-5)
    assert [h.shape for h in state[1].h] == [(20, 8), (20, 8)]


def test_save_load_round_trip(tmp_path):
    phi = lstm.init_meta_params(jax.random.PRNGKey(3), "log_sign", hidden_size=6)
    path = lstm.save(str(tmp_path / "phi.npz"), phi, scale=0.1, preprocessing="log_sign")
    loaded, settings = lstm.load(path)
    assert settings == {"scale": 0.1, "preprocessing": "log_sign"}
    assert jax.tree.structure(loaded) == jax.tree.structure(phi)
    for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    params = {"x": jnp.linspace(-1.0, 1.0, 5)}
    original, restored = lstm.lstm_optimizer(phi, 0.1, "log_sign"), lstm.load_optimizer(path)
    u1, _ = original.update(params, original.init(params))
    u2, _ = restored.update(params, restored.init(params))
    np.testing.assert_array_equal(np.asarray(u1["x"]), np.asarray(u2["x"]))


def test_mismatched_preprocessing_is_a_clear_error():
    phi = lstm.init_meta_params(jax.random.PRNGKey(0), "identity")
    with pytest.raises(ValueError, match="1 inputs per coordinate"):
        lstm.lstm_optimizer(phi, preprocessing="log_sign")


@pytest.mark.parametrize("num_blocks", [3, 50])
def test_column_blocks_compute_the_same_updates_states_and_meta_gradient(num_blocks):
    """`num_blocks` calls on column blocks (3 blocks of 42 coordinates; 50 > 42: one per
    coordinate) against one call on all: updates, states and ∂/∂φ of a function of two steps'
    updates agree (float64)."""
    with jax.enable_x64(True):
        phi = lstm.init_meta_params(jax.random.PRNGKey(4), "log_sign", hidden_size=5,
                                    output_init_scale=1.0)
        params = {"w": jnp.zeros((37,)), "b": jnp.zeros((5,))}
        grads = [jax.tree.map(lambda p, k=k: jax.random.normal(jax.random.PRNGKey(k), p.shape),
                              params) for k in (5, 6)]

        def two_steps(phi, num_blocks):
            tx = lstm.lstm_optimizer(phi, 0.1, "log_sign", num_blocks=num_blocks)
            state, total, all_updates = tx.init(params), 0.0, []
            for g in grads:
                updates, state = tx.update(g, state, params)
                all_updates.append(updates)
                total += sum(jnp.vdot(jnp.sin(3.0 * u), jnp.arange(u.size) + 1.0)
                             for u in jax.tree.leaves(updates))
            return total, (state, all_updates)

        run = jax.jit(jax.value_and_grad(two_steps, has_aux=True), static_argnums=1)
        (value, state), grad = run(phi, 1)
        (value_b, state_b), grad_b = run(phi, num_blocks)
        np.testing.assert_allclose(value_b, value, rtol=1e-12)
        for a, b in zip(jax.tree.leaves((state, grad)), jax.tree.leaves((state_b, grad_b))):
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)
        assert abs(float(value)) > 1e-3 and float(optax.tree.norm(grad)) > 1e-3

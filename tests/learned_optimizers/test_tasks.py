"""Task families and the scan unroll, against hand computations and a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from learned_optimizers import lstm, tasks


def test_quadratic_loss_is_the_formula():
    family = tasks.quadratic_family()
    theta, (w, y) = family.sample(jax.random.PRNGKey(0))
    assert theta.shape == (10,) and w.shape == (10, 10) and y.shape == (10,)
    expected = np.sum((np.asarray(w, np.float64) @ np.asarray(theta) - np.asarray(y)) ** 2)
    np.testing.assert_allclose(family.loss(theta, (w, y), None, ()), expected, rtol=1e-5)


def test_mlp_loss_is_cross_entropy_on_the_drawn_minibatch():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, 50).astype(np.int32)
    family = tasks.mlp_family(images, labels, "mlp_2layer", batch_size=8)
    params, task = family.sample(jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    idx = np.asarray(jax.random.randint(key, (8,), 0, 50))
    x = images[idx].reshape(8, -1) / 255.0
    for layer in ("Dense_0", "Dense_1"):
        x = 1 / (1 + np.exp(-(x @ np.asarray(params[layer]["kernel"]) + params[layer]["bias"])))
    logits = x @ np.asarray(params["Dense_2"]["kernel"]) + np.asarray(params["Dense_2"]["bias"])
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean(log_probs[np.arange(8), labels[idx]])
    np.testing.assert_allclose(family.loss(params, task, key, family.data), expected, rtol=1e-5)


def test_scan_unroll_equals_python_loop_of_updates():
    family = tasks.quadratic_family()
    tx = lstm.lstm_optimizer(lstm.init_meta_params(jax.random.PRNGKey(3), "identity",
                                                   output_init_scale=1.0), 0.5, "identity")
    traj = tasks.start(tx, family, jax.random.PRNGKey(4))
    end, losses = jax.jit(lambda t: tasks.unroll(tx, family, t, 7, first_step=3))(traj)

    params, opt_state, expected = traj.params, traj.opt_state, []
    for t in range(3, 10):
        loss, grads = jax.value_and_grad(family.loss)(params, traj.task,
                                                      jax.random.fold_in(traj.key, t), ())
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        expected.append(loss)
    np.testing.assert_allclose(losses, np.array(expected), rtol=2e-5)
    np.testing.assert_allclose(end.params, params, rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(end.opt_state), jax.tree.leaves(opt_state)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_learning_curve_of_sgd_on_a_quadratic_is_the_closed_form():
    # f(θ) = ||Wθ - y||² with W = I: θ_{t+1} = θ_t - 2 lr (θ_t - y),
    # so θ_t - y = (1 - 2 lr)^t (θ_0 - y)
    base = tasks.quadratic_family()
    family = tasks.TaskFamily("identity_quadratic",
                              lambda k: (base.sample(k)[0], (jnp.eye(10), base.sample(k)[1][1])),
                              base.loss)
    lr = 0.1
    curve = tasks.learning_curve(optax.sgd(lr), family, jax.random.PRNGKey(5), 6)
    (theta0, (_, y)) = family.sample(jax.random.split(jax.random.PRNGKey(5))[0])
    expected = [(1 - 2 * lr) ** (2 * t) * np.sum((np.asarray(theta0) - np.asarray(y)) ** 2)
                for t in range(7)]
    np.testing.assert_allclose(curve, expected, rtol=1e-5)


def test_randomly_scaled_family_sees_the_gradient_through_its_scales():
    """f_c(θ) = f(c ⊙ θ) from θ₀ / c: the same loss at the start, gradient c ⊙ ∇f(c ⊙ θ), scales
    exp(U(-r, r)) drawn per coordinate."""
    family = tasks.quadratic_family()
    scaled = tasks.randomly_scaled(family, 2.0)
    theta, (task, scales) = scaled.sample(jax.random.PRNGKey(0))
    assert np.all(np.abs(np.log(scales)) <= 2.0) and np.std(np.log(scales)) > 0.3
    key = jax.random.PRNGKey(1)
    np.testing.assert_allclose(scaled.loss(theta, (task, scales), key, ()),
                               family.loss(theta * scales, task, key, ()), rtol=1e-6)
    w, y = task
    residual = w @ (scales * theta) - y
    np.testing.assert_allclose(jax.grad(scaled.loss)(theta, (task, scales), key, ()),
                               scales * (2 * w.T @ residual), rtol=1e-4)


def test_mixture_task_is_a_task_of_its_drawn_family_on_that_familys_data():
    """Each family drawn about equally often over 64 tasks; a task's loss and gradient are its
    family's on its own images (the two datasets differ, so the wrong data would show)."""
    rng = np.random.default_rng(0)
    members = [tasks.mlp_family(rng.integers(0, 256, (30, 3, 3, 1), dtype=np.uint8),
                                rng.integers(0, 3, 30).astype(np.int32), batch_size=8)
               for _ in range(2)]
    mixed = tasks.mixture(members)
    key = jax.random.PRNGKey(5)
    indices = []
    for task_key in jax.random.split(jax.random.PRNGKey(0), 64):
        params, (index, member_tasks) = mixed.sample(task_key)
        indices.append(int(index))
        member = members[int(index)]
        for a, b in zip(jax.tree.leaves(params),
                        jax.tree.leaves(member.sample(jax.random.split(task_key)[1])[0])):
            np.testing.assert_array_equal(a, b)
        task = (index, member_tasks)
        np.testing.assert_allclose(mixed.loss(params, task, key, mixed.data),
                                   member.loss(params, (), key, member.data), rtol=1e-6)
        other = members[1 - int(index)]
        assert abs(float(mixed.loss(params, task, key, mixed.data))
                   - float(other.loss(params, (), key, other.data))) > 1e-4
    assert 16 <= sum(indices) <= 48
    with pytest.raises(ValueError, match="Cannot mix task families"):
        tasks.mixture([members[0], tasks.mlp_family(rng.integers(0, 256, (30, 4, 4, 1), np.uint8),
                                                    rng.integers(0, 3, 30).astype(np.int32),
                                                    batch_size=8)])

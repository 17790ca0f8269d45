"""The learning-rate grid search on a problem whose best rate is known."""

import jax
import jax.numpy as jnp
import numpy as np

from learned_optimizers import baselines, tasks


def scaled_quadratic_family(curvature: float) -> tasks.TaskFamily:
    """f(θ) = ||Wθ - y||² with W = sqrt(curvature / 2) I: gradient descent converges in one step
    exactly at learning rate 1 / curvature, and the loss after T steps is
    (1 - lr·curvature)^2T f₀."""
    base = tasks.quadratic_family()
    w = jnp.sqrt(curvature / 2) * jnp.eye(10)
    return tasks.TaskFamily("scaled", lambda k: (base.sample(k)[0], (w, base.sample(k)[1][1])),
                            base.loss)


def test_grid_search_picks_the_known_best_learning_rate():
    curvature = 10 ** 1.75  # best rate 10^-1.75, a grid point
    family = scaled_quadratic_family(curvature)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    losses = baselines.grid_losses("sgd", family, keys, num_steps=5)
    assert losses.shape == (len(baselines.LEARNING_RATES), 3)
    f0 = np.array([float(tasks.learning_curve(baselines.with_learning_rate("sgd", 0.0), family,
                                              k, 0)[0]) for k in keys])
    contraction = (1 - baselines.LEARNING_RATES * curvature) ** 10
    expected = contraction[:, None] * f0[None, :]
    finite = np.isfinite(losses)
    np.testing.assert_allclose(losses[finite], expected[finite], rtol=1e-3, atol=1e-6)
    assert baselines.tune(family, keys, 5, names=("sgd",)) == {"sgd": baselines.LEARNING_RATES[9]}
    np.testing.assert_allclose(baselines.LEARNING_RATES[9], 10 ** -1.75)


def test_best_learning_rate_ignores_diverged_rates():
    losses = np.array([[1.0, 2.0], [0.1, np.inf], [0.5, 0.5], [np.nan, 0.0]])
    assert baselines.best_learning_rate(losses, [1, 2, 3, 4]) == 3


def test_a_best_rate_at_the_end_of_the_grid_is_reported(caplog):
    assert baselines.best_learning_rate(np.array([[1.0], [0.5], [0.1]]), [1, 2, 3]) == 3
    assert "at the end of the grid 1 .. 3" in caplog.text
    caplog.clear()
    assert baselines.best_learning_rate(np.array([[1.0], [0.1], [0.5]]), [1, 2, 3]) == 2
    assert "end of the grid" not in caplog.text

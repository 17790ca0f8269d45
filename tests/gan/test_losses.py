"""Each GAN loss against its formula computed by hand, and its gradient against finite
differences."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gan import losses

REAL = np.array([2.0, -0.5, 0.3, 4.0])
FAKE = np.array([-3.0, 0.1, 1.5, -0.2])


def d_prob(logits):
    return 1.0 / (1.0 + np.exp(-logits))


def test_value_function_is_the_papers_minibatch_estimate():
    expected = np.mean(np.log(d_prob(REAL))) + np.mean(np.log(1.0 - d_prob(FAKE)))
    chex.assert_trees_all_close(losses.value_function(REAL, FAKE), expected, rtol=1e-6)


def test_minimax_discriminator_loss_is_minus_v():
    expected = -(np.mean(np.log(d_prob(REAL))) + np.mean(np.log(1.0 - d_prob(FAKE))))
    chex.assert_trees_all_close(losses.minimax_discriminator_loss(REAL, FAKE), expected, rtol=1e-6)
    chex.assert_trees_all_close(losses.minimax_discriminator_loss(REAL, FAKE),
                                -losses.value_function(REAL, FAKE), rtol=1e-6)


def test_minimax_generator_loss_is_the_part_of_v_that_depends_on_g():
    expected = np.mean(np.log(1.0 - d_prob(FAKE)))
    chex.assert_trees_all_close(losses.minimax_generator_loss(FAKE), expected, rtol=1e-6)
    v_minus_real_term = losses.value_function(REAL, FAKE) - np.mean(np.log(d_prob(REAL)))
    chex.assert_trees_all_close(losses.minimax_generator_loss(FAKE), v_minus_real_term, rtol=1e-6)


def test_non_saturating_generator_loss():
    chex.assert_trees_all_close(losses.non_saturating_generator_loss(FAKE),
                                -np.mean(np.log(d_prob(FAKE))), rtol=1e-6)


def test_saturation_the_minimax_gradient_vanishes_when_d_rejects_samples():
    confident = jnp.array([-12.0])  # D(G(z)) ~ 6e-6
    g_minimax = jax.grad(losses.minimax_generator_loss)(confident)
    g_nonsat = jax.grad(losses.non_saturating_generator_loss)(confident)
    assert abs(float(g_minimax[0])) < 1e-4 and abs(float(g_nonsat[0])) > 0.99


def test_losses_are_stable_for_extreme_logits():
    big = jnp.array([200.0, -200.0])
    for value in (losses.minimax_discriminator_loss(big, -big), losses.minimax_generator_loss(big),
                  losses.non_saturating_generator_loss(-big)):
        assert np.isfinite(float(value))
    chex.assert_trees_all_close(losses.non_saturating_generator_loss(jnp.array([-200.0])), 200.0)


def test_wasserstein_and_hinge():
    chex.assert_trees_all_close(losses.wasserstein_critic_loss(REAL, FAKE),
                                FAKE.mean() - REAL.mean(), rtol=1e-6)
    chex.assert_trees_all_close(losses.wasserstein_generator_loss(FAKE), -FAKE.mean(), rtol=1e-6)
    chex.assert_trees_all_close(
        losses.hinge_discriminator_loss(REAL, FAKE),
        np.mean(np.maximum(0, 1 - REAL)) + np.mean(np.maximum(0, 1 + FAKE)), rtol=1e-6)
    chex.assert_trees_all_close(losses.hinge_generator_loss(FAKE), -FAKE.mean(), rtol=1e-6)


def test_gradient_penalty_of_a_linear_critic():
    # f(x) = <w, x> has gradient w everywhere, so the penalty is (||w|| - 1)^2 exactly.
    w = jnp.array([[0.3, -1.2], [2.0, 0.5]])
    critic = lambda x: jnp.sum(x * w, axis=(1, 2))  # noqa: E731
    real = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 2))
    fake = jax.random.normal(jax.random.PRNGKey(1), (5, 2, 2))
    penalty = losses.gradient_penalty(critic, real, fake, jax.random.PRNGKey(2))
    chex.assert_trees_all_close(penalty, (np.linalg.norm(np.asarray(w)) - 1.0) ** 2, rtol=1e-5)


def _finite_difference_grad(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = eps
        grad.flat[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return grad


@pytest.mark.parametrize("name", ["minimax_discriminator_loss", "wasserstein_critic_loss",
                                  "hinge_discriminator_loss"])
def test_discriminator_loss_gradients_match_finite_differences(name):
    fn = getattr(losses, name)
    with jax.enable_x64(True):
        for argnum, point in ((0, REAL), (1, FAKE)):
            def f(x):
                args = [REAL, FAKE]
                args[argnum] = x
                return float(fn(*map(jnp.asarray, args)))
            analytic = jax.grad(lambda *a: fn(*a), argnums=argnum)(jnp.asarray(REAL),
                                                                   jnp.asarray(FAKE))
            chex.assert_trees_all_close(analytic, _finite_difference_grad(f, point), atol=1e-6)


@pytest.mark.parametrize("name", ["minimax_generator_loss", "non_saturating_generator_loss",
                                  "wasserstein_generator_loss", "hinge_generator_loss"])
def test_generator_loss_gradients_match_finite_differences(name):
    fn = getattr(losses, name)
    with jax.enable_x64(True):
        analytic = jax.grad(fn)(jnp.asarray(FAKE))
        numeric = _finite_difference_grad(lambda x: float(fn(jnp.asarray(x))), FAKE)
        chex.assert_trees_all_close(analytic, numeric, atol=1e-6)


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match="minimax, non_saturating, wasserstein_gp, hinge"):
        losses.get_losses("least_squares")

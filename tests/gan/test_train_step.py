"""The jitted train step against Algorithm 1 and the tutorial's step written out by hand."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gan import models, networks, train


def _real(k, batch, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, (k, batch, 28, 28, 1)).astype(np.float32))


def _bce_d(real_logits, fake_logits):
    # -[mean log D(x) + mean log(1 - D(G(z)))], written with log(sigmoid) explicitly.
    return -(jnp.mean(jnp.log(jax.nn.sigmoid(real_logits)))
             + jnp.mean(jnp.log(1.0 - jax.nn.sigmoid(fake_logits))))


def test_sequential_step_with_k2_equals_two_d_updates_then_one_g_update():
    # SGD keeps updates linear in the gradients, so float32 rounding stays at rounding level
    # (Adam's first step maps any gradient near zero to +-lr, amplifying rounding).
    config = train.Config(model="dcgan", loss="non_saturating", schedule="sequential", d_steps=2,
                          batch_size=4, optimizer="sgd_momentum", learning_rate=0.05,
                          momentum=0.9, final_momentum=0.9, seed=3)
    state0 = train.create_train_state(config, jax.random.PRNGKey(7))
    real = _real(2, 4)
    state1, step_metrics = jax.jit(train.make_train_step(config))(state0, real)
    expected = jax.jit(_algorithm_1_by_hand)(state0, real)
    d_params, g_params, g_stats, loss_i, g_loss_value = expected

    assert int(state1.step) == 1
    chex.assert_trees_all_close(state1.d_params, d_params, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(state1.g_params, g_params, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(state1.g_batch_stats, g_stats, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(step_metrics["d_loss"], loss_i, rtol=1e-4)
    chex.assert_trees_all_close(step_metrics["g_loss"], g_loss_value, rtol=1e-4)


def _algorithm_1_by_hand(state0, real):
    """k = 2 discriminator updates, then one generator update, with the modules called directly
    and SGD with momentum 0.9 from optax."""
    generator, discriminator = models.DCGANGenerator(), models.DCGANDiscriminator()
    tx = optax.sgd(0.05, momentum=0.9)
    g_params, g_stats, d_params = state0.g_params, state0.g_batch_stats, state0.d_params
    g_opt, d_opt = tx.init(g_params), tx.init(d_params)
    keys = jax.random.split(jax.random.fold_in(train.root_keys(3)[1], 0), 3)
    for i in range(2):
        z_key, d_key = jax.random.split(keys[i])
        z = jax.random.normal(z_key, (4, 100))
        fake, updated = generator.apply({"params": g_params, "batch_stats": g_stats}, z,
                                        train=True, mutable=["batch_stats"])
        g_stats = updated["batch_stats"]
        k_real, k_fake, _, _ = jax.random.split(d_key, 4)

        def d_loss(p):
            real_logits = discriminator.apply({"params": p}, real[i], rngs={"dropout": k_real})
            fake_logits = discriminator.apply({"params": p}, fake, rngs={"dropout": k_fake})
            return _bce_d(real_logits, fake_logits)

        loss_i, grads = jax.value_and_grad(d_loss)(d_params)
        updates, d_opt = tx.update(grads, d_opt, d_params)
        d_params = optax.apply_updates(d_params, updates)
    z_key, d_key = jax.random.split(keys[2])
    z = jax.random.normal(z_key, (4, 100))

    def g_loss(p):
        fake, updated = generator.apply({"params": p, "batch_stats": g_stats}, z, train=True,
                                        mutable=["batch_stats"])
        logits = discriminator.apply({"params": d_params}, fake, rngs={"dropout": d_key})
        return -jnp.mean(jnp.log(jax.nn.sigmoid(logits))), updated["batch_stats"]

    (g_loss_value, g_stats), grads = jax.value_and_grad(g_loss, has_aux=True)(g_params)
    updates, g_opt = tx.update(grads, g_opt, g_params)
    g_params = optax.apply_updates(g_params, updates)
    return d_params, g_params, g_stats, loss_i, g_loss_value


def test_simultaneous_step_updates_both_nets_from_one_forward_pass():
    config = train.Config(model="mlp", loss="minimax", schedule="simultaneous",
                          optimizer="sgd_momentum", learning_rate=0.1, momentum=0.5,
                          final_momentum=0.5, batch_size=8, seed=1)
    state0 = train.create_train_state(config, jax.random.PRNGKey(0))
    real = (_real(1, 8) + 1) / 2
    state1, step_metrics = jax.jit(train.make_train_step(config))(state0, real)

    generator, discriminator = models.MLPGenerator(), models.MaxoutDiscriminator()
    z_key, d_key = jax.random.split(jax.random.fold_in(train.root_keys(1)[1], 0))
    z = jax.random.normal(z_key, (8, 100))
    k_real, k_fake, _, _ = jax.random.split(d_key, 4)

    def logits(g_params, d_params):
        fake = generator.apply({"params": g_params}, z)
        return (discriminator.apply({"params": d_params}, real[0], rngs={"dropout": k_real}),
                discriminator.apply({"params": d_params}, fake, rngs={"dropout": k_fake}))

    d_grads, g_grads = jax.jit(lambda g_params, d_params: (
        jax.grad(lambda d: _bce_d(*logits(g_params, d)))(d_params),
        jax.grad(lambda g: jnp.mean(jnp.log(1 - jax.nn.sigmoid(logits(g, d_params)[1]))))(
            g_params)))(state0.g_params, state0.d_params)
    # First SGD-momentum step from zero velocity: p <- p - lr * grad.
    expected_d = jax.tree.map(lambda p, g: p - 0.1 * g, state0.d_params, d_grads)
    expected_g = jax.tree.map(lambda p, g: p - 0.1 * g, state0.g_params, g_grads)
    chex.assert_trees_all_close(state1.d_params, expected_d, atol=1e-6)
    chex.assert_trees_all_close(state1.g_params, expected_g, atol=1e-6)
    chex.assert_trees_all_close(step_metrics["d_grad_norm"], optax.tree.norm(d_grads),
                                rtol=1e-4)


def test_wasserstein_gp_and_hinge_steps_run_and_stay_finite():
    for loss in ("wasserstein_gp", "hinge"):
        config = train.Config(model="mlp", loss=loss, schedule="sequential", d_steps=2,
                              batch_size=4)
        state = train.create_train_state(config, jax.random.PRNGKey(0))
        state, step_metrics = jax.jit(train.make_train_step(config))(state, _real(2, 4))
        assert all(np.isfinite(float(v)) for v in step_metrics.values()), (loss, step_metrics)


class LinearCritic(nn.Module):
    """f(x) = <w, x> + b: its input gradient is w everywhere."""

    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(1)(x.reshape(x.shape[0], -1))[:, 0]


def _linear_critic_losses(loss):
    nets = networks.Networks("mlp", loss, 10.0, "normal", 100)
    nets.discriminator = LinearCritic()
    real, fake = _real(2, 6)
    params = nets.discriminator.init(jax.random.PRNGKey(0), real)["params"]
    params = {"Dense_0": {"kernel": params["Dense_0"]["kernel"] * 3.0, "bias": jnp.array([0.4])}}
    d_loss, _ = nets.discriminator_loss(params, real, fake, jax.random.PRNGKey(1))
    w, b = np.asarray(params["Dense_0"]["kernel"])[:, 0], 0.4
    scores = [np.asarray(x).reshape(6, -1) @ w + b for x in (real, fake)]
    return float(d_loss), scores, w


def test_wasserstein_gp_critic_loss_of_a_linear_critic_is_its_closed_form():
    # mean f(G(z)) - mean f(x) + lambda (||w|| - 1)^2, lambda = 10: every interpolate has
    # gradient w.
    d_loss, (real_scores, fake_scores), w = _linear_critic_losses("wasserstein_gp")
    assert abs(np.linalg.norm(w) - 1.0) > 0.5  # a penalty far from zero
    expected = fake_scores.mean() - real_scores.mean() + 10.0 * (np.linalg.norm(w) - 1.0) ** 2
    np.testing.assert_allclose(d_loss, expected, rtol=1e-5)


def test_hinge_loss_of_a_linear_critic_is_its_closed_form():
    d_loss, (real_scores, fake_scores), _ = _linear_critic_losses("hinge")
    assert (np.abs(real_scores) < 1).any() and (np.abs(real_scores) > 1).any()  # both hinge sides
    expected = np.maximum(0, 1 - real_scores).mean() + np.maximum(0, 1 + fake_scores).mean()
    np.testing.assert_allclose(d_loss, expected, rtol=1e-5)


def _critic_losses_by_hand(loss, critic, d_params, real, fake, keys):
    """The critic's loss written out: WGAN-GP (Gulrajani et al., 2017, Algorithm 1)
    mean f(G(z)) - mean f(x) + 10 mean_i (||grad f(x_hat_i)|| - 1)^2, x_hat_i = e_i x_i +
    (1 - e_i) G(z_i), e_i ~ U[0, 1]; or the hinge mean relu(1 - f(x)) + mean relu(1 + f(G(z)))."""
    k_real, k_fake, k_gp, k_eps = keys
    real_scores, fake_scores = critic(d_params, real, k_real), critic(d_params, fake, k_fake)
    if loss == "hinge":
        return jnp.mean(jax.nn.relu(1 - real_scores)) + jnp.mean(jax.nn.relu(1 + fake_scores))
    e = jax.random.uniform(k_eps, (real.shape[0], 1, 1, 1))
    x_hat = e * real + (1 - e) * fake
    grads = jax.grad(lambda x: jnp.sum(critic(d_params, x, k_gp)))(x_hat)
    norms = jnp.sqrt(jnp.sum(grads ** 2, axis=(1, 2, 3)))
    return (jnp.mean(fake_scores) - jnp.mean(real_scores)
            + 10.0 * jnp.mean((norms - 1.0) ** 2))


@pytest.mark.parametrize("loss", ["wasserstein_gp", "hinge"])
def test_wasserstein_gp_and_hinge_steps_follow_their_formulas(loss):
    """One sequential step (k = 1): the critic descends its loss by hand, then the generator
    descends -mean f(G(z)); first SGD-momentum step from zero velocity: p <- p - lr grad."""
    config = train.Config(model="mlp", loss=loss, schedule="sequential", d_steps=1, batch_size=4,
                          optimizer="sgd_momentum", learning_rate=0.05, momentum=0.9,
                          final_momentum=0.9, seed=2)
    state0 = train.create_train_state(config, jax.random.PRNGKey(5))
    real = (_real(1, 4, seed=3) + 1) / 2
    state1, step_metrics = jax.jit(train.make_train_step(config))(state0, real)

    generator, discriminator = models.MLPGenerator(), models.MaxoutDiscriminator()

    def critic(d_params, x, key):
        return discriminator.apply({"params": d_params}, x, rngs={"dropout": key})

    d_key_step, g_key_step = jax.random.split(jax.random.fold_in(train.root_keys(2)[1], 0), 2)
    z_key, d_key = jax.random.split(d_key_step)
    fake = generator.apply({"params": state0.g_params}, jax.random.normal(z_key, (4, 100)))
    d_loss, d_grads = jax.jit(jax.value_and_grad(
        lambda p: _critic_losses_by_hand(loss, critic, p, real[0], fake,
                                         jax.random.split(d_key, 4))))(state0.d_params)
    d_params = jax.tree.map(lambda p, g: p - 0.05 * g, state0.d_params, d_grads)
    z_key, d_key = jax.random.split(g_key_step)
    z = jax.random.normal(z_key, (4, 100))
    g_loss, g_grads = jax.jit(jax.value_and_grad(lambda g: -jnp.mean(
        critic(d_params, generator.apply({"params": g}, z), d_key))))(state0.g_params)
    g_params = jax.tree.map(lambda p, g: p - 0.05 * g, state0.g_params, g_grads)

    chex.assert_trees_all_close(step_metrics["d_loss"], d_loss, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(step_metrics["g_loss"], g_loss, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state1.d_params, d_params, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(state1.g_params, g_params, atol=1e-6, rtol=1e-5)

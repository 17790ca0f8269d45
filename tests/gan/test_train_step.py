"""The jitted train step against Algorithm 1 and the tutorial's step written out by hand."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gan import models, train


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

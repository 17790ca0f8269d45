"""GAN losses, all from discriminator logits, with numerically stable log-sigmoids.

Notation: D(x) = sigmoid(l(x)) where l is the discriminator's logit, so
    log D(x)       = log_sigmoid(l(x))
    log(1 - D(x))  = log_sigmoid(-l(x)).

The value function of Goodfellow et al. (2014), eq. (1), estimated on a minibatch:
    V(D, G) = mean_i log D(x_i) + mean_j log(1 - D(G(z_j))),
which D ascends and G descends. Every loss here is *descended* by the network it belongs to.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


def value_function(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """V(D, G) = mean log D(x) + mean log(1 - D(G(z)))."""
    return (jnp.mean(jax.nn.log_sigmoid(real_logits))
            + jnp.mean(jax.nn.log_sigmoid(-fake_logits)))


def minimax_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """-(mean log D(x) + mean log(1 - D(G(z)))) = -V(D, G): D ascends V by descending this.

    This is also the binary cross-entropy of the TensorFlow DCGAN tutorial's discriminator
    (labels 1 for real, 0 for fake).
    """
    return -value_function(real_logits, fake_logits)


def minimax_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """mean log(1 - D(G(z))): the saturating generator loss of Algorithm 1, descended by G.

    Its gradient vanishes when D confidently rejects the samples (D(G(z)) -> 0), which is why
    Goodfellow et al. suggest the non-saturating loss in practice.
    """
    return jnp.mean(jax.nn.log_sigmoid(-fake_logits))


def non_saturating_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """-mean log D(G(z)): maximise log D(G(z)) instead of minimising log(1 - D(G(z))).

    Same fixed point as the minimax game, strong gradients early in training.
    """
    return -jnp.mean(jax.nn.log_sigmoid(fake_logits))


def wasserstein_critic_loss(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
    """mean f(G(z)) - mean f(x): the WGAN critic f maximises mean f(x) - mean f(G(z))."""
    return jnp.mean(fake_scores) - jnp.mean(real_scores)


def wasserstein_generator_loss(fake_scores: jax.Array) -> jax.Array:
    """-mean f(G(z))."""
    return -jnp.mean(fake_scores)


def gradient_penalty(critic: Callable[[jax.Array], jax.Array], real: jax.Array, fake: jax.Array,
                     key: jax.Array) -> jax.Array:
    """WGAN-GP (Gulrajani et al., 2017): mean_i (||grad_x f(x_hat_i)||_2 - 1)^2 with
    x_hat_i = e_i x_i + (1 - e_i) G(z_i), e_i ~ U[0, 1] per example. Multiply by lambda (10)."""
    eps = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1), real.dtype)
    interpolates = eps * real + (1.0 - eps) * fake
    grads = jax.grad(lambda x: jnp.sum(critic(x)))(interpolates)
    norms = jnp.sqrt(jnp.sum(grads.reshape(grads.shape[0], -1) ** 2, axis=-1) + 1e-12)
    return jnp.mean((norms - 1.0) ** 2)


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """mean max(0, 1 - l(x)) + mean max(0, 1 + l(G(z))) (Lim & Ye 2017; Miyato et al. 2018)."""
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """-mean l(G(z))."""
    return -jnp.mean(fake_logits)


class LossPair(NamedTuple):
    discriminator: Callable[[jax.Array, jax.Array], jax.Array]
    generator: Callable[[jax.Array], jax.Array]
    gradient_penalty: bool = False


LOSSES = {
    "minimax": LossPair(minimax_discriminator_loss, minimax_generator_loss),
    "non_saturating": LossPair(minimax_discriminator_loss, non_saturating_generator_loss),
    "wasserstein_gp": LossPair(wasserstein_critic_loss, wasserstein_generator_loss, True),
    "hinge": LossPair(hinge_discriminator_loss, hinge_generator_loss),
}


def get_losses(name: str) -> LossPair:
    if name not in LOSSES:
        raise ValueError(f"Unknown GAN loss {name!r}; choose one of {', '.join(LOSSES)}.")
    return LOSSES[name]

"""The generator and discriminator of one GAN as pure functions of their parameters, the noise they
are fed, and the training state holding both: what training (`gan.train`) and evaluation
(`gan.evaluate`) share.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from gan import losses, models


@flax.struct.dataclass
class GANState:
    step: jax.Array
    g_params: Any
    g_batch_stats: Any
    d_params: Any
    g_opt_state: Any
    d_opt_state: Any


class Networks:
    """The two networks of `models.MODELS[model]` (closures over the Flax modules), the loss pair
    `losses.LOSSES[loss]` (with the gradient penalty's weight) and the noise z they are fed
    (`noise` "normal" or "uniform", both of unit variance, `noise_dim` wide)."""

    def __init__(self, model: str, loss: str, gp_weight: float, noise: str, noise_dim: int):
        self.model, self.loss, self.gp_weight = model, loss, gp_weight
        self.noise, self.noise_dim = noise, noise_dim
        self.generator, self.discriminator, self.value_range = models.get_models(model)

    def sample_noise(self, key: jax.Array, batch: int) -> jax.Array:
        """z of shape [batch, noise_dim]."""
        if self.noise == "uniform":  # unit variance, as the paper's code's uniform option
            return jax.random.uniform(key, (batch, self.noise_dim), minval=-jnp.sqrt(3.0),
                                      maxval=jnp.sqrt(3.0))
        return jax.random.normal(key, (batch, self.noise_dim))

    def generate(self, g_params, g_batch_stats, z, train: bool = True):
        """G(z) and the generator's batch statistics after this pass."""
        variables = {"params": g_params}
        if g_batch_stats:
            variables["batch_stats"] = g_batch_stats
        if not train:
            return self.generator.apply(variables, z, train=False), g_batch_stats
        images_, updates = self.generator.apply(variables, z, train=True, mutable=["batch_stats"])
        return images_, updates.get("batch_stats", g_batch_stats)

    def discriminate(self, d_params, x, dropout_key):
        """D's logits on x, in training mode (dropout on)."""
        return self.discriminator.apply({"params": d_params}, x, train=True,
                                        rngs={"dropout": dropout_key})

    def discriminator_loss(self, d_params, real, fake, key):
        """D's loss on one real and one fake minibatch; also returns both logits."""
        loss_pair = losses.get_losses(self.loss)
        k_real, k_fake, k_gp, k_eps = jax.random.split(key, 4)
        real_logits = self.discriminate(d_params, real, k_real)
        fake_logits = self.discriminate(d_params, fake, k_fake)
        loss = loss_pair.discriminator(real_logits, fake_logits)
        if loss_pair.gradient_penalty:
            critic = lambda x: self.discriminate(d_params, x, k_gp)  # noqa: E731
            loss = loss + self.gp_weight * losses.gradient_penalty(critic, real, fake, k_eps)
        return loss, (real_logits, fake_logits)

"""Prototypical Networks (Snell, Swersky and Zemel, 2017) on the episodes MAML uses.

An embedding f_φ maps an image to R^D (`Embedding`, the paper's Omniglot network: four blocks of
[3x3 convolution, 64 filters -> batch norm -> ReLU -> 2x2 max-pool], flattened; 28x28 -> 1x1x64).
For an episode whose support set S holds N classes, the prototype of class k is the mean
embedding of its support examples,

    c_k = (1 / |S_k|) Σ_{(x, y) ∈ S, y = k} f_φ(x),

and a query x is classified by a softmax over negative squared Euclidean distances,

    p_φ(y = k | x) = exp(−d(f_φ(x), c_k)) / Σ_k' exp(−d(f_φ(x), c_k')),    d(a, b) = ||a − b||².

Training minimises the mean query cross-entropy −log p_φ(y | x) over episodes (Adam; the paper
halves the learning rate every 2,000 episodes and trains Omniglot on 60-way episodes). There is no
inner loop: computing the prototypes is the adaptation.

Batch norm is `models.BatchStatNorm` (batch statistics, offset only), with MAML's two choices of
whose statistics normalise the query (`bn_statistics`): "transductive" embeds the support set and
the query set each with its own statistics; "support" embeds both with the support set's.

The state is a `core.MetaState` whose `meta_params` are the embedding's Flax parameters, so
checkpoints, sharding and the fingerprint work as for MAML; `make_adapter` gives the per-episode
metrics `evaluate.episode_metrics` and `evaluate.classification_results` expect.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maml import core, models


class Embedding(nn.Module):
    """f_φ: [B, H, W, C] -> [B, D], D = filters x the spatial size left after `blocks` pools."""
    filters: int = 64
    blocks: int = 4
    conv_impl: str = "xla"  # "xla": lax.conv; "patches": im2col + matmul (models.PatchConv)

    @nn.compact
    def __call__(self, x, stats_rows=None):
        for i in range(self.blocks):
            if self.conv_impl == "patches":
                x = models.PatchConv(self.filters, 3, 1, name=f"conv_{i}")(x)
            else:
                x = nn.Conv(self.filters, (3, 3), padding="SAME", use_bias=False,
                            name=f"conv_{i}")(x)
            x = nn.relu(models.BatchStatNorm(name=f"norm_{i}")(x, stats_rows))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return x.reshape(x.shape[0], -1)


def prototypes(embeddings: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
    """c [ways, D]: c_k = the mean of the rows of `embeddings` [S, D] whose label is k."""
    one_hot = jax.nn.one_hot(labels, ways, dtype=embeddings.dtype)
    return (one_hot.T @ embeddings) / jnp.sum(one_hot, axis=0)[:, None]


def squared_distances(queries: jax.Array, centres: jax.Array) -> jax.Array:
    """d [Q, ways]: d_qk = ||queries_q − centres_k||²."""
    return jnp.sum(jnp.square(queries[:, None, :] - centres[None, :, :]), axis=-1)


def embed_episode(model: nn.Module, params, support_x: jax.Array, query_x: jax.Array,
                  bn_statistics: str) -> tuple[jax.Array, jax.Array]:
    """(f_φ(support), f_φ(query)) with the batch-norm statistics `bn_statistics` names."""
    if bn_statistics == "support":
        n = support_x.shape[0]
        both = model.apply({"params": params}, jnp.concatenate([support_x, query_x]), n)
        return both[:n], both[n:]
    return (model.apply({"params": params}, support_x),
            model.apply({"params": params}, query_x))


def episode_loss(model: nn.Module, params, task: dict, ways: int, bn_statistics: str
                 ) -> tuple[jax.Array, dict]:
    """The mean query cross-entropy of one episode {'support', 'query'} under p_φ(y = k | x) ∝
    exp(−d(f_φ(x), c_k)), and {'loss', 'accuracy'}."""
    support, query = embed_episode(model, params, task["support"]["x"], task["query"]["x"],
                                   bn_statistics)
    logits = -squared_distances(query, prototypes(support, task["support"]["y"], ways))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, task["query"]["y"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == task["query"]["y"])
    return loss, {"loss": loss, "accuracy": accuracy}


def batch_loss(model: nn.Module, params, tasks: dict, ways: int, bn_statistics: str
               ) -> tuple[jax.Array, dict]:
    """The mean of `episode_loss` over the episodes (leading axis) of `tasks`."""
    losses, metrics = jax.vmap(
        lambda task: episode_loss(model, params, task, ways, bn_statistics))(tasks)
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


def make_train_step(model: nn.Module, ways: int, bn_statistics: str,
                    optimizer: optax.GradientTransformation
                    ) -> Callable[[core.MetaState, dict], tuple[core.MetaState, dict]]:
    """`core.make_loss_step` on `batch_loss` over the `ways`-way episodes (not jitted)."""
    return core.make_loss_step(
        lambda params, tasks: batch_loss(model, params, tasks, ways, bn_statistics), optimizer)


def make_adapter(model: nn.Module, ways: int, bn_statistics: str) -> Callable:
    """jitted (params, tasks) -> per-episode metrics [tasks, 1] (one column: no inner steps), the
    form `evaluate.episode_metrics` reads."""
    def one(params, task):
        metrics = episode_loss(model, params, task, ways, bn_statistics)[1]
        return jax.tree.map(lambda v: v[None], metrics)
    return jax.jit(jax.vmap(one, in_axes=(None, 0)))

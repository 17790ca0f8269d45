"""The pretrain-then-fine-tune-the-head baseline of few-shot classification ("Baseline" of Chen,
Liu, Kira, Wang and Huang, 2019) on the episodes MAML uses.

Training is plain supervised learning: a classifier g_W ∘ f_φ over all C meta-training classes
(every character, and with rotations each of its rotations by 90 degrees, is a class of its own)
minimises the mean cross-entropy −log softmax(g_W(f_φ(x)))_c of the images of the training
episodes, support and query alike, each labelled with its global class c (an episode is a
class-balanced minibatch of `train_ways` classes). f_φ is the Prototypical Networks' Conv4
embedding (`protonet.Embedding`) and g_W one dense layer.

At test time f_φ is frozen and only a new head is fitted to the N-way support set S: logits
z ↦ Vz + b with V, b zero-initialised and `head_steps` full-batch Adam steps (learning rate
`head_lr`) on the support cross-entropy; the queries are classified by argmax of Vf_φ(x) + b. Batch
norm takes the statistics `bn_statistics` names, as for Prototypical Networks.

The state is a `core.MetaState` whose `meta_params` are {'embedding', 'head'}, so checkpoints,
sharding and evaluation work as for the other learners.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from maml import core, protonet


class Classifier(nn.Module):
    """g_W ∘ f_φ: [B, H, W, C] -> logits [B, num_classes]."""
    num_classes: int
    filters: int = 64
    conv_impl: str = "xla"

    def setup(self):
        self.embedding = protonet.Embedding(filters=self.filters, conv_impl=self.conv_impl)
        self.head = nn.Dense(self.num_classes)

    def __call__(self, x):
        return self.head(self.embedding(x))


def global_batch(tasks: dict) -> tuple[jax.Array, jax.Array]:
    """(x [B, H, W, C], global class [B]) of every image of the episodes `tasks` (which carry
    'classes' [T, ways]: `tasks.episodes(..., with_classes=True)`)."""
    xs, ys = [], []
    for part in ("support", "query"):
        xs.append(tasks[part]["x"].reshape(-1, *tasks[part]["x"].shape[2:]))
        ys.append(jnp.take_along_axis(tasks["classes"], tasks[part]["y"], axis=1).reshape(-1))
    return jnp.concatenate(xs), jnp.concatenate(ys)


def classification_loss(model: Classifier, params, tasks: dict) -> tuple[jax.Array, dict]:
    """The mean cross-entropy over all images of `tasks` of their global classes, and
    {'loss', 'accuracy'}."""
    x, y = global_batch(tasks)
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def make_train_step(model: Classifier, optimizer: optax.GradientTransformation
                    ) -> Callable[[core.MetaState, dict], tuple[core.MetaState, dict]]:
    """`core.make_loss_step` on `classification_loss` (not jitted)."""
    return core.make_loss_step(lambda params, tasks: classification_loss(model, params, tasks),
                               optimizer)


def fit_head(features: jax.Array, labels: jax.Array, ways: int, steps: int,
             lr: float) -> dict:
    """{'kernel' [D, ways], 'bias' [ways]}: zeros, then `steps` full-batch Adam steps (`lr`) on
    the mean cross-entropy of softmax(features @ kernel + bias) and `labels`."""
    head = {"kernel": jnp.zeros((features.shape[-1], ways), features.dtype),
            "bias": jnp.zeros((ways,), features.dtype)}
    optimizer = optax.adam(lr)

    def loss(head):
        logits = features @ head["kernel"] + head["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(_, carry):
        head, opt_state = carry
        updates, opt_state = optimizer.update(jax.grad(loss)(head), opt_state)
        return optax.apply_updates(head, updates), opt_state

    return jax.lax.fori_loop(0, steps, step, (head, optimizer.init(head)))[0]


def episode_metrics(embedding: nn.Module, params, task: dict, ways: int, bn_statistics: str,
                    head_steps: int, head_lr: float) -> dict:
    """{'loss', 'accuracy'} of the queries of one episode under a head fitted to its support set
    on the frozen embedding."""
    support, query = protonet.embed_episode(embedding, params["embedding"], task["support"]["x"],
                                            task["query"]["x"], bn_statistics)
    support, query = jax.lax.stop_gradient((support, query))
    head = fit_head(support, task["support"]["y"], ways, head_steps, head_lr)
    logits = query @ head["kernel"] + head["bias"]
    labels = task["query"]["y"]
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def make_adapter(model: Classifier, ways: int, bn_statistics: str, head_steps: int,
                 head_lr: float) -> Callable:
    """jitted (params, tasks) -> per-episode metrics [tasks, 1], the form
    `evaluate.episode_metrics` reads."""
    embedding = protonet.Embedding(filters=model.filters, conv_impl=model.conv_impl)

    def one(params, task):
        metrics = episode_metrics(embedding, params, task, ways, bn_statistics, head_steps,
                                  head_lr)
        return jax.tree.map(lambda v: v[None], metrics)
    return jax.jit(jax.vmap(one, in_axes=(None, 0)))

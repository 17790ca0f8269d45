"""The gradient of a mean over a batch of tasks, computed one task at a time.

Both meta-learners average an objective over a meta-batch of tasks, and both compute it in one of
two ways with the same numbers: `jax.vmap` over the tasks (the definition; fast on GPU/TPU) or
"map", the tasks one after the other in a `lax.scan` whose iteration computes one task's objective
and its gradient, the carry summing the gradients (the gradient of the mean is the mean of the
gradients). Map keeps one task's activations in memory at a time, and its smaller programs run
faster on XLA's CPU backend; differentiating a `lax.map` of the objective instead would store every
task's activations in stacked buffers for a second, backward loop.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax


def resolve_task_batching(task_batching: str, platform: str | None = None) -> str:
    """'auto' -> 'map' on CPU, 'vmap' elsewhere; any other choice is returned unchanged."""
    if task_batching != "auto":
        return task_batching
    return "map" if (platform or jax.devices()[0].platform) == "cpu" else "vmap"


def mean_gradient_one_task_at_a_time(objective: Callable, params: Any, tasks: Any
                                     ) -> tuple[Any, jax.Array, Any]:
    """(mean over tasks of ∇_params objective, [objective per task], [aux per task]) for
    `objective(params, task) -> (value, aux)`, the tasks the leading axis of `tasks`."""
    def add_task(total, task):
        (value, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, task)
        return optax.tree.add(total, grads), (value, aux)

    total, (values, aux) = jax.lax.scan(add_task, optax.tree.zeros_like(params), tasks)
    return optax.tree.scale(1 / values.shape[0], total), values, aux

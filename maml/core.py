"""MAML as pure functions: inner-loop adaptation, the meta-objective over a meta-batch of tasks, and
the data-parallel meta-step.

Notation. A model's parameters split into *fast* parameters θ, adapted in the inner loop, and *slow*
parameters φ, only meta-learned (batch-norm offsets: the paper's code does not adapt them). α are
the inner learning rates. For a task with support set S and query set Q, adaptation is

    θ_0 = θ,    θ_{i+1} = θ_i − α_i ⊙ ∇_θ L_S(θ_i, φ),    i = 0 .. num_steps − 1,

and the meta-objective over a meta-batch of T tasks is

    F(θ, φ, α) = (1/T) Σ_t Σ_i w_i L_Q^t(θ_i^t, φ),

with w the one-hot vector of the last step (MAML) or MAML++'s multi-step weights. Second-order MAML
differentiates F through the inner gradients; first-order MAML treats ∇_θ L_S as a constant
(`stop_gradient`), so ∂F/∂θ is the query gradient at the adapted parameters.

Inner learning rates (`MetaConfig.learn_lr`):
* "none" -- MAML: one fixed scalar α for every parameter and step;
* "per_parameter" -- Meta-SGD (Li et al., 2017): α has the shape of θ and is meta-learned;
* "per_layer_per_step" -- MAML++ LSLR (Antoniou et al., 2019): one learned α per tensor and step.

The meta-batch is semantically `jax.vmap` over tasks. How it is computed is `task_batching`:
"vmap" (the definition; fast on GPU/TPU), "unrolled" (a Python loop over tasks inside the jitted
step; XLA's CPU backend runs vmapped per-task convolutions as slow grouped convolutions), "map"
(one task after the other in a `lax.scan` that sums each task's meta-gradient: small programs, one
task's activations in memory at a time), or "auto" (map on CPU, vmap elsewhere). All give the same
meta-gradient (tested). On CPU the convolutions' formulation matters more, chosen by the model
(`models.PatchConv`, `train.resolve_conv_impl`): im2col + matmul, because XLA's CPU backend runs
per-task kernels under vmap as grouped convolutions, and convolution gradients inside a loop (such
as map's) on a slow generic path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from common import config as config_lib
from common import parallel, task_gradients

Params = Any
Batch = Any
LEARN_INNER_LR = ("none", "per_parameter", "per_layer_per_step")
TASK_BATCHING = ("auto", "vmap", "unrolled", "map")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    """The inner loop and the meta-objective (MAML's `Config.inner`: flags `--inner_<field>`).

    Attributes:
        steps: Inner gradient steps per task in meta-training.
        lr: Inner learning rate α (its initial value when it is learned).
        first_order: First-order MAML: the inner gradients are constants of the meta-gradient.
        learn_lr: Which inner learning rates are meta-learned: none (MAML, one fixed α),
            per_parameter (Meta-SGD), per_layer_per_step (MAML++ LSLR).
        multi_step_loss: MAML++ multi-step loss: the query loss after every inner step, with
            annealed weights.
        multi_step_anneal_steps: Meta-iterations over which the multi-step weights reach the last
            step.
        task_batching: How the meta-batch's tasks are computed (same numbers): auto (map on CPU,
            vmap elsewhere), vmap, unrolled (a Python loop over tasks), map (a lax.scan over tasks
            summing their meta-gradients).
    """
    steps: int = 1
    lr: float = 0.01
    first_order: bool = False
    learn_lr: str = config_lib.choice("none", LEARN_INNER_LR)
    multi_step_loss: bool = False
    multi_step_anneal_steps: int = 10_000
    task_batching: str = config_lib.choice("auto", TASK_BATCHING)

    def validate(self) -> None:
        config_lib.check_choices(self)
        if self.steps < 1:
            raise ValueError(f"inner steps must be >= 1, got {self.steps}.")


class Learner(NamedTuple):
    """The two losses that define a family of tasks, as pure functions.

    support_loss(fast, slow, support) -> scalar: the inner-loop loss.
    query_loss(fast, slow, support, query) -> (scalar, metrics dict): the outer loss; it receives
    the support set too so a model may take normalisation statistics from it.
    """
    support_loss: Callable[[Params, Params, Batch], jax.Array]
    query_loss: Callable[[Params, Params, Batch, Batch], tuple[jax.Array, dict]]


@flax.struct.dataclass
class MetaState:
    step: jax.Array
    meta_params: Any  # {'fast': θ, 'slow': φ, 'inner_lr': α}
    opt_state: Any


def model_state(model, key: jax.Array, example_input: jax.Array,
                optimizer: optax.GradientTransformation) -> MetaState:
    """The state of a learner without an inner loop: `meta_params` are `model`'s Flax
    parameters."""
    params = model.init(key, example_input)["params"]
    return MetaState(step=jnp.zeros((), jnp.int32), meta_params=params,
                     opt_state=optimizer.init(params))


def make_loss_step(loss: Callable[[Any, dict], tuple[jax.Array, dict]],
                   optimizer: optax.GradientTransformation
                   ) -> Callable[[MetaState, dict], tuple[MetaState, dict]]:
    """`train_step(state, tasks) -> (state, metrics)` of a learner without an inner loop: one
    `optimizer` update on the gradient of `loss(params, tasks) -> (value, metrics)` (not jitted;
    `train.jit_train_step` jits it with the tasks sharded over the devices, whose gradients XLA
    then averages)."""
    def train_step(state: MetaState, tasks: dict):
        (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.meta_params, tasks)
        return apply_meta_gradient(state, grads, optimizer, value, metrics)

    return train_step


def apply_meta_gradient(state: MetaState, grads: Any, optimizer: optax.GradientTransformation,
                        meta_loss: jax.Array, metrics: dict) -> tuple[MetaState, dict]:
    """One `optimizer` update of the meta-parameters with `grads`; the step's metrics row."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
    state = MetaState(step=state.step + 1,
                      meta_params=optax.apply_updates(state.meta_params, updates),
                      opt_state=opt_state)
    return state, {"meta_loss": meta_loss, **metrics, "grad_norm": optax.tree.norm(grads)}


# ------------------------------------------------------------------------------------------------
# Adaptation


def adapt_path(params: Params, support: Batch, loss_fn: Callable[[Params, Batch], jax.Array],
               inner_lr, num_steps: int, first_order: bool = False) -> list[Params]:
    """[θ_0, θ_1, ..., θ_num_steps]: plain gradient descent on `loss_fn(θ, support)`.

    `inner_lr` is a float, a pytree broadcasting against `params` (Meta-SGD), or a function of
    the step index returning either (per-step rates). Written as a Python loop: the steps are few
    and each is then its own differentiable block.
    """
    lr_at = inner_lr if callable(inner_lr) else (lambda i: inner_lr)
    path = [params]
    for i in range(num_steps):
        grads = jax.grad(loss_fn)(path[-1], support)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        lr = lr_at(i)
        if jax.tree.structure(lr) == jax.tree.structure(grads):
            path.append(jax.tree.map(lambda p, g, a: p - a * g, path[-1], grads, lr))
        else:
            path.append(jax.tree.map(lambda p, g: p - lr * g, path[-1], grads))
    return path


def adapt(params: Params, support: Batch, loss_fn: Callable[[Params, Batch], jax.Array],
          inner_lr, num_steps: int, first_order: bool = False) -> Params:
    """θ_num_steps of `adapt_path`: the parameters after `num_steps` inner SGD steps."""
    return adapt_path(params, support, loss_fn, inner_lr, num_steps, first_order)[-1]


# ------------------------------------------------------------------------------------------------
# Meta-parameters and the meta-objective


def init_inner_lr(config: MetaConfig, fast: Params):
    """α as stored in the meta-parameters for `config.learn_lr`."""
    if config.learn_lr == "per_parameter":
        return jax.tree.map(lambda p: jnp.full_like(p, config.lr), fast)
    if config.learn_lr == "per_layer_per_step":
        return jax.tree.map(lambda p: jnp.full((config.steps,), config.lr, p.dtype),
                            fast)
    return jnp.asarray(config.lr, jax.tree.leaves(fast)[0].dtype)


def inner_lr_schedule(config: MetaConfig, inner_lr) -> Callable[[int], Any]:
    """Step index -> α_i, from the stored α. A fixed α gets no gradient."""
    if config.learn_lr == "per_layer_per_step":
        return lambda i: jax.tree.map(lambda a: a[i], inner_lr)
    if config.learn_lr == "none":
        fixed = jax.lax.stop_gradient(inner_lr)
        return lambda i: fixed
    return lambda i: inner_lr


def init_meta_params(config: MetaConfig, fast: Params, slow: Params) -> dict:
    return {"fast": fast, "slow": slow, "inner_lr": init_inner_lr(config, fast)}


def step_weights(config: MetaConfig, meta_step) -> jax.Array:
    """w_i, i = 1..num_steps: MAML's one-hot last step, or MAML++'s annealed multi-step weights.

    MAML++: uniform 1/S at meta-step 0; the non-final weights decay linearly to a floor of 0.03/S at
    `multi_step_anneal_steps`, the final weight taking the rest (they always sum to 1).
    """
    steps = config.steps
    if not config.multi_step_loss or steps == 1:
        return jax.nn.one_hot(steps - 1, steps)
    progress = jnp.clip(jnp.asarray(meta_step, jnp.float32) / config.multi_step_anneal_steps, 0, 1)
    early = jnp.maximum((1.0 - progress) / steps, 0.03 / steps)
    return jnp.concatenate([jnp.full((steps - 1,), early), 1.0 - (steps - 1) * early[None]])


def task_objective(meta_params: dict, task: dict, weights: jax.Array, learner: Learner,
                   config: MetaConfig) -> tuple[jax.Array, dict]:
    """Σ_i w_i L_Q(θ_i, φ) for one task {'support', 'query'}, and the metrics after adaptation."""
    slow = meta_params["slow"]
    support, query = task["support"], task["query"]
    path = adapt_path(meta_params["fast"], support,
                      lambda fast, batch: learner.support_loss(fast, slow, batch),
                      inner_lr_schedule(config, meta_params["inner_lr"]),
                      config.steps, config.first_order)
    evaluated = path[1:] if config.multi_step_loss else path[-1:]
    losses = [learner.query_loss(fast, slow, support, query) for fast in evaluated]
    w = weights if config.multi_step_loss else jnp.ones((1,))
    loss = sum(w[i] * value for i, (value, _) in enumerate(losses))
    return loss, losses[-1][1]


def batch_objective(meta_params: dict, tasks: dict, weights: jax.Array, learner: Learner,
                    config: MetaConfig) -> tuple[jax.Array, dict]:
    """The mean over the meta-batch (leading axis of `tasks`) of `task_objective`.

    Semantically `jax.vmap(task_objective, in_axes=(None, 0, None))`; computed per
    `config.task_batching`.
    """
    per_task = functools.partial(task_objective, weights=weights, learner=learner, config=config)
    strategy = task_gradients.resolve_task_batching(config.task_batching)
    if strategy == "vmap":
        losses, metrics = jax.vmap(per_task, in_axes=(None, 0))(meta_params, tasks)
    elif strategy == "map":
        losses, metrics = jax.lax.map(lambda task: per_task(meta_params, task), tasks)
    else:
        num_tasks = jax.tree.leaves(tasks)[0].shape[0]
        outs = [per_task(meta_params, jax.tree.map(lambda x, t=t: x[t], tasks))
                for t in range(num_tasks)]
        losses, metrics = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


def meta_gradient(meta_params: dict, tasks: dict, weights: jax.Array, learner: Learner,
                  config: MetaConfig) -> tuple[dict, jax.Array, dict]:
    """(∇F, F, metrics) over the meta-batch `tasks`.

    "map" sums the tasks' gradients (∇ of the mean is the mean of the ∇): `summed_task_gradients`.
    The other strategies differentiate `batch_objective`.
    """
    if task_gradients.resolve_task_batching(config.task_batching) == "map":
        return summed_task_gradients(meta_params, tasks, weights, learner, config)
    (loss, metrics), grads = jax.value_and_grad(batch_objective, has_aux=True)(
        meta_params, tasks, weights, learner, config)
    return grads, loss, metrics


def summed_task_gradients(meta_params: dict, tasks: dict, weights: jax.Array, learner: Learner,
                          config: MetaConfig) -> tuple[dict, jax.Array, dict]:
    """(∇F, F, metrics) with the tasks one after the other: each iteration of a `lax.scan`
    computes one task's objective and its gradient (`common.task_gradients`)."""
    per_task = functools.partial(task_objective, weights=weights, learner=learner, config=config)
    grads, losses, metrics = task_gradients.mean_gradient_one_task_at_a_time(
        per_task, meta_params, tasks)
    return grads, jnp.mean(losses), jax.tree.map(jnp.mean, metrics)


# ------------------------------------------------------------------------------------------------
# The meta-step


def make_optimizer(meta_lr: float) -> optax.GradientTransformation:
    """Adam, as the paper's outer optimizer."""
    return optax.adam(meta_lr)


def create_meta_state(config: MetaConfig, fast: Params, slow: Params,
                      optimizer: optax.GradientTransformation) -> MetaState:
    meta_params = init_meta_params(config, fast, slow)
    return MetaState(step=jnp.zeros((), jnp.int32), meta_params=meta_params,
                     opt_state=optimizer.init(meta_params))


def make_meta_step(learner: Learner, config: MetaConfig, optimizer: optax.GradientTransformation,
                   mesh) -> Callable[[MetaState, dict], tuple[MetaState, dict]]:
    """`meta_step(state, tasks) -> (state, metrics)`, data-parallel over `mesh` (not jitted: the
    caller jits it with the shardings, `train.jit_train_step`).

    Tasks (leading axis) are sharded over the mesh axis `data`; each device computes the meta-
    gradient of its tasks with `config.task_batching`, the gradients are averaged across devices
    (`pmean`), and the replicated Adam update follows. Equals the single-device step (tested).
    """
    config.validate()
    local_config = dataclasses.replace(
        config, task_batching=task_gradients.resolve_task_batching(config.task_batching))

    def local(meta_params, tasks, weights):
        return meta_gradient(meta_params, tasks, weights, learner, local_config), ()

    sharded_gradient = parallel.data_parallel_gradient(local, mesh, batch_inputs=(True, False))

    def meta_step(state: MetaState, tasks: dict):
        weights = step_weights(config, state.step)
        (grads, loss, metrics), _ = sharded_gradient(state.meta_params, tasks, weights)
        return apply_meta_gradient(state, grads, optimizer, loss, metrics)

    return meta_step


def test_time_lr(config: MetaConfig, inner_lr) -> Callable[[int], Any]:
    """α_i at test time, where more steps than trained may run: steps beyond `steps` reuse
    the last learned per-step rate (MAML++)."""
    schedule = inner_lr_schedule(config, inner_lr)
    return lambda i: schedule(min(i, config.steps - 1))


def adapt_and_evaluate(meta_params: dict, task: dict, learner: Learner, config: MetaConfig,
                       num_steps: int) -> list[dict]:
    """Query metrics of one task after 0, 1, ..., num_steps inner steps (no meta-gradient)."""
    slow = meta_params["slow"]
    lr_at = test_time_lr(config, meta_params["inner_lr"])
    path = adapt_path(meta_params["fast"], task["support"],
                      lambda fast, batch: learner.support_loss(fast, slow, batch), lr_at,
                      num_steps, first_order=True)
    return [learner.query_loss(fast, slow, task["support"], task["query"])[1] for fast in path]

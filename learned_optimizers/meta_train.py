"""Meta-training the LSTM optimizer by truncated backpropagation through time (Andrychowicz et al.).

The meta-loss of optimizer parameters φ on a task f is the sum of the losses along the trajectory
it produces over a horizon of T steps,

    L(φ) = E_f [ Σ_{t=1..T} f(θ_t) ],    θ_{t+1} = θ_t + u_t(φ),

estimated on a meta-batch of tasks (vmapped, and sharded over the mesh's `data` axis). The horizon
is cut into unrolls of K steps: each meta-step runs K optimizer steps of every task in the
meta-batch inside `lax.scan`, takes the gradient of the mean loss of those K steps with respect to
φ (the state at the unroll's start a constant: truncated BPTT), and updates φ with Adam after
clipping the meta-gradient's global norm. After T / K unrolls the meta-batch is replaced by fresh
tasks. By default ∇f(θ_t) enters the optimizer as a constant (no second derivatives of f, the
paper's choice); `second_order=True` keeps them.

`estimator="pes"` replaces truncated backpropagation by Persistent Evolution Strategies (Vicol,
Metz, Sohl-Dickstein, 2021), which is unbiased under truncation: the meta-batch is P = B/2
antithetic pairs of particles, each pair on one task. Every unroll k draws ε_i ~ N(0, σ² I) per
pair, runs particle i⁺ with φ + ε_i and i⁻ with φ − ε_i (forward only, no backpropagation), adds ε_i
to the pair's accumulated perturbation ξ_i = Σ_{unrolls j ≤ k of this task} ε_i^(j), and estimates

    ĝ = 1 / (2 P σ²) Σ_i ξ_i (L_k(i⁺) − L_k(i⁻)),

L_k the mean loss of the unroll's K steps. Because ξ carries the perturbations of the earlier
unrolls of the same trajectory, E[ĝ] is the gradient of the Gaussian-smoothed L_k with respect to
φ through the whole trajectory so far -- the dependence truncated BPTT drops (tested).

Model selection: every `validate_every` steps the current φ is scored by the mean loss at step T
on fixed validation tasks (never the evaluation tasks), and the best φ is kept. At the end the best
φ is written to `meta_params.npz` and evaluated against tuned baselines (`evaluate.py`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import checkpoints, metrics, parallel
from common.config import check_positive
from learned_optimizers import lstm, tasks

ESTIMATORS = ("tbptt", "pes")
META_LR_SCHEDULES = ("constant", "cosine")
META_PARAMS_FILE = "meta_params.npz"


@dataclasses.dataclass(frozen=True)
class Config:
    task: str = "quadratic"  # a family of tasks.FAMILIES
    dataset: str = "digits"  # MLP tasks only
    data_dir: str | None = None
    data_split: str = "train_test"  # or "test_halves" (tasks.load_split)
    batch_size: int = 128  # MLP minibatch
    pool: int = 1  # MLP input: pool x pool average pooling of the images
    preprocessing: str = "identity"  # lstm.PREPROCESSING
    output_scale: float = 1.0
    hidden_size: int = 20
    num_layers: int = 2
    horizon: int = 100  # T
    unroll_length: int = 20  # K
    meta_batch_size: int = 32
    meta_learning_rate: float = 1e-3
    meta_lr_schedule: str = "constant"  # or "cosine": decayed to 0 over num_steps
    meta_clip_norm: float = 1.0
    second_order: bool = False
    estimator: str = "tbptt"  # or "pes"
    pes_sigma: float = 0.01  # PES: standard deviation of the perturbations of φ
    num_steps: int = 1000  # meta-steps, one unroll each
    seed: int = 0
    eval_seed: int = 0  # validation and evaluation tasks; fixed across meta-training seeds
    log_every: int = 50
    checkpoint_every: int = 250
    validate_every: int = 100
    num_validation_tasks: int = 32
    num_test_tasks: int = 100
    eval_horizons: Sequence[int] = (100, 200)
    transfer_tasks: Sequence[str] = ()  # other families to evaluate the optimizer on
    evaluate: bool = True

    def validate(self) -> None:
        choices = {"task": tasks.FAMILIES, "preprocessing": lstm.PREPROCESSING,
                   "estimator": ESTIMATORS, "data_split": tasks.DATA_SPLITS,
                   "meta_lr_schedule": META_LR_SCHEDULES}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; "
                                 f"choose one of {', '.join(allowed)}.")
        for name in self.transfer_tasks:
            if name not in tasks.FAMILIES:
                raise ValueError(f"Unknown transfer task {name!r}; choose from {tasks.FAMILIES}.")
        if self.horizon % self.unroll_length:
            raise ValueError(f"horizon {self.horizon} is not a multiple of unroll_length "
                             f"{self.unroll_length}.")
        if self.estimator == "pes" and self.meta_batch_size % 2:
            raise ValueError(f"PES needs an even meta_batch_size (antithetic pairs), got "
                             f"{self.meta_batch_size}.")
        if not self.pes_sigma > 0:
            raise ValueError(f"pes_sigma must be > 0, got {self.pes_sigma}.")
        check_positive(self, ("horizon", "unroll_length", "meta_batch_size", "num_steps",
                              "log_every", "checkpoint_every", "validate_every",
                              "num_validation_tasks", "num_test_tasks", "hidden_size", "num_layers",
                              "batch_size", "pool"))


# Keys a rerun may change without starting a different run.
RESUMABLE_KEYS = ("num_steps", "log_every", "checkpoint_every", "data_dir", "evaluate",
                  "num_test_tasks", "eval_horizons", "transfer_tasks")


@flax.struct.dataclass
class MetaState:
    step: jax.Array
    meta_params: Any
    meta_opt_state: Any
    trajectories: tasks.Trajectory  # the meta-batch, leading axis = tasks
    best_meta_params: Any
    best_validation_loss: jax.Array
    perturbation_sums: Any = None  # PES: ξ per antithetic pair (leading axis = pairs)


def make_family(config: Config, split: str, name: str | None = None) -> tasks.TaskFamily:
    """The config's task family (or family `name`) on dataset split `split`."""
    return tasks.make_family(name or config.task, config.dataset, split, config.data_dir,
                             config.batch_size, config.data_split, config.pool)


def root_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init, train) keys; the meta-batch of horizon n is drawn with fold_in(train, n)."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, train_key


def eval_keys(eval_seed: int, num_validation: int, num_test: int) -> tuple[jax.Array, jax.Array]:
    """Keys of the validation tasks (model and learning-rate selection) and of the test tasks."""
    validation_key, test_key = jax.random.split(jax.random.PRNGKey(10_000 + eval_seed))
    return (jax.random.split(validation_key, num_validation),
            jax.random.split(test_key, num_test))


def make_optimizer(config: Config, meta_params) -> optax.GradientTransformation:
    return lstm.lstm_optimizer(meta_params, config.output_scale, config.preprocessing)


def meta_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam after clipping the meta-gradient's global norm; the learning rate constant or
    decayed along a cosine to 0 at `num_steps`."""
    rate = config.meta_learning_rate
    if config.meta_lr_schedule == "cosine":
        rate = optax.cosine_decay_schedule(rate, config.num_steps)
    return optax.chain(optax.clip_by_global_norm(config.meta_clip_norm), optax.adam(rate))


def fresh_trajectories(config: Config, family: tasks.TaskFamily, key: jax.Array) -> tasks.Trajectory:
    """A meta-batch of new tasks at θ₀ with zero LSTM states (leading axis = tasks). PES: the
    first and second halves are the same tasks (particle i and i + B/2 are an antithetic pair)."""
    meta_params = jax.eval_shape(lambda: lstm.init_meta_params(
        jax.random.PRNGKey(0), config.preprocessing, config.hidden_size, config.num_layers))
    tx = make_optimizer(config, meta_params)  # init() reads only shapes
    pes = config.estimator == "pes"
    keys = jax.random.split(key, config.meta_batch_size // 2 if pes else config.meta_batch_size)
    trajectories = jax.vmap(lambda k: tasks.start(tx, family, k))(keys)
    return jax.tree.map(lambda x: jnp.concatenate([x, x]), trajectories) if pes else trajectories


def create_meta_state(config: Config, family: tasks.TaskFamily, key: jax.Array) -> MetaState:
    meta_params = lstm.init_meta_params(key, config.preprocessing, config.hidden_size,
                                        config.num_layers)
    trajectories = fresh_trajectories(config, family, root_keys(config.seed)[1])
    sums = None
    if config.estimator == "pes":
        sums = jax.tree.map(lambda p: jnp.zeros((config.meta_batch_size // 2,) + p.shape, p.dtype),
                            meta_params)
    return MetaState(step=jnp.zeros((), jnp.int32), meta_params=meta_params,
                     meta_opt_state=meta_optimizer(config).init(meta_params),
                     trajectories=trajectories, best_meta_params=meta_params,
                     best_validation_loss=jnp.array(jnp.inf, jnp.float32),
                     perturbation_sums=sums)


def truncated_meta_loss(config: Config, family: tasks.TaskFamily, meta_params,
                        trajectories: tasks.Trajectory, first_step, data):
    """Mean over the meta-batch of the mean loss of K steps from `trajectories` under φ."""
    tx = make_optimizer(config, meta_params)

    def one(traj):
        traj, losses = tasks.unroll(tx, family, traj, config.unroll_length, first_step, data,
                                    config.second_order)
        return jnp.mean(losses), traj

    losses, trajectories = jax.vmap(one)(trajectories)
    return jnp.mean(losses), trajectories


def pes_gradient(config: Config, family: tasks.TaskFamily, meta_params, trajectories,
                 perturbation_sums, first_step, data, key: jax.Array):
    """One PES unroll (module docstring): (ĝ, mean loss, trajectories, ξ).

    `trajectories` hold the P⁺ particles then the P⁻ particles; `perturbation_sums` is ξ before
    this unroll (zeros for fresh tasks)."""
    pairs = config.meta_batch_size // 2
    leaves, treedef = jax.tree.flatten(meta_params)
    keys = jax.random.split(key, len(leaves))
    eps = treedef.unflatten([config.pes_sigma * jax.random.normal(k, (pairs,) + x.shape, x.dtype)
                             for k, x in zip(keys, leaves)])
    sums = jax.tree.map(jnp.add, perturbation_sums, eps)
    particles = jax.tree.map(lambda p, e: jnp.concatenate([p + e, p - e]), meta_params, eps)

    def one(phi, traj):
        traj, losses = tasks.unroll(make_optimizer(config, phi), family, traj,
                                    config.unroll_length, first_step, data)
        return jnp.mean(losses), traj

    losses, trajectories = jax.vmap(one)(particles, trajectories)
    difference = losses[:pairs] - losses[pairs:]
    grads = jax.tree.map(
        lambda xi: jnp.tensordot(difference, xi, 1) / (2 * pairs * config.pes_sigma ** 2), sums)
    return grads, jnp.mean(losses), trajectories, sums


def make_meta_step(config: Config, family: tasks.TaskFamily) -> Callable:
    """Returns `meta_step(state, data) -> (state, metrics)`: one unroll and φ update, the
    meta-gradient by truncated BPTT or by PES (`config.estimator`)."""
    num_unrolls = config.horizon // config.unroll_length
    init_key, train_key = root_keys(config.seed)
    perturbation_key = jax.random.fold_in(init_key, 1)  # PES: ε of meta-step s from fold_in(., s)
    meta_tx = meta_optimizer(config)

    def meta_step(state: MetaState, data):
        position = state.step % num_unrolls
        fresh = fresh_trajectories(config, family,
                                   jax.random.fold_in(train_key, state.step // num_unrolls))
        trajectories = jax.tree.map(lambda new, old: jnp.where(position == 0, new, old),
                                    fresh, state.trajectories)
        first_step = position * config.unroll_length
        sums = state.perturbation_sums
        if config.estimator == "pes":
            sums = jax.tree.map(lambda s: jnp.where(position == 0, 0.0, s), sums)
            grads, loss, trajectories, sums = pes_gradient(
                config, family, state.meta_params, trajectories, sums, first_step, data,
                jax.random.fold_in(perturbation_key, state.step))
        else:
            loss_fn = lambda phi: truncated_meta_loss(  # noqa: E731
                config, family, phi, trajectories, first_step, data)
            (loss, trajectories), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.meta_params)
        updates, meta_opt_state = meta_tx.update(grads, state.meta_opt_state, state.meta_params)
        state = state.replace(step=state.step + 1,
                              meta_params=optax.apply_updates(state.meta_params, updates),
                              meta_opt_state=meta_opt_state,
                              trajectories=jax.lax.stop_gradient(trajectories),
                              perturbation_sums=sums)
        return state, {"meta_loss": loss, "meta_grad_norm": optax.tree.norm(grads)}

    return meta_step


def state_shardings(mesh, state: MetaState) -> MetaState:
    """Everything replicated except the meta-batch of trajectories, split over `data`."""
    replicated, batch = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    return jax.tree.map(lambda _: replicated, state).replace(
        trajectories=jax.tree.map(lambda _: batch, state.trajectories))


def place(state, shardings):
    """Puts a pytree, identical on every process, on the mesh with the given shardings."""
    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(put, state, shardings)


def jit_meta_step(config: Config, family: tasks.TaskFamily, mesh, state: MetaState) -> Callable:
    shardings = state_shardings(mesh, state)
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(make_meta_step(config, family), in_shardings=(shardings, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_validation_loss(config: Config, family: tasks.TaskFamily, keys: jax.Array) -> Callable:
    """φ -> mean over validation tasks of f(θ_T), T the horizon (non-finite counts as +inf)."""
    def validation_loss(meta_params, data):
        tx = make_optimizer(config, meta_params)
        final = jax.vmap(lambda k: tasks.learning_curve(tx, family, k, config.horizon, data)[-1])(keys)
        return jnp.where(jnp.all(jnp.isfinite(final)), jnp.mean(final), jnp.inf)
    return jax.jit(validation_loss)


def select_best(state: MetaState, validation_loss: jax.Array) -> MetaState:
    better = validation_loss < state.best_validation_loss
    return state.replace(
        best_meta_params=jax.tree.map(lambda new, old: jnp.where(better, new, old),
                                      state.meta_params, state.best_meta_params),
        best_validation_loss=jnp.minimum(validation_loss, state.best_validation_loss))


def config_dict(config: Config) -> dict[str, Any]:
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in values.items()}


def meta_train(config: Config, workdir: str, overwrite: bool = False) -> MetaState:
    """Meta-trains (or resumes) in `workdir` up to `num_steps` meta-steps; returns the state."""
    config.validate()
    mesh = parallel.make_mesh()
    per_device = parallel.check_global_batch(config.meta_batch_size, mesh, "meta_batch_size")
    family = make_family(config, "train")
    checkpoints.claim_workdir(workdir, config_dict(config), overwrite, RESUMABLE_KEYS)
    logging.info("Meta-training the LSTM optimizer on %s: meta-batch %d = %d devices x %d tasks, "
                 "%d processes; horizon %d in unrolls of %d, %d meta-steps.", family.name,
                 config.meta_batch_size, mesh.devices.size, per_device, jax.process_count(),
                 config.horizon, config.unroll_length, config.num_steps)

    ckpts = checkpoints.Checkpoints(workdir, config.checkpoint_every)
    state = jax.jit(lambda key: create_meta_state(config, family, key))(root_keys(config.seed)[0])
    state = place(state, state_shardings(mesh, state))
    state, start_step = ckpts.restore_latest(state)
    if start_step:
        logging.info("Resumed from the checkpoint of meta-step %d.", start_step)
    writer = metrics.MetricWriter(workdir, resume_step=start_step)
    progress = metrics.Progress(config.num_steps, start_step,
                                config.meta_batch_size * config.unroll_length, "task_steps")
    data = parallel.replicate(mesh, family.data)
    meta_step = jit_meta_step(config, family, mesh, state)
    validation_keys, _ = eval_keys(config.eval_seed, config.num_validation_tasks, 1)
    validation_loss = make_validation_loss(config, family, validation_keys)

    try:
        pending = metrics.PendingMetrics(last_checkpoint=start_step or None)
        for step in range(start_step, config.num_steps):
            state, step_metrics = meta_step(state, data)
            pending.add(step_metrics)
            done = step + 1
            is_log = metrics.due(done, config.log_every, config.num_steps)
            is_validation = metrics.due(done, config.validate_every, config.num_steps)
            is_checkpoint = metrics.due(done, config.checkpoint_every, config.num_steps)
            if is_log or is_validation or is_checkpoint:
                row = dict(pending.fetch(done)[-1])
                if is_validation:
                    loss = validation_loss(state.meta_params, data)
                    state = select_best(state, loss)
                    row.update(validation_loss=loss, best_validation_loss=state.best_validation_loss)
                if is_log or is_validation:
                    rates = progress.log(done, row)
                    writer.write(done, {**row, **rates})
            if is_checkpoint:
                ckpts.save(done, state, force=True)
                pending.checkpointed(done)
    finally:
        ckpts.close()
        writer.close()
    parallel.log_fingerprint(config.num_steps, (state.meta_params, state.best_meta_params))
    if jax.process_index() == 0:
        lstm.save(os.path.join(workdir, META_PARAMS_FILE), parallel.to_host(state.best_meta_params),
                  config.output_scale, config.preprocessing)
    return state


def train_and_evaluate(config: Config, workdir: str, overwrite: bool = False) -> dict[str, Any]:
    """Meta-trains in `workdir`, then evaluates the best φ against tuned baselines (`eval.json`)."""
    from learned_optimizers import evaluate

    state = meta_train(config, workdir, overwrite)
    if not config.evaluate:
        return {}
    return evaluate.evaluate_run(config, parallel.to_host(state.best_meta_params), workdir)

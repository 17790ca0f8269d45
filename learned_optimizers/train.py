"""Meta-training the LSTM optimizer by truncated backpropagation through time (Andrychowicz et al.).

The meta-loss of optimizer parameters φ on a task f is the sum of the losses along the trajectory
it produces over a horizon of T steps,

    L(φ) = E_f [ Σ_{t=1..T} f(θ_t) ],    θ_{t+1} = θ_t + u_t(φ),

θ_t the parameters after t updates (f(θ_0) does not depend on φ and is left out), estimated on a
meta-batch of tasks (split over the mesh's `data` axis; each device computes its tasks' gradient,
vmapped or one task at a time, `task_batching`). The horizon is cut into
unrolls of K steps: each meta-step (`make_train_step`) runs K optimizer steps of every task in the
meta-batch inside `lax.scan`, from step s to s + K, and takes the gradient with respect to φ of

    L_s(φ) = 1/K Σ_{t=s+1..s+K} f(θ_t)

(`tasks.scored_unroll`: every update of the unroll is credited, and the last unroll of a horizon
ends with f(θ_T); `meta_objective="log_loss"` averages log f(θ_t) instead, Wichrowska et al.
2017), the state at the unroll's start a constant (truncated BPTT); then it updates φ
with Adam after clipping the meta-gradient's global norm. After T / K unrolls the meta-batch is
replaced by fresh tasks; a curriculum (`horizon_curriculum`, Chen et al. 2020) meta-trains on
shorter horizons first (`meta_batch_schedule`). By default ∇f(θ_t) enters the optimizer as a
constant (no second derivatives of f, the paper's choice); `second_order=True` keeps them.

`estimator="pes"` replaces truncated backpropagation by Persistent Evolution Strategies (Vicol,
Metz, Sohl-Dickstein, 2021), which is unbiased under truncation: the meta-batch is P = B/2
antithetic pairs of particles, each pair on one task. Every unroll k draws ε_i ~ N(0, σ² I) per
pair, runs particle i⁺ with φ + ε_i and i⁻ with φ − ε_i (forward only, no backpropagation), adds ε_i
to the pair's accumulated perturbation ξ_i = Σ_{unrolls j ≤ k of this task} ε_i^(j), and estimates

    ĝ = 1 / (2 P σ²) Σ_i ξ_i (L_k(i⁺) − L_k(i⁻)),

L_k the unroll's objective L_s above for the particle. Because ξ carries the perturbations of the
earlier unrolls of the same trajectory, E[ĝ] is the gradient of the Gaussian-smoothed L_k with
respect to φ through the whole trajectory so far -- the dependence truncated BPTT drops (tested).

Model selection: every `validate_every` steps the current φ is scored by the mean loss at step T
on fixed validation tasks (never the evaluation tasks), and the best φ is kept. At the end the best
φ is written to `meta_params.npz` and evaluated against tuned baselines (`evaluate.py`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging

from common import checkpoints, metrics, parallel, task_gradients, workdirs
from common import config as config_lib
from common import data as common_data
from common.config import choice
from learned_optimizers import evaluate, lstm, tasks

ESTIMATORS = ("tbptt", "pes")
META_OBJECTIVES = ("loss", "log_loss")
META_LR_SCHEDULES = ("constant", "cosine")
TASK_BATCHING = ("auto", "vmap", "map")
# Below this many parameters per task "auto" keeps vmap on CPU too: the crossover measured in
# benchmarks/README.md lies between the digits MLP (1,210) and the 14x14 MNIST MLP (4,150).
MAP_MIN_COORDINATES = 2048
META_PARAMS_FILE = "meta_params.npz"


@dataclasses.dataclass(frozen=True)
class Config:
    """Meta-training and evaluation of the LSTM optimizer.

    Attributes:
        task: Task family to meta-train on.
        dataset: MLP tasks: the dataset of the images (a `common.data` name).
        data_dir: Directory holding the dataset's raw files.
        data_split: train_test: meta-train on the train split, evaluate on test; test_halves: two
            fixed halves of the test split (MNIST with only its test files at hand).
        batch_size: MLP tasks: examples per minibatch of a task.
        pool: MLP tasks: average-pool the images pool x pool first.
        preprocessing: Gradient preprocessing: log_sign (the paper's appendix) or identity.
        output_scale: Update = output_scale * LSTM output.
        hidden_size: LSTM hidden units per layer.
        num_layers: LSTM layers.
        horizon: Optimizer steps per task during meta-training (T), unless horizon_curriculum
            is given; always the horizon of validation and of the baselines' tuning.
        unroll_length: Steps per truncated unroll (K); T % K == 0.
        horizon_curriculum: Meta-training horizons of successive stages, short to long (Chen et
            al., 2020: a curriculum over the number of unrolls), each a multiple of K; stage i
            lasts curriculum_stage_steps meta-steps, the last stage runs to num_steps. Empty: T
            throughout.
        curriculum_stage_steps: Meta-steps per curriculum stage but the last; a multiple of every
            stage's number of unrolls (its horizon / K).
        meta_batch_size: Tasks per meta-step (over all devices).
        meta_lr: Adam learning rate of the meta-optimizer.
        meta_lr_schedule: Meta learning rate: constant, or cosine decay to 0 over num_steps.
        meta_clip_norm: Global-norm clip of the meta-gradient.
        second_order: Keep second derivatives of f in the meta-gradient.
        meta_objective: What an unroll's meta-loss averages over its steps: loss, f(θ_t) (the
            paper), or log_loss, log f(θ_t) (Wichrowska et al., 2017), which weighs a relative
            improvement the same early in a horizon and late, where f is many times smaller.
        random_scaling: Meta-train on tasks whose parameters are rescaled per coordinate by
            exp(U(-r, r)), r this value (Lv et al., 2017: `tasks.randomly_scaled`); 0 = off.
            Validation and test tasks are never rescaled.
        mixture_datasets: Meta-train on a mixture of datasets: each task draws its dataset
            uniformly from `dataset` and these (`tasks.mixture`), given as name or name:data_dir,
            split like `dataset` (data_split); the images must have `dataset`'s size. Validation
            and test tasks stay on `dataset`.
        task_batching: How truncated BPTT computes the meta-batch's gradient (same numbers): vmap
            over the tasks, map (one task after the other, `common.task_gradients`), or auto (map
            on CPU for tasks of at least MAP_MIN_COORDINATES parameters, vmap otherwise).
        estimator: Meta-gradient estimator: tbptt (truncated backpropagation, the paper) or pes
            (Persistent Evolution Strategies, unbiased under truncation).
        pes_sigma: PES: standard deviation of the perturbations of the meta-parameters.
        num_steps: Meta-steps, one unroll each; a rerun with a larger value continues.
        max_minutes: Stop at the first checkpoint after this many minutes (0: no limit), without
            the final evaluation; the same command continues the run.
        seed: Seed of the meta-parameters' initialisation and of the meta-training tasks.
        eval_seed: Seed of the validation and test tasks (fixed across meta-training seeds).
        log_every: Log metrics every this many meta-steps.
        checkpoint_every: Save a checkpoint every this many meta-steps.
        validate_every: Score the optimizer on validation tasks every this many meta-steps.
        num_validation_tasks: Validation tasks (model and baseline learning-rate selection).
        num_test_tasks: Held-out test tasks of the final evaluation.
        eval_horizons: Steps at which final losses are reported.
        transfer_tasks: Other task families to evaluate the optimizer on.
        evaluate: Evaluate against tuned baselines after meta-training.
    """

    task: str = choice("quadratic", tasks.FAMILIES)
    dataset: str = choice("digits", common_data.DATASETS)
    data_dir: str | None = None
    data_split: str = choice("train_test", tasks.DATA_SPLITS)
    batch_size: int = 128
    pool: int = 1
    preprocessing: str = choice("identity", lstm.PREPROCESSING)
    output_scale: float = 1.0
    hidden_size: int = 20
    num_layers: int = 2
    horizon: int = 100
    unroll_length: int = 20
    horizon_curriculum: tuple[int, ...] = ()
    curriculum_stage_steps: int = 0
    meta_batch_size: int = 32
    meta_lr: float = 1e-3
    meta_lr_schedule: str = choice("constant", META_LR_SCHEDULES)
    meta_clip_norm: float = 1.0
    second_order: bool = False
    meta_objective: str = choice("loss", META_OBJECTIVES)
    random_scaling: float = 0.0
    mixture_datasets: tuple[str, ...] = ()
    task_batching: str = choice("auto", TASK_BATCHING)
    estimator: str = choice("tbptt", ESTIMATORS)
    pes_sigma: float = 0.01
    num_steps: int = 1000
    max_minutes: float = 0.0
    seed: int = 0
    eval_seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    validate_every: int = 100
    num_validation_tasks: int = 32
    num_test_tasks: int = 100
    eval_horizons: tuple[int, ...] = (100, 200)
    transfer_tasks: tuple[str, ...] = choice((), tasks.FAMILIES)
    evaluate: bool = True

    def validate(self) -> None:
        config_lib.check_choices(self)
        if self.horizon % self.unroll_length:
            raise ValueError(f"horizon {self.horizon} is not a multiple of unroll_length "
                             f"{self.unroll_length}.")
        for horizon in self.horizon_curriculum:
            if horizon <= 0 or horizon % self.unroll_length:
                raise ValueError(f"horizon_curriculum holds {horizon}: every stage's horizon must "
                                 f"be a positive multiple of unroll_length {self.unroll_length}.")
            if self.curriculum_stage_steps <= 0 or self.curriculum_stage_steps % (
                    horizon // self.unroll_length):
                raise ValueError(
                    f"curriculum_stage_steps must be a positive multiple of every stage's number "
                    f"of unrolls (horizon / unroll_length), got {self.curriculum_stage_steps} for "
                    f"horizons {self.horizon_curriculum} in unrolls of {self.unroll_length}.")
        if self.estimator == "pes" and self.meta_batch_size % 2:
            raise ValueError(f"PES needs an even meta_batch_size (antithetic pairs), got "
                             f"{self.meta_batch_size}.")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0 (0: no limit), got {self.max_minutes}.")
        for spec in self.mixture_datasets:
            if spec.partition(":")[0] not in common_data.DATASETS:
                raise ValueError(f"mixture_datasets holds {spec!r}: the dataset must be one of "
                                 f"{', '.join(common_data.DATASETS)} (name or name:data_dir).")
        if self.random_scaling < 0:
            raise ValueError(f"random_scaling must be >= 0 (0: off), got {self.random_scaling}.")
        if not self.pes_sigma > 0:
            raise ValueError(f"pes_sigma must be > 0, got {self.pes_sigma}.")
        config_lib.check_positive(self, (
            "horizon", "unroll_length", "meta_batch_size", "num_steps", "log_every",
            "checkpoint_every", "validate_every", "num_validation_tasks", "num_test_tasks",
            "hidden_size", "num_layers", "batch_size", "pool"))


# Keys a rerun may change without starting a different run.
RESUMABLE_KEYS = ("num_steps", "max_minutes", "log_every", "checkpoint_every", "data_dir", "evaluate",
                  "num_test_tasks", "eval_horizons", "transfer_tasks", "task_batching")
# Removed flags whose every value computed the same function, as older runs' config.json files
# hold them: ignored on resume and when a run's config is read back.
RETIRED_KEYS = ("block_size",)


@flax.struct.dataclass
class MetaTrainState:
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


def meta_training_family(config: Config, family: tasks.TaskFamily) -> tasks.TaskFamily:
    """The family the meta-batches are drawn from: `family` (the config's, on the train split),
    mixed with the same family on `mixture_datasets` and randomly scaled, as configured."""
    if config.mixture_datasets:
        others = []
        for spec in config.mixture_datasets:
            dataset, _, data_dir = spec.partition(":")
            others.append(tasks.make_family(config.task, dataset, "train", data_dir or None,
                                            config.batch_size, config.data_split, config.pool))
        family = tasks.mixture([family, *others])
    if config.random_scaling > 0:
        return tasks.randomly_scaled(family, config.random_scaling)
    return family


def root_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init, train) keys; the meta-batch of horizon n is drawn with fold_in(train, n)."""
    init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, train_key


def training_horizons(config: Config) -> tuple[int, ...]:
    """The meta-training horizon of each curriculum stage (one stage, T, without a curriculum)."""
    return config.horizon_curriculum or (config.horizon,)


def meta_batch_schedule(config: Config, step):
    """(index of the meta-batch of tasks that meta-step `step` trains, the unroll's position in
    that meta-batch's horizon, the horizon).

    Without a curriculum the meta-batch is replaced every T / K meta-steps. With one, stage i
    (`horizon_curriculum[i]`, n_i = T_i / K unrolls) starts at meta-step i · S, S =
    `curriculum_stage_steps` (the last stage runs on), and numbers its meta-batches on from the
    S / n_j of every earlier stage j."""
    horizons = jnp.asarray(training_horizons(config))
    unrolls = horizons // config.unroll_length
    stage_steps = max(config.curriculum_stage_steps, 1)
    stage = jnp.minimum(step // stage_steps, len(horizons) - 1)
    batches_per_stage = stage_steps // unrolls
    first_batch = jnp.cumsum(batches_per_stage) - batches_per_stage
    local = step - stage * stage_steps
    return first_batch[stage] + local // unrolls[stage], local % unrolls[stage], horizons[stage]


def make_optimizer(config: Config, meta_params) -> optax.GradientTransformation:
    """The learned optimizer with meta-parameters φ = `meta_params`."""
    return lstm.lstm_optimizer(meta_params, config.output_scale, config.preprocessing)


def meta_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam after clipping the meta-gradient's global norm; the learning rate constant or
    decayed along a cosine to 0 at `num_steps`."""
    rate = config.meta_lr
    if config.meta_lr_schedule == "cosine":
        rate = optax.cosine_decay_schedule(rate, config.num_steps)
    return optax.chain(optax.clip_by_global_norm(config.meta_clip_norm), optax.adam(rate))


def fresh_trajectories(config: Config, family: tasks.TaskFamily,
                       key: jax.Array) -> tasks.Trajectory:
    """A meta-batch of new tasks at θ₀ with zero LSTM states (leading axis = tasks). PES: the
    first and second halves are the same tasks (particle i and i + B/2 are an antithetic pair)."""
    meta_params = jax.eval_shape(lambda: lstm.init_meta_params(
        jax.random.PRNGKey(0), config.preprocessing, config.hidden_size, config.num_layers))
    tx = make_optimizer(config, meta_params)  # init() reads only shapes
    pes = config.estimator == "pes"
    keys = jax.random.split(key, config.meta_batch_size // 2 if pes else config.meta_batch_size)
    trajectories = jax.vmap(lambda k: tasks.start(tx, family, k))(keys)
    return jax.tree.map(lambda x: jnp.concatenate([x, x]), trajectories) if pes else trajectories


def create_train_state(config: Config, family: tasks.TaskFamily, key: jax.Array) -> MetaTrainState:
    """φ drawn with `key`, the meta-optimizer's state, and the first meta-batch of tasks of
    `family`, the meta-training family (`meta_training_family`)."""
    meta_params = lstm.init_meta_params(key, config.preprocessing, config.hidden_size,
                                        config.num_layers)
    trajectories = fresh_trajectories(config, family, root_keys(config.seed)[1])
    sums = None
    if config.estimator == "pes":
        sums = jax.tree.map(lambda p: jnp.zeros((config.meta_batch_size // 2,) + p.shape, p.dtype),
                            meta_params)
    return MetaTrainState(step=jnp.zeros((), jnp.int32), meta_params=meta_params,
                          meta_opt_state=meta_optimizer(config).init(meta_params),
                          trajectories=trajectories, best_meta_params=meta_params,
                          best_validation_loss=jnp.array(jnp.inf, jnp.float32),
                          perturbation_sums=sums)


def task_meta_loss(config: Config, family: tasks.TaskFamily, meta_params,
                   trajectory: tasks.Trajectory, first_step, data):
    """(L_s(φ) = 1/K Σ_{t=s+1..s+K} f(θ_t) of one task, its trajectory after the unroll),
    s = `first_step`, K the unroll length, θ_s the `trajectory`'s parameters; log f(θ_t) in place
    of f(θ_t) with meta_objective="log_loss"."""
    trajectory, losses = tasks.scored_unroll(make_optimizer(config, meta_params), family,
                                             trajectory, config.unroll_length, first_step, data,
                                             config.second_order)
    if config.meta_objective == "log_loss":
        losses = jnp.log(losses)
    return jnp.mean(losses), trajectory


def truncated_meta_loss(config: Config, family: tasks.TaskFamily, meta_params,
                        trajectories: tasks.Trajectory, first_step, data):
    """(Mean over the meta-batch of `task_meta_loss`, the trajectories after the unroll): the
    objective whose gradient truncated BPTT follows."""
    losses, trajectories = jax.vmap(
        lambda traj: task_meta_loss(config, family, meta_params, traj, first_step, data)
    )(trajectories)
    return jnp.mean(losses), trajectories


def resolve_task_batching(config: Config, trajectories: tasks.Trajectory) -> str:
    """`config.task_batching`, with 'auto' -> 'map' on CPU for tasks of at least
    `MAP_MIN_COORDINATES` parameters (one task's unroll then keeps the cores busy on its own), else
    'vmap'."""
    if config.task_batching != "auto":
        return config.task_batching
    coordinates = sum(x[0].size for x in jax.tree.leaves(trajectories.params))
    if coordinates < MAP_MIN_COORDINATES:
        return "vmap"
    return task_gradients.resolve_task_batching("auto")


def truncated_meta_gradient(config: Config, family: tasks.TaskFamily, meta_params,
                            trajectories: tasks.Trajectory, first_step, data):
    """(∇_φ truncated_meta_loss, its value, the trajectories after the unroll), computed per
    `config.task_batching`: "vmap" differentiates `truncated_meta_loss`, "map" sums the tasks'
    gradients one task at a time (`common.task_gradients`)."""
    if resolve_task_batching(config, trajectories) == "map":
        grads, losses, trajectories = task_gradients.mean_gradient_one_task_at_a_time(
            lambda phi, traj: task_meta_loss(config, family, phi, traj, first_step, data),
            meta_params, trajectories)
        return grads, jnp.mean(losses), trajectories
    (loss, trajectories), grads = jax.value_and_grad(truncated_meta_loss, argnums=2, has_aux=True)(
        config, family, meta_params, trajectories, first_step, data)
    return grads, loss, trajectories


def sharded_meta_gradient(config: Config, family: tasks.TaskFamily, mesh) -> Callable:
    """`truncated_meta_gradient` with the meta-batch split over the mesh axis `data`: each device
    computes the gradient of its tasks, and the gradients and losses are averaged across devices
    (equal to the single-device gradient, tested)."""
    def local(meta_params, trajectories, first_step, data):
        grads, loss, trajectories = truncated_meta_gradient(config, family, meta_params,
                                                            trajectories, first_step, data)
        return (grads, loss), trajectories

    return parallel.data_parallel_gradient(local, mesh, batch_inputs=(True, False, False))


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

    losses, trajectories = jax.vmap(
        lambda phi, traj: task_meta_loss(config, family, phi, traj, first_step, data)
    )(particles, trajectories)
    difference = losses[:pairs] - losses[pairs:]
    grads = jax.tree.map(
        lambda xi: jnp.tensordot(difference, xi, 1) / (2 * pairs * config.pes_sigma ** 2), sums)
    return grads, jnp.mean(losses), trajectories, sums


def make_train_step(config: Config, family: tasks.TaskFamily, mesh=None) -> Callable:
    """Returns the unjitted meta-step `train_step(state, data) -> (state, metrics)`: one unroll
    and φ update, the meta-gradient by truncated BPTT (`sharded_meta_gradient` over `mesh`, by
    default all devices) or by PES (`config.estimator`), on tasks of `family`, the meta-training
    family (`meta_training_family`); `data` is its shared arrays (`family.data`)."""
    init_key, train_key = root_keys(config.seed)
    perturbation_key = jax.random.fold_in(init_key, 1)  # PES: ε of meta-step s from fold_in(., s)
    meta_tx = meta_optimizer(config)
    meta_gradient = sharded_meta_gradient(config, family, mesh or parallel.make_mesh())

    def train_step(state: MetaTrainState, data):
        batch, position, horizon = meta_batch_schedule(config, state.step)
        fresh = fresh_trajectories(config, family, jax.random.fold_in(train_key, batch))
        trajectories = optax.tree.where(position == 0, fresh, state.trajectories)
        first_step = position * config.unroll_length
        sums = state.perturbation_sums
        if config.estimator == "pes":
            sums = jax.tree.map(lambda s: jnp.where(position == 0, 0.0, s), sums)
            grads, loss, trajectories, sums = pes_gradient(
                config, family, state.meta_params, trajectories, sums, first_step, data,
                jax.random.fold_in(perturbation_key, state.step))
        else:
            (grads, loss), trajectories = meta_gradient(state.meta_params, trajectories,
                                                        first_step, data)
        updates, meta_opt_state = meta_tx.update(grads, state.meta_opt_state, state.meta_params)
        state = state.replace(step=state.step + 1,
                              meta_params=optax.apply_updates(state.meta_params, updates),
                              meta_opt_state=meta_opt_state,
                              trajectories=jax.lax.stop_gradient(trajectories),
                              perturbation_sums=sums)
        step_metrics = {"meta_loss": loss, "meta_grad_norm": optax.tree.norm(grads)}
        if config.horizon_curriculum:
            step_metrics["horizon"] = horizon
        return state, step_metrics

    return train_step


def state_shardings(mesh, state: MetaTrainState) -> MetaTrainState:
    """Everything replicated except the meta-batch of trajectories, split over `data`."""
    replicated, batch = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    return jax.tree.map(lambda _: replicated, state).replace(
        trajectories=jax.tree.map(lambda _: batch, state.trajectories))


def jit_train_step(config: Config, mesh, family: tasks.TaskFamily,
                   state: MetaTrainState) -> Callable:
    """`make_train_step` jitted with the shardings of `state_shardings` (the state donated)."""
    shardings = state_shardings(mesh, state)
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(make_train_step(config, family, mesh), in_shardings=(shardings, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_validation_loss(config: Config, family: tasks.TaskFamily, keys: jax.Array) -> Callable:
    """φ -> mean over validation tasks of f(θ_T), T the horizon (non-finite counts as +inf)."""
    def validation_loss(meta_params, data):
        tx = make_optimizer(config, meta_params)
        final = jax.vmap(
            lambda k: tasks.learning_curve(tx, family, k, config.horizon, data)[-1])(keys)
        return jnp.where(jnp.all(jnp.isfinite(final)), jnp.mean(final), jnp.inf)
    return jax.jit(validation_loss)


def select_best(state: MetaTrainState, validation_loss: jax.Array) -> MetaTrainState:
    """Keeps φ as the best meta-parameters if `validation_loss` is the lowest so far."""
    better = validation_loss < state.best_validation_loss
    return state.replace(
        best_meta_params=optax.tree.where(better, state.meta_params, state.best_meta_params),
        best_validation_loss=jnp.minimum(validation_loss, state.best_validation_loss))


def train_and_evaluate(config: Config, workdir: str, overwrite: bool = False) -> MetaTrainState:
    """Meta-trains (or resumes) in `workdir` up to `num_steps` meta-steps, writes the best φ to
    `meta_params.npz`, then (if `config.evaluate`) evaluates it against tuned baselines
    (`eval.json`). A run stopped by `max_minutes` skips the evaluation. Returns the final
    state."""
    config.validate()
    mesh = parallel.make_mesh()
    per_device = parallel.check_global_batch(config.meta_batch_size, mesh, "meta_batch_size")
    family = make_family(config, "train")
    training_family = meta_training_family(config, family)
    config_dict = config_lib.to_dict(config)
    with workdirs.claim(workdir, config_dict, overwrite, RESUMABLE_KEYS + RETIRED_KEYS,
                        defaults=config_lib.to_dict(Config()), num_steps=config.num_steps):
        logging.info("Meta-training the LSTM optimizer on %s: meta-batch %d = %d devices x %d "
                     "tasks, %d processes; horizon %s in unrolls of %d, %d meta-steps.",
                     training_family.name, config.meta_batch_size, mesh.devices.size, per_device,
                     jax.process_count(), " -> ".join(map(str, training_horizons(config))),
                     config.unroll_length, config.num_steps)
        state = jax.jit(lambda key: create_train_state(config, training_family, key))(
            root_keys(config.seed)[0])
        state = parallel.place(state, state_shardings(mesh, state))
        with checkpoints.resume(workdir, config.checkpoint_every, config_dict, state,
                                config.log_every) as (ckpts, state, start_step, writer):
            if start_step < config.num_steps:
                keep_earlier_evaluation(workdir, start_step)
            state, done = _train_loop(config, mesh, family, training_family, state, start_step,
                                      ckpts, writer)
        parallel.log_fingerprint(done, (state.meta_params, state.best_meta_params))
        best = parallel.to_host(state.best_meta_params)
        if jax.process_index() == 0:
            lstm.save(os.path.join(workdir, META_PARAMS_FILE), best, config.output_scale,
                      config.preprocessing)
        if config.evaluate and done == config.num_steps:
            evaluate_run(config, best, workdir, done)
    return state


def keep_earlier_evaluation(workdir: str, start_step: int) -> None:
    """A finished run continued to more meta-steps: its evaluation and best φ move aside to
    `eval_<steps>.json` and `meta_params_<steps>.npz`, steps the meta-steps they were made at
    (`start_step` for an eval.json that does not record them), so that the shorter run's result
    stays beside the longer one's and `eval.json` never describes another φ than the saved one."""
    path = os.path.join(workdir, evaluate.EVAL_FILE)
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    steps = workdirs.read_json(path).get("meta_steps", start_step)
    for name in (evaluate.EVAL_FILE, META_PARAMS_FILE):
        stem, extension = os.path.splitext(name)
        if os.path.exists(os.path.join(workdir, name)):
            os.replace(os.path.join(workdir, name),
                       os.path.join(workdir, f"{stem}_{steps}{extension}"))
    logging.info("Continuing past the evaluation at meta-step %d: it is kept as eval_%d.json and "
                 "meta_params_%d.npz.", steps, steps, steps)


def _train_loop(config: Config, mesh, family: tasks.TaskFamily, training_family: tasks.TaskFamily,
                state: MetaTrainState, start_step: int, ckpts: checkpoints.Checkpoints,
                writer: metrics.MetricWriter) -> tuple[MetaTrainState, int]:
    """Meta-steps `start_step` to `num_steps` (or to the first checkpoint after `max_minutes`) on
    `training_family`: log, validate on `family` and keep the best φ, checkpoint. Returns the
    state and its step."""
    progress = metrics.Progress(config.num_steps, start_step,
                                config.meta_batch_size * config.unroll_length, "task_steps")
    data = parallel.replicate(mesh, family.data)
    training_data = (data if training_family.data is family.data  # no mixture: the same arrays
                     else parallel.replicate(mesh, training_family.data))
    train_step = jit_train_step(config, mesh, training_family, state)
    validation_keys, _ = evaluate.eval_keys(config.eval_seed, config.num_validation_tasks, 1)
    validation_loss = make_validation_loss(config, family, validation_keys)
    pending = metrics.PendingMetrics(last_checkpoint=start_step or None)
    start_time = time.monotonic()
    done = start_step
    for step in range(start_step, config.num_steps):
        state, step_metrics = train_step(state, training_data)
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
                row.update(metrics.nulls_for_non_finite(  # inf: diverged, a result, not a failure
                    {"validation_loss": loss, "best_validation_loss": state.best_validation_loss}))
            if is_log or is_validation:
                writer.write(done, {**row, **progress.log(done, row)})
        if is_checkpoint:
            ckpts.save(done, state, force=True)
            pending.checkpointed(done)
            if checkpoints.out_of_time(start_time, config.max_minutes, done, config.num_steps,
                                       "meta-step"):
                break
        ckpts.stop_if_preempted(done, state)
    return state, done


def read_config(workdir: str) -> Config:
    """The config of the run in `workdir`, from its config.json."""
    return config_lib.from_dict(Config, workdirs.read_json(
        os.path.join(workdir, workdirs.CONFIG_FILE)), retired=RETIRED_KEYS)


def evaluate_run(config: Config, meta_params, workdir: str,
                 meta_steps: int | None = None) -> dict[str, Any]:
    """Evaluates φ (meta-trained for `meta_steps`, recorded when given) against tuned baselines
    on the config's family and its transfer targets; writes `eval.json` and a
    `learning_curves[_<family>].png` per family."""
    validation_keys, test_keys = evaluate.eval_keys(config.eval_seed, config.num_validation_tasks,
                                                    config.num_test_tasks)
    learned = make_optimizer(config, meta_params)
    families = {}
    for name in (config.task, *config.transfer_tasks):
        curves, families[name] = evaluate.compare_with_baselines(
            learned, make_family(config, "train", name), make_family(config, "test", name),
            validation_keys, test_keys, config.horizon, config.eval_horizons)
        suffix = "" if name == config.task else f"_{name}"
        evaluate.plot(os.path.join(workdir, f"learning_curves{suffix}.png"), curves,
                      f"{name}: {len(test_keys)} test tasks (LSTM meta-trained on {config.task})")
    results = {"task": config.task, "families": families}
    if meta_steps is not None:
        results["meta_steps"] = meta_steps
    evaluate.write_results(workdir, results)
    return results

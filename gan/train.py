"""Training a GAN: `Config`, `create_train_state`, Algorithm 1 of Goodfellow et al. (2014) as one
step (`make_train_step`, jitted with shardings by `jit_train_step`), and `train_and_evaluate`, the
loop that runs it with checkpoints, metrics, sample grids and `gan.evaluate`'s metrics every
`eval.every` steps. `evaluate_workdir` evaluates the latest checkpoint of a run.

Two schedules, chosen by `Config.schedule`:

* "sequential" -- Algorithm 1: for k steps, sample a real minibatch and a noise minibatch and
  update D by descending its loss; then sample noise and update G once. Each D step sees a fresh
  real minibatch and fresh noise.
* "simultaneous" -- the TensorFlow DCGAN tutorial's `train_step`: one forward pass of G(z), D(x)
  and D(G(z)), and both networks updated from it (k = 1).

Batch-norm statistics: the generator always runs in training mode inside a step (normalising by
the batch) and its running averages are updated on every generator forward pass, as in Keras.
Sample grids use the running averages (Keras' `training=False`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import checkpoints, data, images, metrics, parallel, workdirs
from common import config as config_lib
from gan import evaluate, losses, models, networks
from gan.networks import GANState

SCHEDULES = ("sequential", "simultaneous")
OPTIMIZERS = ("adam", "sgd_momentum")
NOISE = ("normal", "uniform")


@dataclasses.dataclass(frozen=True)
class Config:
    """A GAN training run, and the evaluation it runs.

    Attributes:
        model: Generator/discriminator pair: the tutorial's DCGAN, or Goodfellow et al.'s
            MLP/maxout pair.
        loss: GAN loss pair.
        schedule: sequential: Algorithm 1 (k D steps, then one G step); simultaneous: the
            tutorial's one-forward-pass update of both (k = 1).
        d_steps: k: discriminator steps per generator step (sequential schedule only).
        optimizer: Optimizer of both networks.
        learning_rate: Learning rate of both networks.
        adam_b1: Adam beta1.
        adam_b2: Adam beta2.
        adam_eps: Adam epsilon (the default is Keras').
        momentum: SGD momentum at the start.
        final_momentum: SGD momentum reached linearly after the ramp (momentum_saturate_epochs
            or momentum_saturate_steps).
        momentum_saturate_epochs: Epochs over which the SGD momentum rises linearly to
            final_momentum (steps derived from the training split's size; 0: use
            momentum_saturate_steps). The paper's code: 249 (pylearn2's MomentumAdjustor, start 1,
            saturate 250).
        momentum_saturate_steps: Steps over which the SGD momentum rises to final_momentum (when
            momentum_saturate_epochs is 0).
        lr_decay: SGD: the learning rate is divided by this after every update (the paper:
            1.000004).
        min_learning_rate: SGD: floor of the decayed learning rate (0: none).
        gp_weight: Gradient-penalty weight (wasserstein_gp only).
        noise: Distribution of z (both of unit variance).
        noise_dim: Dimension of z.
        dataset: Dataset of the real images.
        data_dir: Directory of the dataset's files (default: the places the dataset is looked
            for without it).
        train_split: Split to train on: 'train', or a slice such as 'test[:8000]' (MNIST
            offline).
        eval_split: Real images of FID and the Parzen test set: 'test', or e.g. 'test[8000:]'.
        batch_size: Global batch size: real images per minibatch, over all devices and
            processes.
        num_epochs: Epochs of the run (ignored when num_steps is given).
        num_steps: Training steps of the run (overrides num_epochs); a rerun with a larger value
            continues.
        max_minutes: Stop at the first checkpoint after this many minutes (0: no limit); the
            same command continues the run.
        seed: Seed of the initialisation, the data order, the noise and the evaluation's samples.
        log_every: Write metrics every this many steps.
        checkpoint_every: Save a checkpoint every this many steps.
        sample_every: Write a sample grid every this many steps.
        num_samples: Images in the sample grid.
        eval: The evaluation (FID, IS, Parzen; gan.evaluate), during training and by
            `launch.gan --evaluate_only`.
    """

    model: str = config_lib.choice("dcgan", models.MODELS)
    loss: str = config_lib.choice("non_saturating", losses.LOSSES)
    schedule: str = config_lib.choice("simultaneous", SCHEDULES)
    d_steps: int = 1
    optimizer: str = config_lib.choice("adam", OPTIMIZERS)
    learning_rate: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-7
    momentum: float = 0.5
    final_momentum: float = 0.5
    momentum_saturate_epochs: float = 0.0
    momentum_saturate_steps: int = 0
    lr_decay: float = 1.0
    min_learning_rate: float = 0.0
    gp_weight: float = 10.0
    noise: str = config_lib.choice("normal", NOISE)
    noise_dim: int = models.NOISE_DIM
    dataset: str = config_lib.choice("digits", data.DATASETS)
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    batch_size: int = 256
    num_epochs: int = 50
    num_steps: int | None = None
    max_minutes: float = 0.0
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    sample_every: int = 500
    num_samples: int = 64
    eval: evaluate.EvalConfig = config_lib.nested(evaluate.EvalConfig)

    def validate(self) -> None:
        config_lib.check_choices(self)
        if self.d_steps < 1:
            raise ValueError(f"d_steps must be >= 1, got {self.d_steps}.")
        if self.schedule == "simultaneous" and self.d_steps != 1:
            raise ValueError("The simultaneous schedule updates D and G from one forward pass "
                             "(k = 1); use --schedule=sequential for d_steps > 1.")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be positive, got {self.num_steps}.")
        if self.momentum_saturate_epochs < 0 or self.momentum_saturate_steps < 0:
            raise ValueError("momentum_saturate_epochs and momentum_saturate_steps must be >= 0.")
        if self.momentum_saturate_epochs and self.momentum_saturate_steps:
            raise ValueError("Give the momentum ramp in epochs or in steps, not both "
                             "(momentum_saturate_epochs, momentum_saturate_steps).")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0 (0: no limit), got {self.max_minutes}.")
        config_lib.check_positive(self, ("batch_size", "num_epochs", "log_every",
                                         "checkpoint_every", "sample_every"))
        for split in (self.train_split, self.eval_split):
            data.parse_split(split)
        if self.eval.every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: no evaluation), got {self.eval.every}.")


# Keys a rerun may change without starting a different run (flag-style names).
RESUMABLE_KEYS = ("num_steps", "num_epochs", "max_minutes", "log_every", "checkpoint_every",
                  "sample_every", "data_dir", "num_samples", "eval_every", "eval_num_samples",
                  "eval_num_real", "eval_num_validation", "eval_is_splits", "eval_parzen",
                  "eval_classifier_dir", "eval_classifier_epochs", "eval_classifier_min_steps")


def from_dict(values: dict[str, Any]) -> Config:
    """The config stored as `common.config.to_dict(config)` (a run's config.json)."""
    return Config(**{**values, "eval": evaluate.EvalConfig(**values.get("eval", {}))})


def steps_per_epoch(config: Config, num_examples: int) -> int:
    """Training steps per pass over `num_examples` images: floor(N / (B k)), at least 1."""
    return max(num_examples // (config.batch_size * config.d_steps), 1)


def momentum_ramp_steps(config: Config, epoch_steps: int | None) -> int:
    """Steps T of the momentum ramp: round(momentum_saturate_epochs * epoch_steps) when the ramp is
    given in epochs, else momentum_saturate_steps; at least 1."""
    if not config.momentum_saturate_epochs:
        return max(config.momentum_saturate_steps, 1)
    if epoch_steps is None:
        raise ValueError("momentum_saturate_epochs needs the steps per epoch (the training "
                         "split's size); pass steps_per_epoch.")
    return max(round(config.momentum_saturate_epochs * epoch_steps), 1)


def make_optimizer(config: Config, epoch_steps: int | None = None
                   ) -> optax.GradientTransformation:
    """Adam (the tutorial: 1e-4, Keras epsilon) or SGD with momentum (the paper's code: lr 0.1,
    momentum 0.5 rising linearly to 0.7, lr divided by 1.000004 after each update).

    SGD at update t (0-based): learning rate max(lr / lr_decay^t, min_learning_rate) and momentum
    mu_0 + (mu_1 - mu_0) min(t / T, 1), T = `momentum_ramp_steps(config, epoch_steps)`;
    `epoch_steps` (steps per epoch) is needed only for a ramp given in epochs.
    """
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                          eps=config.adam_eps)
    learning_rate = optax.exponential_decay(
        config.learning_rate, transition_steps=1, decay_rate=1.0 / config.lr_decay,
        end_value=config.min_learning_rate or None)
    momentum = optax.linear_schedule(config.momentum, config.final_momentum,
                                     momentum_ramp_steps(config, epoch_steps))
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)


def make_networks(config: Config) -> networks.Networks:
    """The run's networks, loss pair and noise."""
    return networks.Networks(config.model, config.loss, config.gp_weight, config.noise,
                             config.noise_dim)


def root_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init, train, samples) keys of a run; the train key of step s is fold_in(train, s)."""
    init_key, train_key, sample_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    return init_key, train_key, sample_key


@functools.partial(jax.jit, static_argnums=0)  # one compilation, not one per init op
def create_train_state(config: Config, key: jax.Array) -> GANState:
    generator, discriminator, _ = models.get_models(config.model)
    g_key, d_key = jax.random.split(key)
    g_vars = generator.init(g_key, jnp.zeros((1, config.noise_dim)), train=False)
    d_vars = discriminator.init(d_key, jnp.zeros((1, *models.IMAGE_SHAPE)), train=False)
    tx = make_optimizer(config, epoch_steps=1)  # the state does not depend on the ramp's length
    return GANState(step=jnp.zeros((), jnp.int32), g_params=g_vars["params"],
                    g_batch_stats=g_vars.get("batch_stats", {}), d_params=d_vars["params"],
                    g_opt_state=tx.init(g_vars["params"]), d_opt_state=tx.init(d_vars["params"]))


def make_train_step(config: Config, epoch_steps: int | None = None
                    ) -> Callable[[GANState, jax.Array], tuple[GANState, dict]]:
    """Returns `train_step(state, real) -> (state, metrics)`, `real` of shape [k, B, 28, 28, 1];
    `epoch_steps`: steps per epoch, for a momentum ramp given in epochs (`make_optimizer`)."""
    nets = make_networks(config)
    loss_pair = losses.get_losses(config.loss)
    tx = make_optimizer(config, epoch_steps)
    _, train_key, _ = root_keys(config.seed)

    def d_update(state: GANState, real, key):
        z_key, d_key = jax.random.split(key)
        z = nets.sample_noise(z_key, real.shape[0])
        fake, g_batch_stats = nets.generate(state.g_params, state.g_batch_stats, z)
        grad_fn = jax.value_and_grad(nets.discriminator_loss, has_aux=True)
        (d_loss, (real_logits, fake_logits)), grads = grad_fn(
            state.d_params, real, jax.lax.stop_gradient(fake), d_key)
        updates, d_opt_state = tx.update(grads, state.d_opt_state, state.d_params)
        state = state.replace(d_params=optax.apply_updates(state.d_params, updates),
                              d_opt_state=d_opt_state, g_batch_stats=g_batch_stats)
        return state, {"d_loss": d_loss, "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
                       "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
                       "d_grad_norm": optax.tree.norm(grads)}

    def g_update(state: GANState, batch: int, key):
        z_key, d_key = jax.random.split(key)
        z = nets.sample_noise(z_key, batch)

        def g_loss_fn(g_params):
            fake, g_batch_stats = nets.generate(g_params, state.g_batch_stats, z)
            fake_logits = nets.discriminate(state.d_params, fake, d_key)
            return loss_pair.generator(fake_logits), g_batch_stats

        (g_loss, g_batch_stats), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(
            state.g_params)
        updates, g_opt_state = tx.update(grads, state.g_opt_state, state.g_params)
        state = state.replace(g_params=optax.apply_updates(state.g_params, updates),
                              g_opt_state=g_opt_state, g_batch_stats=g_batch_stats)
        return state, {"g_loss": g_loss, "g_grad_norm": optax.tree.norm(grads)}

    def sequential_step(state: GANState, real):
        keys = jax.random.split(jax.random.fold_in(train_key, state.step), config.d_steps + 1)
        for i in range(config.d_steps):
            state, d_metrics = d_update(state, real[i], keys[i])
        state, g_metrics = g_update(state, real.shape[1], keys[config.d_steps])
        return state.replace(step=state.step + 1), {**d_metrics, **g_metrics}

    def simultaneous_step(state: GANState, real):
        z_key, d_key = jax.random.split(jax.random.fold_in(train_key, state.step))
        z = nets.sample_noise(z_key, real.shape[1])

        def both_losses(g_params, d_params):
            fake, g_batch_stats = nets.generate(g_params, state.g_batch_stats, z)
            d_loss, (real_logits, fake_logits) = nets.discriminator_loss(d_params, real[0], fake,
                                                                         d_key)
            g_loss = loss_pair.generator(fake_logits)
            return (d_loss, g_loss), (g_batch_stats, real_logits, fake_logits)

        (d_loss, g_loss), backward, (g_batch_stats, real_logits, fake_logits) = jax.vjp(
            both_losses, state.g_params, state.d_params, has_aux=True)
        one, zero = jnp.ones_like(d_loss), jnp.zeros_like(d_loss)
        _, d_grads = backward((one, zero))
        g_grads, _ = backward((zero, one))
        d_updates, d_opt_state = tx.update(d_grads, state.d_opt_state, state.d_params)
        g_updates, g_opt_state = tx.update(g_grads, state.g_opt_state, state.g_params)
        state = GANState(step=state.step + 1,
                         g_params=optax.apply_updates(state.g_params, g_updates),
                         g_batch_stats=g_batch_stats,
                         d_params=optax.apply_updates(state.d_params, d_updates),
                         g_opt_state=g_opt_state, d_opt_state=d_opt_state)
        return state, {"d_loss": d_loss, "g_loss": g_loss,
                       "d_real": jnp.mean(jax.nn.sigmoid(real_logits)),
                       "d_fake": jnp.mean(jax.nn.sigmoid(fake_logits)),
                       "d_grad_norm": optax.tree.norm(d_grads),
                       "g_grad_norm": optax.tree.norm(g_grads)}

    return sequential_step if config.schedule == "sequential" else simultaneous_step


def jit_train_step(config: Config, mesh, epoch_steps: int | None = None) -> Callable:
    """The train step compiled for `mesh`: state replicated, real batches sharded on axis 1."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(make_train_step(config, epoch_steps),
                   in_shardings=(replicated, parallel.batch_sharding(mesh, axis=1)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def real_batches(dataset: np.ndarray, config: Config, step: int) -> np.ndarray:
    """This process's share of the k real minibatches of `step`, shape [k, B / processes, ...].

    Minibatch i of step s is data batch s * k + i of the (seed, batch)-determined stream.
    """
    k = config.d_steps
    return np.stack([
        dataset[data.batch_indices(len(dataset), config.batch_size, config.seed, step * k + i,
                                   jax.process_index(), jax.process_count())]
        for i in range(k)])


def load_training_images(config: Config) -> np.ndarray:
    """The training split as float32 in the generator's output range, checked to fit the model."""
    dataset = data.load(config.dataset, config.train_split, config.data_dir)
    if dataset.image_shape != models.IMAGE_SHAPE:
        raise ValueError(f"{config.model} models images of shape {models.IMAGE_SHAPE}; dataset "
                         f"{config.dataset} has {dataset.image_shape}.")
    lo, hi = models.get_models(config.model)[2]
    return (dataset.images.astype(np.float32) / 255.0) * (hi - lo) + lo


def num_train_steps(config: Config, num_examples: int) -> int:
    if config.num_steps is not None:
        return config.num_steps
    return config.num_epochs * steps_per_epoch(config, num_examples)


def sample_images(config: Config, state: GANState) -> np.ndarray:
    """The generator (running batch-norm averages) on the run's fixed noise batch."""
    nets = make_networks(config)
    z = nets.sample_noise(root_keys(config.seed)[2], config.num_samples)
    params, batch_stats = parallel.to_host((state.g_params, state.g_batch_stats))
    return np.asarray(nets.generate(params, batch_stats, z, train=False)[0])


def save_pictures(config: Config, workdir: str, state: GANState, step: int) -> str:
    value_range = models.get_models(config.model)[2]
    samples = sample_images(config, state)
    path = images.save_image_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                                  samples, value_range=value_range)
    images.save_image_grid(os.path.join(workdir, "samples.png"), samples,
                           value_range=value_range)
    rows = [r for r in metrics.read_metrics(workdir) if "d_loss" in r]  # not evaluation rows
    if rows:
        steps = [r["step"] for r in rows]
        images.save_curves(os.path.join(workdir, "losses.png"),
                           {k: (steps, [r[k] for r in rows]) for k in ("d_loss", "g_loss")},
                           ylabel="loss", title=f"{config.model} on {config.dataset}")
    return path


def train_and_evaluate(config: Config, workdir: str, overwrite: bool = False) -> GANState:
    """Trains (or resumes training) in `workdir` up to `num_steps`; returns the final state."""
    config.validate()
    mesh = parallel.make_mesh()
    per_device = parallel.check_global_batch(config.batch_size, mesh)
    train_images = load_training_images(config)
    total_steps = num_train_steps(config, len(train_images))
    config_dict = config_lib.to_dict(config)
    logging.info("GAN %s (%s loss, %s schedule, k=%d) on %s: %d training images, global batch "
                 "%d = %d devices x %d, %d processes; %d steps.", config.model, config.loss,
                 config.schedule, config.d_steps, config.dataset, len(train_images),
                 config.batch_size, mesh.devices.size, per_device, jax.process_count(),
                 total_steps)

    state = parallel.replicate(mesh, create_train_state(config, root_keys(config.seed)[0]))
    with workdirs.claim(workdir, config_dict, overwrite, RESUMABLE_KEYS,
                        defaults=config_lib.to_dict(Config()), num_steps=total_steps), \
            checkpoints.resume(workdir, config.checkpoint_every, config_dict, state,
                               config.log_every) as (ckpts, state, start_step, writer):
        state, last_step = _train_loop(config, workdir, mesh, state, train_images, start_step,
                                       total_steps, ckpts, writer)
    parallel.log_fingerprint(last_step, (state.g_params, state.d_params))
    if jax.process_index() == 0:
        logging.info("Done. Samples: %s  metrics: %s  checkpoints: %s",
                     os.path.join(workdir, "samples.png"),
                     os.path.join(workdir, metrics.METRICS_FILE), ckpts.directory)
    return state


def _train_loop(config: Config, workdir: str, mesh, state: GANState, train_images: np.ndarray,
                start_step: int, total_steps: int, ckpts: checkpoints.Checkpoints,
                writer: metrics.MetricWriter) -> tuple[GANState, int]:
    """Steps `start_step` to `total_steps` (or to the checkpoint where `max_minutes` ran out):
    log, check for NaNs, checkpoint, draw samples. Returns the state and its step."""
    progress = metrics.Progress(total_steps, start_step, config.batch_size * config.d_steps)
    train_step = jit_train_step(config, mesh, steps_per_epoch(config, len(train_images)))
    pending = metrics.PendingMetrics(last_checkpoint=start_step or None)
    start_time = time.monotonic()
    done = start_step
    for step in range(start_step, total_steps):
        real = parallel.shard_batch(mesh, real_batches(train_images, config, step), axis=1)
        state, step_metrics = train_step(state, real)
        pending.add(step_metrics)
        done = step + 1
        is_log = metrics.due(done, config.log_every, total_steps)
        is_checkpoint = metrics.due(done, config.checkpoint_every, total_steps)
        if is_log or is_checkpoint:
            row = pending.fetch(done)[-1]
            if is_log:
                writer.write(done, {**row, **progress.log(done, row)})
        if config.eval.every and done % config.eval.every == 0 and jax.process_index() == 0:
            result = evaluate_run(config, state, done, config.eval)
            logging.info("Evaluation at step %d:\n%s", done, evaluate.describe(result))
            writer.write(done, pending.check(done, evaluate.flat_metrics(result)))
        if is_checkpoint:
            ckpts.save(done, state, force=True)
            pending.checkpointed(done)
        out_of_time = is_checkpoint and checkpoints.out_of_time(
            start_time, config.max_minutes, done, total_steps)
        if jax.process_index() == 0 and (out_of_time
                                         or metrics.due(done, config.sample_every, total_steps)):
            writer.flush()
            save_pictures(config, workdir, state, done)  # also the pictures of where it stops
        if out_of_time:
            break
        ckpts.stop_if_preempted(done, state)
    return state, done


def evaluate_run(config: Config, state: GANState, step: int, eval_config: evaluate.EvalConfig,
                 seed: int | None = None) -> dict[str, Any]:
    """`gan.evaluate.evaluate_state` of the generator of `state` against the run's dataset and
    splits; `seed` (default: the run's) draws the samples and the Parzen validation images."""
    return evaluate.evaluate_state(make_networks(config), state, step, eval_config,
                                   config.dataset, config.data_dir, config.train_split,
                                   config.eval_split, config.seed if seed is None else seed)


def evaluate_workdir(workdir: str, eval_config: evaluate.EvalConfig, seed: int = 0
                     ) -> dict[str, Any]:
    """Evaluates the latest checkpoint of the run in `workdir` against the run's own dataset and
    splits (`evaluate_run`); writes `workdir/eval.json`."""
    config_path = os.path.join(workdir, workdirs.CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{workdir} holds no GAN run ({workdirs.CONFIG_FILE} missing); "
                                "train one first with `python -m launch.gan --workdir=...`.")
    config = from_dict(workdirs.read_json(config_path))
    template = create_train_state(config, jax.random.PRNGKey(0))
    with checkpoints.Checkpoints(workdir, save_every=1) as ckpts:
        state, step = ckpts.restore_latest(template)
    if step == 0:
        raise FileNotFoundError(f"{workdir} has no readable checkpoint in "
                                f"{os.path.join(workdir, 'checkpoints')}; nothing to evaluate.")
    result = evaluate_run(config, state, step, eval_config, seed)
    evaluate.write_result(workdir, result)
    return result

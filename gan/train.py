"""Training a GAN: the state, Algorithm 1 of Goodfellow et al. (2014) as one jitted step, and the
loop that runs it with checkpoints, metrics and sample grids.

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

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from common import checkpoints, data, images, metrics, parallel
from common.config import check_positive
from gan import evaluate, losses, models

SCHEDULES = ("sequential", "simultaneous")
OPTIMIZERS = ("adam", "sgd_momentum")
NOISE = ("normal", "uniform")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "dcgan"
    loss: str = "non_saturating"
    schedule: str = "simultaneous"
    d_steps: int = 1  # k of Algorithm 1 (sequential schedule only)
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-7  # Keras' default
    momentum: float = 0.5  # SGD: initial momentum
    final_momentum: float = 0.5  # SGD: momentum reached linearly after `momentum_saturate_steps`
    momentum_saturate_steps: int = 0
    lr_decay: float = 1.0  # learning rate divided by this after every update (the paper: 1.000004)
    min_learning_rate: float = 0.0
    gp_weight: float = 10.0  # wasserstein_gp only
    noise: str = "normal"
    noise_dim: int = models.NOISE_DIM
    dataset: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"  # or a slice: MNIST offline trains on "test[:8000]"
    eval_split: str = "test"  # the real images of FID and the Parzen test set ("test[8000:]")
    batch_size: int = 256
    num_epochs: int = 50
    num_steps: int | None = None  # overrides num_epochs
    max_minutes: float = 0.0  # stop at the first checkpoint after this long (0: no limit)
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    sample_every: int = 500
    num_samples: int = 64
    # Evaluation (gan.evaluate): every `eval_every` steps during training (0: never), and by
    # `launch.gan --evaluate_only`.
    eval_every: int = 0
    eval_num_samples: int = 10_000
    eval_num_real: int = 10_000
    eval_num_validation: int = 1_000
    eval_parzen: bool = True
    classifier_dir: str | None = None
    classifier_epochs: int = 5
    classifier_min_steps: int = 3000

    def validate(self) -> None:
        choices = {"model": tuple(models.MODELS), "loss": tuple(losses.LOSSES),
                   "schedule": SCHEDULES, "optimizer": OPTIMIZERS, "noise": NOISE,
                   "dataset": data.DATASETS}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; "
                                 f"choose one of {', '.join(allowed)}.")
        if self.d_steps < 1:
            raise ValueError(f"d_steps must be >= 1, got {self.d_steps}.")
        if self.schedule == "simultaneous" and self.d_steps != 1:
            raise ValueError("The simultaneous schedule updates D and G from one forward pass "
                             "(k = 1); use --schedule=sequential for d_steps > 1.")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0 (0: no limit), got {self.max_minutes}.")
        check_positive(self, ("batch_size", "log_every", "checkpoint_every", "sample_every"))
        for split in (self.train_split, self.eval_split):
            data.parse_split(split)
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: no evaluation), got {self.eval_every}.")


# Keys a rerun may change without starting a different run.
RESUMABLE_KEYS = ("num_steps", "num_epochs", "max_minutes", "log_every", "checkpoint_every",
                  "sample_every", "data_dir", "num_samples", "eval_every", "eval_num_samples",
                  "eval_num_real", "eval_num_validation", "eval_parzen", "classifier_dir",
                  "classifier_epochs", "classifier_min_steps")


@flax.struct.dataclass
class GANState:
    step: jax.Array
    g_params: Any
    g_batch_stats: Any
    d_params: Any
    g_opt_state: Any
    d_opt_state: Any


def eval_config(config: Config) -> "evaluate.EvalConfig":
    return evaluate.EvalConfig(num_samples=config.eval_num_samples, num_real=config.eval_num_real,
                               num_validation=config.eval_num_validation, parzen=config.eval_parzen,
                               classifier_dir=config.classifier_dir,
                               classifier_epochs=config.classifier_epochs,
                               classifier_min_steps=config.classifier_min_steps, seed=config.seed,
                               train_split=config.train_split, test_split=config.eval_split)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam (the tutorial: 1e-4, Keras epsilon) or SGD with momentum (the paper's code: lr 0.1,
    momentum 0.5 rising linearly to 0.7, lr divided by 1.000004 after each update)."""
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate, b1=config.adam_b1, b2=config.adam_b2,
                          eps=config.adam_eps)
    learning_rate = optax.exponential_decay(
        config.learning_rate, transition_steps=1, decay_rate=1.0 / config.lr_decay,
        end_value=config.min_learning_rate or None)
    momentum = optax.linear_schedule(config.momentum, config.final_momentum,
                                     max(config.momentum_saturate_steps, 1))
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)


def sample_noise(config: Config, key: jax.Array, batch: int) -> jax.Array:
    if config.noise == "uniform":  # unit variance, as the paper's code's uniform option
        return jax.random.uniform(key, (batch, config.noise_dim), minval=-jnp.sqrt(3.0),
                                  maxval=jnp.sqrt(3.0))
    return jax.random.normal(key, (batch, config.noise_dim))


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
    tx = make_optimizer(config)
    return GANState(step=jnp.zeros((), jnp.int32), g_params=g_vars["params"],
                    g_batch_stats=g_vars.get("batch_stats", {}), d_params=d_vars["params"],
                    g_opt_state=tx.init(g_vars["params"]), d_opt_state=tx.init(d_vars["params"]))


class Networks:
    """The two networks as pure functions of their parameters (closures over the Flax modules)."""

    def __init__(self, config: Config):
        self.config = config
        self.generator, self.discriminator, self.value_range = models.get_models(config.model)

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
        loss_pair = losses.get_losses(self.config.loss)
        k_real, k_fake, k_gp, k_eps = jax.random.split(key, 4)
        real_logits = self.discriminate(d_params, real, k_real)
        fake_logits = self.discriminate(d_params, fake, k_fake)
        loss = loss_pair.discriminator(real_logits, fake_logits)
        if loss_pair.gradient_penalty:
            critic = lambda x: self.discriminate(d_params, x, k_gp)  # noqa: E731
            loss = loss + self.config.gp_weight * losses.gradient_penalty(critic, real, fake, k_eps)
        return loss, (real_logits, fake_logits)


def make_train_step(config: Config) -> Callable[[GANState, jax.Array], tuple[GANState, dict]]:
    """Returns `train_step(state, real) -> (state, metrics)`, `real` of shape [k, B, 28, 28, 1]."""
    nets = Networks(config)
    loss_pair = losses.get_losses(config.loss)
    tx = make_optimizer(config)
    _, train_key, _ = root_keys(config.seed)

    def d_update(state: GANState, real, key):
        z_key, d_key = jax.random.split(key)
        z = sample_noise(config, z_key, real.shape[0])
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
        z = sample_noise(config, z_key, batch)

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
        z = sample_noise(config, z_key, real.shape[1])

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


def jit_train_step(config: Config, mesh) -> Callable:
    """The train step compiled for `mesh`: state replicated, real batches sharded on axis 1."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(make_train_step(config),
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
    return config.num_epochs * max(num_examples // (config.batch_size * config.d_steps), 1)


def sample_images(config: Config, state: GANState) -> np.ndarray:
    """The generator (running batch-norm averages) on the run's fixed noise batch."""
    nets = Networks(config)
    z = sample_noise(config, root_keys(config.seed)[2], config.num_samples)
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
    checkpoints.claim_workdir(workdir, dataclasses.asdict(config), overwrite, RESUMABLE_KEYS,
                              defaults=dataclasses.asdict(Config()))
    logging.info("GAN %s (%s loss, %s schedule, k=%d) on %s: %d training images, global batch "
                 "%d = %d devices x %d, %d processes; %d steps.", config.model, config.loss,
                 config.schedule, config.d_steps, config.dataset, len(train_images),
                 config.batch_size, mesh.devices.size, per_device, jax.process_count(),
                 total_steps)

    state = parallel.replicate(mesh, create_train_state(config, root_keys(config.seed)[0]))
    with checkpoints.Checkpoints(workdir, config.checkpoint_every) as ckpts:
        state, start_step = ckpts.restore_latest(state)
        if start_step:
            logging.info("Resumed from the checkpoint of step %d.", start_step)
        writer = metrics.MetricWriter(workdir, resume_step=start_step)
        try:
            state, last_step = _train_loop(config, workdir, mesh, state, train_images, start_step,
                                           total_steps, ckpts, writer)
        finally:
            writer.close()
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
    train_step = jit_train_step(config, mesh)
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
        if config.eval_every and done % config.eval_every == 0 and jax.process_index() == 0:
            result = evaluate.evaluate_state(config, state, done, eval_config(config))
            logging.info("Evaluation at step %d:\n%s", done, evaluate.describe(result))
            writer.write(done, evaluate.flat_metrics(result))
        if is_checkpoint:
            ckpts.save(done, state, force=True)
            pending.checkpointed(done)
        out_of_time = (is_checkpoint and config.max_minutes and done < total_steps
                       and parallel.agree(time.monotonic() - start_time > 60 * config.max_minutes))
        if jax.process_index() == 0 and (out_of_time
                                         or metrics.due(done, config.sample_every, total_steps)):
            writer.flush()
            save_pictures(config, workdir, state, done)  # also the pictures of where it stops
        if out_of_time:
            logging.info("Stopping after step %d of %d: --max_minutes=%g has passed; the same "
                         "command continues from this checkpoint.", done, total_steps,
                         config.max_minutes)
            break
    return state, done

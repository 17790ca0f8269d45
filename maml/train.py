"""Meta-training MAML: the config, the state, and the loop that runs the jitted meta-step with
checkpoints, metrics, periodic few-shot evaluation and pictures.

`dataset` chooses the task family: "sinusoid" (regression, `MLP`) or "omniglot" (N-way K-shot
classification, `Conv4`). The meta-batch of step s is a pure function of (seed, s), so a killed and
restarted run continues with the tasks it would have seen.

Speed on CPU: a `jax.vmap` over per-task convolution kernels becomes a grouped convolution that
XLA's CPU backend runs 19-59x slower than PyTorch. `conv_impl="auto"` therefore computes the
convolutions as im2col + matrix product on CPU (`models.PatchConv`; the vmapped meta-batch then is a
batched matrix product) and as `lax.conv` elsewhere; `task_batching="auto"` keeps `vmap`, the
definition. Both choices give the same numbers (tested); see the README, "MAML", for timings.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from absl import logging

from common import checkpoints, images, metrics, omniglot, parallel
from common.config import check_positive
from maml import core, evaluate, models, tasks

DATASETS = ("sinusoid", "omniglot")
CONV_IMPLS = ("auto",) + models.CONV_IMPLS


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: str = "sinusoid"
    ways: int = 5  # N (omniglot)
    shots: int = 10  # K: support examples per class (sinusoid: support points)
    queries: int = 10  # query examples per class (sinusoid: query points)
    batch_size: int = 25  # tasks per meta-batch
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    learn_inner_lr: str = "none"  # none | per_parameter (Meta-SGD) | per_layer_per_step (MAML++)
    multi_step_loss: bool = False  # MAML++
    multi_step_anneal_steps: int = 10_000
    adapt_only_head: bool = False  # ANIL: the inner loop adapts the output layer only
    task_batching: str = "auto"
    conv_impl: str = "auto"
    bn_statistics: str = "transductive"  # the paper's code; "support": query uses support stats
    filters: int = 64
    meta_lr: float = 1e-3
    test_inner_steps: int = 10  # inner steps at evaluation (omniglot 5-way: 3, 20-way: 5)
    test_shots: tuple[int, ...] = ()  # sinusoid: K values evaluated (default: `shots`)
    eval_episodes: int = 600
    eval_every: int = 1000  # meta-iterations between quick evaluations (accuracy vs iteration)
    eval_episodes_during_training: int = 100
    baseline_steps: int = 10_000  # sinusoid: steps of the pretrained-on-all-tasks baseline
    train_characters: int = tasks.TRAIN_CHARACTERS
    rotate: bool = True
    data_dir: str | None = None
    cache_dir: str | None = None
    evaluate: bool = True  # the final evaluation (600 episodes; sinusoid: the baseline and curves)
    num_steps: int = 70_000
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000

    def validate(self) -> None:
        choices = {"dataset": DATASETS, "conv_impl": CONV_IMPLS,
                   "bn_statistics": tasks.BN_STATISTICS}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"Unknown {field} {getattr(self, field)!r}; "
                                 f"choose one of {', '.join(allowed)}.")
        self.meta_config().validate()
        check_positive(self, ("ways", "shots", "queries", "batch_size", "num_steps", "log_every",
                              "checkpoint_every", "eval_every", "eval_episodes",
                              "test_inner_steps"))

    def meta_config(self) -> core.MetaConfig:
        return core.MetaConfig(inner_steps=self.inner_steps, inner_lr=self.inner_lr,
                               first_order=self.first_order, learn_inner_lr=self.learn_inner_lr,
                               multi_step_loss=self.multi_step_loss,
                               multi_step_anneal_steps=self.multi_step_anneal_steps,
                               task_batching=self.task_batching)


# Keys a rerun may change without starting a different run.
RESUMABLE_KEYS = ("num_steps", "log_every", "checkpoint_every", "eval_every", "data_dir",
                  "cache_dir", "eval_episodes", "task_batching", "conv_impl", "evaluate")


def resolve_conv_impl(conv_impl: str, platform: str | None = None) -> str:
    if conv_impl != "auto":
        return conv_impl
    return "patches" if (platform or jax.devices()[0].platform) == "cpu" else "xla"


def make_model(config: Config):
    if config.dataset == "sinusoid":
        return models.MLP()
    return models.Conv4(config.ways, filters=config.filters,
                        conv_impl=resolve_conv_impl(config.conv_impl))


def make_learner(config: Config) -> core.Learner:
    model = make_model(config)
    if config.dataset == "sinusoid":
        return tasks.regression_learner(model)
    return tasks.classification_learner(model, config.bn_statistics)


def example_input(config: Config) -> jax.Array:
    return jnp.zeros((1, 1) if config.dataset == "sinusoid" else (1, 28, 28, 1))


def slow_prefixes(config: Config) -> tuple[str, ...]:
    return ("norm", "conv", "dense") if config.adapt_only_head else models.SLOW_PREFIXES


def create_train_state(config: Config, key: jax.Array) -> core.MetaState:
    fast, slow = models.init_split(make_model(config), key, example_input(config),
                                   slow_prefixes(config))
    return core.create_meta_state(config.meta_config(), fast, slow,
                                  core.make_optimizer(config.meta_lr))


class TaskSource:
    """Meta-batches as pure functions of (step): training tasks and held-out test tasks."""

    def __init__(self, config: Config):
        self.config = config
        self.train_images = self.test_images = None
        if config.dataset == "omniglot":
            data = omniglot.load_omniglot(config.data_dir, config.cache_dir)
            train, test = tasks.character_split(data.num_characters, config.seed,
                                                config.train_characters)
            self.train_images, self.test_images = data.images[train], data.images[test]
            logging.info("Omniglot from %s: %d characters, %d to meta-train, %d to test.",
                         data.source, data.num_characters, len(train), len(test))

    def batch(self, step: int, num_tasks: int, stream: int = tasks.TRAIN_STREAM,
              shots: int | None = None, queries: int | None = None) -> dict:
        c = self.config
        shots = shots or c.shots
        queries = queries or c.queries
        if c.dataset == "sinusoid":
            return tasks.sinusoid_tasks(c.seed, step, num_tasks, shots, queries, stream)[0]
        images = self.train_images if stream == tasks.TRAIN_STREAM else self.test_images
        return tasks.episodes(images, c.seed, step, num_tasks, c.ways, shots, queries, stream,
                              c.rotate)

    def local_train_batch(self, step: int) -> dict:
        """This process's share of meta-batch `step`."""
        share = self.config.batch_size // jax.process_count()
        full = self.batch(step, self.config.batch_size)
        lo = jax.process_index() * share
        return jax.tree.map(lambda a: a[lo:lo + share], full)


def save_pictures(config: Config, workdir: str) -> None:
    rows = [r for r in metrics.read_metrics(workdir) if "test_accuracy" in r or "test_loss" in r]
    if not rows:
        return
    key = "test_accuracy" if config.dataset == "omniglot" else "test_loss"
    images.save_curves(os.path.join(workdir, f"{key}.png"),
                       {key: ([r["step"] for r in rows], [r[key] for r in rows])},
                       xlabel="meta-iteration", ylabel=key.replace("_", " "),
                       title=f"MAML {config.dataset}: held-out tasks after "
                             f"{config.test_inner_steps} inner steps")


def train_and_evaluate(config: Config, workdir: str, overwrite: bool = False) -> core.MetaState:
    """Meta-trains (or resumes) in `workdir` up to `num_steps`, then evaluates; returns the state."""
    config.validate()
    mesh = parallel.make_mesh()
    per_device = parallel.check_global_batch(config.batch_size, mesh, "meta-batch size")
    if config.batch_size % jax.process_count():
        raise ValueError(f"meta-batch size {config.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes.")
    source = TaskSource(config)
    checkpoints.claim_workdir(workdir, dataclasses.asdict(config), overwrite, RESUMABLE_KEYS)
    logging.info("MAML on %s: %d-shot%s, %d inner steps (lr %g, %s order, inner lr %s), "
                 "meta-batch %d = %d devices x %d; %d meta-iterations.", config.dataset,
                 config.shots, f" {config.ways}-way" if config.dataset == "omniglot" else "",
                 config.inner_steps, config.inner_lr,
                 "first" if config.first_order else "second", config.learn_inner_lr,
                 config.batch_size, mesh.devices.size, per_device, config.num_steps)

    optimizer = core.make_optimizer(config.meta_lr)
    learner = make_learner(config)
    ckpts = checkpoints.Checkpoints(workdir, config.checkpoint_every)
    state = parallel.replicate(mesh, create_train_state(config, jax.random.PRNGKey(config.seed)))
    state, start_step = ckpts.restore_latest(state)
    if start_step:
        logging.info("Resumed from the checkpoint of step %d.", start_step)
    writer = metrics.MetricWriter(workdir, resume_step=start_step)
    progress = metrics.Progress(config.num_steps, start_step, config.batch_size, "tasks")
    meta_step = core.make_meta_step(learner, config.meta_config(), optimizer, mesh)
    quick_eval = evaluate.make_task_evaluator(config, learner)

    try:
        pending = metrics.PendingMetrics(last_checkpoint=start_step or None)
        for step in range(start_step, config.num_steps):
            batch = parallel.shard_batch(mesh, source.local_train_batch(step))
            state, step_metrics = meta_step(state, batch)
            pending.add(step_metrics)
            done = step + 1
            is_log = metrics.due(done, config.log_every, config.num_steps)
            is_checkpoint = metrics.due(done, config.checkpoint_every, config.num_steps)
            is_eval = metrics.due(done, config.eval_every, config.num_steps)
            if is_log or is_checkpoint or is_eval:
                row = pending.fetch(done)[-1]
                if is_eval:
                    summary = quick_eval(parallel.to_host(state.meta_params), source,
                                         config.eval_episodes_during_training)
                    row = {**row, **{f"test_{k}": v for k, v in summary.items()}}
                if is_log or is_eval:
                    rates = progress.log(done, row)
                    writer.write(done, {**row, **rates})
            if is_checkpoint:
                ckpts.save(done, state, force=True)
                pending.checkpointed(done)
    finally:
        ckpts.close()
        writer.close()
    parallel.log_fingerprint(config.num_steps, state.meta_params)
    if jax.process_index() == 0:
        save_pictures(config, workdir)
        if config.evaluate:
            results = evaluate.evaluate(config, parallel.to_host(state.meta_params), source,
                                        workdir, learner)
            logging.info("Evaluation: %s", evaluate.summary_line(results))
    return state

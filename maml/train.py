"""Meta-training MAML (or Prototypical Networks): the config, the state, the meta-step and the loop
that runs it with checkpoints, metrics, periodic few-shot evaluation and pictures.

`dataset` chooses the task family: "sinusoid" (regression, `MLP`) or "omniglot" (N-way K-shot
classification, `Conv4`). `learner` chooses the method: "maml" (`maml/core.py`) or "protonet"
(`maml/protonet.py`) or "pretrain" (a classifier over all training classes whose head alone is
fitted to each test episode's support set: `maml/pretrain.py`); the last two Omniglot only, with
the same episodes, sharding, checkpoints and evaluation. The
meta-batch of step s is a pure function of (seed, s), so a killed and restarted run continues with
the tasks it would have seen; `max_minutes` stops a run at a checkpoint for the same command to
continue.

Speed on CPU: a `jax.vmap` over per-task convolution kernels becomes a grouped convolution, which
XLA's CPU backend runs slowly. `conv_impl="auto"` therefore computes the convolutions as im2col +
matrix product on CPU (`models.PatchConv`; the vmapped meta-batch then is a batched matrix product)
and as `lax.conv` elsewhere; `inner.task_batching="auto"` runs the tasks one after the other
on CPU, summing their meta-gradients in a `lax.scan`, and keeps `vmap`, the definition,
elsewhere. Both choices give the same numbers (tested); benchmarks/maml.py measures the speed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

from common import checkpoints, images, metrics, parallel, workdirs
from common import config as config_lib
from common.config import check_positive
from maml import core, evaluate, models, pretrain, protonet, tasks
from maml.core import MetaConfig
from maml.evaluate import EvalConfig

DATASETS = ("sinusoid", "omniglot")
LEARNERS = ("maml", "protonet", "pretrain")
CONV_IMPLS = ("auto",) + models.CONV_IMPLS


@dataclasses.dataclass(frozen=True)
class Config:
    """A MAML (or Prototypical Networks) run.

    Attributes:
        dataset: Task family: sinusoid (regression) or omniglot (N-way K-shot classification).
        learner: Method: maml (an inner loop adapts the network; `core`), protonet
            (Prototypical Networks: nearest class mean in an embedding; `protonet`, omniglot) or
            pretrain (a classifier over all training classes, its head refitted to each test
            episode's support set; `pretrain`, omniglot).
        ways: N: classes per episode (omniglot; protonet: of the test episodes).
        train_ways: Classes per training episode (0: ways; protonet, the paper's Omniglot: 60).
        shots: K: support examples per class (sinusoid: support points).
        queries: Query examples per class (sinusoid: query points).
        train_queries: Query examples per class of the training episodes (0: queries).
        meta_batch_size: Tasks per meta-step (the meta-batch).
        inner: The inner loop and the meta-objective (`core.MetaConfig`; maml).
        adapt_only_head: ANIL: the inner loop adapts only the output layer.
        conv_impl: Convolutions: xla (lax.conv), patches (im2col + matmul), auto (patches on CPU,
            xla elsewhere).
        bn_statistics: Query batch-norm statistics: transductive (the paper's code: the query
            batch's own) or support (the support set's).
        filters: Conv4 filters per layer (omniglot).
        head_steps: pretrain: Adam steps fitting the new head to a test episode's support set.
        head_lr: pretrain: learning rate of those steps.
        meta_lr: Adam learning rate of the meta-update.
        lr_halve_every: Halve meta_lr every this many meta-iterations (0: constant; protonet, the
            paper: 2000 episodes).
        eval: Few-shot evaluation on held-out tasks (`evaluate.EvalConfig`).
        split: Omniglot characters: random (train_characters chosen by the seed, the rest
            held out; Finn et al.) or alphabets (the 30 background alphabets' 964 characters to
            train, the 20 evaluation alphabets' 659 to test; Lake et al.).
        train_characters: Omniglot characters to meta-train on (split=random); the rest are held
            out for testing.
        rotate: Omniglot: rotations by 90 degrees as new classes.
        data_dir: Directory of the Omniglot archives (omniglot).
        cache_dir: Where the decoded Omniglot array is cached.
        evaluate: Evaluate on held-out tasks after meta-training (`eval_episodes` episodes;
            sinusoid: also the pretrained baseline and the curves).
        num_steps: Meta-iterations of the run (a rerun with a larger value continues).
        max_minutes: Stop at the first checkpoint after this many minutes (0: no limit); the
            same command continues the run.
        seed: Seed of the initialisation, the tasks and the Omniglot character split.
        log_every: Meta-iterations between metric rows.
        checkpoint_every: Meta-iterations between checkpoints.
    """
    dataset: str = config_lib.choice("sinusoid", DATASETS)
    learner: str = config_lib.choice("maml", LEARNERS)
    ways: int = 5
    train_ways: int = 0
    shots: int = 10
    queries: int = 10
    train_queries: int = 0
    meta_batch_size: int = 25
    inner: MetaConfig = config_lib.nested(MetaConfig)
    adapt_only_head: bool = False
    conv_impl: str = config_lib.choice("auto", CONV_IMPLS)
    bn_statistics: str = config_lib.choice("transductive", tasks.BN_STATISTICS)
    filters: int = 64
    head_steps: int = 100
    head_lr: float = 0.01
    meta_lr: float = 1e-3
    lr_halve_every: int = 0
    eval: EvalConfig = config_lib.nested(EvalConfig)
    split: str = config_lib.choice("random", tasks.SPLITS)
    train_characters: int = tasks.TRAIN_CHARACTERS
    rotate: bool = True
    data_dir: str | None = None
    cache_dir: str | None = None
    evaluate: bool = True
    num_steps: int = 70_000
    max_minutes: float = 0.0
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000

    def validate(self) -> None:
        config_lib.check_choices(self)
        self.inner.validate()
        self.eval.validate()
        check_positive(self, ("ways", "shots", "queries", "meta_batch_size", "num_steps",
                              "log_every", "checkpoint_every", "head_steps"))
        for name in ("train_ways", "train_queries", "lr_halve_every", "max_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: see its help), got "
                                 f"{getattr(self, name)}.")
        if self.learner != "maml" and self.dataset != "omniglot":
            raise ValueError(f"learner={self.learner} classifies Omniglot episodes; pass "
                             "--dataset=omniglot.")
        if self.learner == "maml" and self.train_ways not in (0, self.ways):
            raise ValueError(f"MAML's network has one output per class, so train_ways "
                             f"({self.train_ways}) must equal ways ({self.ways}) or be 0.")


# Keys a rerun may change without starting a different run (flag-style names).
RESUMABLE_KEYS = ("num_steps", "max_minutes", "log_every", "checkpoint_every", "eval_every",
                  "data_dir", "cache_dir", "eval_episodes", "inner_task_batching", "conv_impl",
                  "evaluate")


def resolve_conv_impl(conv_impl: str, platform: str | None = None,
                      learner: str = "maml") -> str:
    """'auto' -> MAML on CPU: "patches" (its vmapped per-task kernels); else "xla". The other
    learners share one kernel across episodes, so nothing becomes a grouped convolution."""
    if conv_impl != "auto":
        return conv_impl
    on_cpu = (platform or jax.devices()[0].platform) == "cpu"
    return "patches" if on_cpu and learner == "maml" else "xla"


def make_model(config: Config):
    conv_impl = resolve_conv_impl(config.conv_impl, learner=config.learner)
    if config.learner == "protonet":
        return protonet.Embedding(filters=config.filters, conv_impl=conv_impl)
    if config.learner == "pretrain":
        return pretrain.Classifier(
            tasks.num_train_classes(config.split, config.train_characters, config.rotate),
            filters=config.filters, conv_impl=conv_impl)
    if config.dataset == "sinusoid":
        return models.MLP()
    return models.Conv4(config.ways, filters=config.filters, conv_impl=conv_impl)


def make_learner(config: Config) -> core.Learner | None:
    """MAML's support and query losses; None for the other learners (no inner loop)."""
    if config.learner != "maml":
        return None
    model = make_model(config)
    if config.dataset == "sinusoid":
        return tasks.regression_learner(model)
    return tasks.classification_learner(model, config.bn_statistics)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    """Adam at `meta_lr`, halved every `lr_halve_every` meta-iterations when that is set:
    lr(s) = meta_lr · 0.5^⌊s / lr_halve_every⌋."""
    if not config.lr_halve_every:
        return core.make_optimizer(config.meta_lr)
    return optax.adam(optax.exponential_decay(config.meta_lr, config.lr_halve_every, 0.5,
                                              staircase=True))


def make_adapter(config: Config, learner: core.Learner | None) -> Callable:
    """Test-time (params, tasks) -> per-task metrics [tasks, steps + 1]: MAML after 0 ..
    `eval.inner_steps` inner steps; protonet and pretrain one column (`ways`-way episodes)."""
    if config.learner == "protonet":
        return protonet.make_adapter(make_model(config), config.ways, config.bn_statistics)
    if config.learner == "pretrain":
        return pretrain.make_adapter(make_model(config), config.ways, config.bn_statistics,
                                     config.head_steps, config.head_lr)
    return evaluate.make_adapter(config.inner, learner, config.eval.inner_steps)


def test_inner_steps(config: Config) -> int:
    return config.eval.inner_steps if config.learner == "maml" else 0


def example_input(config: Config) -> jax.Array:
    return jnp.zeros((1, 1) if config.dataset == "sinusoid" else (1, 28, 28, 1))


def slow_prefixes(config: Config) -> tuple[str, ...]:
    return ("norm", "conv", "dense") if config.adapt_only_head else models.SLOW_PREFIXES


def create_train_state(config: Config, key: jax.Array) -> core.MetaState:
    if config.learner != "maml":
        return core.model_state(make_model(config), key, example_input(config),
                                make_optimizer(config))
    fast, slow = models.init_split(make_model(config), key, example_input(config),
                                   slow_prefixes(config))
    return core.create_meta_state(config.inner, fast, slow, make_optimizer(config))


def make_task_source(config: Config) -> tasks.TaskSource:
    return tasks.TaskSource(config.dataset, config.seed, config.ways, config.shots,
                            config.queries, config.rotate, config.data_dir, config.cache_dir,
                            config.train_characters, config.split, config.train_ways or None,
                            config.train_queries or None,
                            with_classes=config.learner == "pretrain")


def make_train_step(config: Config, mesh, learner: core.Learner | None
                    ) -> Callable[[core.MetaState, dict], tuple[core.MetaState, dict]]:
    """`train_step(state, tasks) -> (state, metrics)`: one meta-step (Adam, `make_optimizer`, on
    the meta-gradient of the meta-batch `tasks`; protonet: on the gradient of its episodes'
    loss), data-parallel over `mesh`; not jitted."""
    if config.learner == "protonet":
        return protonet.make_train_step(make_model(config), config.train_ways or config.ways,
                                        config.bn_statistics, make_optimizer(config))
    if config.learner == "pretrain":
        return pretrain.make_train_step(make_model(config), make_optimizer(config))
    return core.make_meta_step(learner, config.inner, make_optimizer(config), mesh)


def jit_train_step(config: Config, mesh, learner: core.Learner | None
                   ) -> Callable[[core.MetaState, dict], tuple[core.MetaState, dict]]:
    """`make_train_step` jitted: the state replicated (and donated), the tasks sharded over the
    mesh axis `data`."""
    replicated = parallel.replicated_sharding(mesh)
    return jax.jit(make_train_step(config, mesh, learner),
                   in_shardings=(replicated, parallel.batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def save_pictures(config: Config, workdir: str) -> None:
    rows = [r for r in metrics.read_metrics(workdir) if "test_accuracy" in r or "test_loss" in r]
    if not rows:
        return
    key = "test_accuracy" if config.dataset == "omniglot" else "test_loss"
    images.save_curves(os.path.join(workdir, f"{key}.png"),
                       {key: ([r["step"] for r in rows], [r[key] for r in rows])},
                       xlabel="meta-iteration", ylabel=key.replace("_", " "),
                       title=f"MAML {config.dataset}: held-out tasks after "
                             f"{config.eval.inner_steps} inner steps")


def train_and_evaluate(config: Config, workdir: str, overwrite: bool = False) -> core.MetaState:
    """Meta-trains (or resumes) in `workdir` up to `num_steps`, then evaluates; returns the
    state."""
    config.validate()
    mesh = parallel.make_mesh()
    per_device = parallel.check_global_batch(config.meta_batch_size, mesh, "meta-batch size")
    if config.meta_batch_size % jax.process_count():
        raise ValueError(f"meta-batch size {config.meta_batch_size} is not divisible by the "
                         f"{jax.process_count()} processes.")
    source = make_task_source(config)
    config_dict = config_lib.to_dict(config)
    with workdirs.claim(workdir, config_dict, overwrite, RESUMABLE_KEYS,
                        defaults=config_lib.to_dict(Config()), num_steps=config.num_steps):
        logging.info("%s", describe(config, mesh.devices.size, per_device))
        learner = make_learner(config)
        state = parallel.replicate(mesh,
                                   create_train_state(config, jax.random.PRNGKey(config.seed)))
        with checkpoints.resume(workdir, config.checkpoint_every, config_dict, state,
                                config.log_every) as (ckpts, state, start_step, writer):
            state, done = _train_loop(config, mesh, learner, source, state, start_step, ckpts,
                                      writer)
        parallel.log_fingerprint(done, state.meta_params)
        if jax.process_index() == 0:
            save_pictures(config, workdir)
            if config.evaluate and done == config.num_steps:
                results = final_evaluation(config, learner, parallel.to_host(state.meta_params),
                                           source, workdir)
                logging.info("Evaluation: %s", evaluate.summary_line(results))
    return state


def describe(config: Config, num_devices: int, per_device: int) -> str:
    """The run's start-up line."""
    episode = (f"{config.shots}-shot" + (f" {config.ways}-way" if config.dataset == "omniglot"
                                         else ""))
    if config.learner == "protonet":
        method = (f"Prototypical Networks on {config.dataset}: {episode} (training "
                  f"{config.train_ways or config.ways}-way)")
    elif config.learner == "pretrain":
        method = (f"A classifier over the training classes on {config.dataset}, its head fitted "
                  f"to {episode} test episodes ({config.head_steps} Adam steps)")
    else:
        method = (f"MAML on {config.dataset}: {episode}, {config.inner.steps} inner steps (lr "
                  f"{config.inner.lr:g}, {'first' if config.inner.first_order else 'second'} "
                  f"order, inner lr {config.inner.learn_lr})")
    return (f"{method}, meta-batch {config.meta_batch_size} = {num_devices} devices x "
            f"{per_device}; {config.num_steps} meta-iterations.")


def final_evaluation(config: Config, learner: core.Learner | None, params,
                     source: tasks.TaskSource, workdir: str) -> dict:
    """The paper's evaluation on held-out tasks (`evaluate.evaluate`; protonet: the same
    600-episode Omniglot accuracy); writes results.json."""
    if config.learner != "maml":
        results = evaluate.classification_results(make_adapter(config, learner), params, source,
                                                  config.eval.episodes, 0)
        evaluate.write_results(workdir, results)
        return results
    return evaluate.evaluate(config.eval, config.inner, params, source, learner, workdir,
                             baseline_lr=config.meta_lr, baseline_tasks=config.meta_batch_size)


def evaluate_checkpoint(workdir: str, ways: int, shots: int, episodes: int = 600) -> dict:
    """The newest checkpoint of the run in `workdir` evaluated on `episodes` `ways`-way
    `shots`-shot test episodes of its held-out characters (Prototypical Networks and the
    pretrained baseline at any ways and shots; MAML at its own ways, its output layer's size).
    Writes `results_<ways>way<shots>shot.json` in `workdir`; returns the results with the
    checkpoint's step."""
    trained = config_lib.from_dict(Config, workdirs.read_json(
        os.path.join(workdir, workdirs.CONFIG_FILE)))
    if trained.dataset != "omniglot":
        raise ValueError(f"{workdir} is a {trained.dataset} run; only Omniglot runs are "
                         "evaluated at other ways and shots.")
    if trained.learner == "maml" and ways != trained.ways:
        raise ValueError(f"MAML's network in {workdir} has {trained.ways} outputs; it cannot be "
                         f"evaluated {ways}-way.")
    config = dataclasses.replace(trained, ways=ways, shots=shots,
                                 train_ways=trained.train_ways or trained.ways)
    state = create_train_state(trained, jax.random.PRNGKey(trained.seed))
    with checkpoints.Checkpoints(workdir, trained.checkpoint_every) as ckpts:
        state, step = ckpts.restore_latest(state)
    if not step:
        raise ValueError(f"No checkpoint in {workdir}/checkpoints to evaluate.")
    results = evaluate.classification_results(
        make_adapter(config, make_learner(config)), state.meta_params, make_task_source(config),
        episodes, test_inner_steps(config))
    results["step"] = step
    metrics.write_json(os.path.join(workdir, f"results_{ways}way{shots}shot.json"), results)
    return results


def _train_loop(config: Config, mesh, learner: core.Learner | None, source: tasks.TaskSource,
                state: core.MetaState, start_step: int, ckpts: checkpoints.Checkpoints,
                writer: metrics.MetricWriter) -> tuple[core.MetaState, int]:
    """Meta-steps `start_step` to `num_steps` (or to the first checkpoint after `max_minutes`):
    log, evaluate on held-out tasks every `eval.every` meta-iterations, checkpoint. Returns the
    state and its step."""
    progress = metrics.Progress(config.num_steps, start_step, config.meta_batch_size, "tasks")
    train_step = jit_train_step(config, mesh, learner)
    quick_eval = evaluate.task_evaluator(make_adapter(config, learner))
    pending = metrics.PendingMetrics(last_checkpoint=start_step or None)
    start_time = time.monotonic()
    done = start_step
    for step in range(start_step, config.num_steps):
        tasks_of_step = source.local_train_batch(step, config.meta_batch_size)
        batch = parallel.shard_batch(mesh, tasks_of_step)
        state, step_metrics = train_step(state, batch)
        pending.add(step_metrics)
        done = step + 1
        is_log = metrics.due(done, config.log_every, config.num_steps)
        is_checkpoint = metrics.due(done, config.checkpoint_every, config.num_steps)
        is_eval = metrics.due(done, config.eval.every, config.num_steps)
        if is_log or is_checkpoint or is_eval:
            row = pending.fetch(done)[-1]
            if is_eval:
                summary = quick_eval(parallel.to_host(state.meta_params), source,
                                     config.eval.episodes_during_training)
                row = pending.check(done, {**row, **{f"test_{k}": v for k, v in summary.items()}})
            if is_log or is_eval:
                rates = progress.log(done, row)
                writer.write(done, {**row, **rates})
        if is_checkpoint:
            ckpts.save(done, state, force=True)
            pending.checkpointed(done)
            if checkpoints.out_of_time(start_time, config.max_minutes, done, config.num_steps,
                                       "meta-iteration"):
                break
        ckpts.stop_if_preempted(done, state)
    return state, done

"""Few-shot evaluation as the paper reports it.

* Omniglot: mean query accuracy over `EvalConfig.episodes` (600) episodes of held-out characters
  after `EvalConfig.inner_steps` inner steps (paper: 3 for 5-way, 5 for 20-way), with the 95%
  confidence interval 1.96 s / sqrt(n) of the episode accuracies.
* Sinusoid (Figure 2 of the paper): mean query MSE after 0..inner_steps inner steps for each K, for
  MAML and for the pretrained baseline -- the same network regressed on points of all tasks
  (Adam, `baseline_steps` steps), fine-tuned at test time with the same inner SGD.

`evaluate` writes `results.json` and pictures (sinusoid fits before/after adaptation, MSE vs inner
steps) to the workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from common import images, metrics
from common.config import check_positive
from maml import core, models, tasks


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Few-shot evaluation on held-out tasks (MAML's `Config.eval`: flags `--eval_<field>`).

    Attributes:
        inner_steps: Inner gradient steps at evaluation (the paper: omniglot 5-way 3, 20-way 5;
            sinusoid 10).
        shots: Sinusoid: the K values evaluated (none given: the training `shots`).
        episodes: Test episodes (sinusoid: test tasks) of the final evaluation.
        every: Meta-iterations between quick evaluations during meta-training (test metrics vs
            meta-iteration).
        episodes_during_training: Test episodes of a quick evaluation.
        baseline_steps: Sinusoid: Adam steps of the pretrained-on-all-tasks baseline.
    """
    inner_steps: int = 10
    shots: tuple[int, ...] = ()
    episodes: int = 600
    every: int = 1000
    episodes_during_training: int = 100
    baseline_steps: int = 10_000

    def validate(self) -> None:
        check_positive(self, ("inner_steps", "episodes", "every"))


EVAL_CHUNK = 50  # episodes adapted per jitted call; episode i is task i % 50 of test batch i // 50


def confidence_interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% normal confidence interval of the mean)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


@functools.lru_cache(maxsize=16)
def make_adapter(meta_config: core.MetaConfig, learner: core.Learner, num_steps: int) -> Callable:
    """jitted (meta_params, tasks) -> per-task metrics [tasks, num_steps + 1] after 0..num_steps."""
    def one(meta_params, task):
        per_step = core.adapt_and_evaluate(meta_params, task, learner, meta_config, num_steps)
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)
    return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def episode_metrics(adapter: Callable, meta_params: dict, sample: Callable[[int, int], dict],
                    num_episodes: int) -> dict[str, np.ndarray]:
    """Metrics [num_episodes, steps + 1] of the test episodes; `sample(chunk_index, size)`."""
    chunks = []
    for index in range(-(-num_episodes // EVAL_CHUNK)):
        chunks.append(jax.device_get(adapter(meta_params, sample(index, EVAL_CHUNK))))
    return {k: np.concatenate([c[k] for c in chunks])[:num_episodes] for k in chunks[0]}


def test_episodes(source: tasks.TaskSource) -> Callable[[int, int], dict]:
    """`sample(chunk_index, size)` of `source`'s held-out test episodes."""
    return lambda i, n: source.batch(i, n, tasks.TEST_STREAM)


def task_evaluator(adapter: Callable) -> Callable:
    """(params, source, num_episodes) -> mean test metrics of `adapter`'s last column (after
    its inner steps)."""
    def quick(params, source: tasks.TaskSource, num_episodes: int) -> dict:
        values = episode_metrics(adapter, params, test_episodes(source), num_episodes)
        return {k: float(v[:, -1].mean()) for k, v in values.items()}

    return quick


def make_task_evaluator(meta_config: core.MetaConfig, learner: core.Learner,
                        inner_steps: int) -> Callable:
    """(meta_params, source, num_episodes) -> mean test metrics after `inner_steps`."""
    return task_evaluator(make_adapter(meta_config, learner, inner_steps))


def classification_results(adapter: Callable, params, source: tasks.TaskSource,
                           num_episodes: int, inner_steps: int) -> dict[str, Any]:
    """The paper's Omniglot numbers for `adapter` (metrics [tasks, inner_steps + 1]) on
    `num_episodes` test episodes of `source`: the mean query accuracy after `inner_steps` with
    its 95% confidence interval, and the same after every step."""
    accuracy = episode_metrics(adapter, params, test_episodes(source), num_episodes)["accuracy"]
    return {"dataset": "omniglot", "ways": source.ways, "shots": source.shots,
            "episodes": int(accuracy.shape[0]), "test_inner_steps": inner_steps,
            "accuracy": confidence_interval(accuracy[:, -1]),
            "accuracy_vs_inner_steps": [confidence_interval(accuracy[:, s])
                                        for s in range(accuracy.shape[1])]}


def pretrain_baseline(key: jax.Array, seed: int, num_steps: int, num_tasks: int, shots: int,
                      lr: float) -> dict:
    """MLP parameters regressed on the pooled points of many sinusoids: batches of `num_tasks`
    tasks x `shots` points, Adam (`lr`), `num_steps` steps."""
    model = models.MLP()
    params = model.init(key, jnp.zeros((1, 1)))["params"]
    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: tasks.mse(model.apply({"params": p}, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    baseline_stream = 3
    for i in range(num_steps):
        batch, _ = tasks.sinusoid_tasks(seed, i, num_tasks, shots, 0, baseline_stream)
        params, opt_state, _ = step(params, opt_state, batch["support"]["x"].reshape(-1, 1),
                                    batch["support"]["y"].reshape(-1, 1))
    return params


def baseline_meta_params(baseline: dict, meta_config: core.MetaConfig
                         ) -> tuple[dict, core.MetaConfig]:
    """The pretrained baseline as meta-parameters fine-tuned with MAML's fixed inner SGD (one
    learning rate, `meta_config.lr`), and the config that adapts it so."""
    fixed = core.MetaConfig(steps=1, lr=meta_config.lr)
    return {"fast": baseline, "slow": {}, "inner_lr": jnp.float32(meta_config.lr)}, fixed


def sinusoid_curves(meta_config: core.MetaConfig, inner_steps: int, seed: int, meta_params: dict,
                    baseline: dict, num_tasks: int, shots_list) -> dict[str, Any]:
    """{'maml'|'pretrained': {K: (mean MSE, CI) per inner step 0..inner_steps}}."""
    learner = tasks.regression_learner(models.MLP())
    baseline_params, fixed = baseline_meta_params(baseline, meta_config)
    maml_adapter = make_adapter(meta_config, learner, inner_steps)
    baseline_adapter = (maml_adapter if meta_config.learn_lr == "none"  # one compilation
                        else make_adapter(fixed, learner, inner_steps))
    curves: dict[str, Any] = {"maml": {}, "pretrained": {}}
    for shots in shots_list:
        def sample(i, n, shots=shots):
            return tasks.sinusoid_tasks(seed, i, n, shots, 100, tasks.TEST_STREAM)[0]
        for name, adapter, params in (("maml", maml_adapter, meta_params),
                                      ("pretrained", baseline_adapter, baseline_params)):
            losses = episode_metrics(adapter, params, sample, num_tasks)["loss"]
            curves[name][str(shots)] = [confidence_interval(losses[:, s])
                                        for s in range(losses.shape[1])]
    return curves


def plot_sinusoid_fits(path: str, meta_config: core.MetaConfig, inner_steps: int, seed: int,
                       shots: int, meta_params: dict, baseline: dict) -> str:
    """Three held-out sinusoids: truth, the K = `shots` support points, and predictions of MAML and
    the pretrained baseline before adaptation and after 1 and `inner_steps` steps."""
    model = models.MLP()
    learner = tasks.regression_learner(model)
    batch, info = tasks.sinusoid_tasks(seed, 0, 3, shots, 0, tasks.TEST_STREAM)
    grid = np.linspace(-5, 5, 200, dtype=np.float32)[:, None]
    runs = (("MAML", meta_params, meta_config),
            ("pretrained", *baseline_meta_params(baseline, meta_config)))
    fig = Figure(figsize=(13, 7), dpi=90)
    axes = fig.subplots(2, 3, sharex=True)
    for row, (name, params, run_config) in enumerate(runs):
        for t in range(3):
            task = tasks.task_slice(batch, t)
            slow = params["slow"]
            path_params = core.adapt_path(
                params["fast"], task["support"], lambda f, b: learner.support_loss(f, slow, b),
                core.test_time_lr(run_config, params["inner_lr"]), inner_steps)
            ax = axes[row, t]
            ax.plot(grid, info["amplitude"][t] * np.sin(grid - info["phase"][t]), "k-",
                    label="truth")
            ax.plot(task["support"]["x"], task["support"]["y"], "k^", label=f"K={shots}")
            for steps, style in ((0, ":"), (1, "--"), (inner_steps, "-")):
                predict = model.apply({"params": models.merge_params(path_params[steps], slow)},
                                      grid)
                ax.plot(grid, predict, style, label=f"{name}, {steps} steps")
            ax.legend(fontsize=7)
            ax.set_title(f"{name}: A={info['amplitude'][t]:.2f}, b={info['phase'][t]:.2f}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path


def evaluate(config: EvalConfig, meta_config: core.MetaConfig, meta_params: dict,
             source: tasks.TaskSource, learner: core.Learner, workdir: str | None = None, *,
             baseline_lr: float, baseline_tasks: int) -> dict[str, Any]:
    """The paper's evaluation of `meta_params` on `source`'s held-out tasks; writes results.json
    and pictures to `workdir`.

    `meta_config` and `learner`: the ones meta-training used (the compiled adapter of the quick
    evaluations is reused). Sinusoid: the pretrained baseline trains with Adam at `baseline_lr` on
    batches of `baseline_tasks` tasks (meta-training's meta_lr and meta-batch size)."""
    if source.dataset == "sinusoid":
        baseline = pretrain_baseline(jax.random.PRNGKey(source.seed + 1), source.seed,
                                     config.baseline_steps, baseline_tasks, source.shots,
                                     baseline_lr)
        shots_list = config.shots or (source.shots,)
        results = {"dataset": "sinusoid", "tasks": config.episodes,
                   "mse_vs_inner_steps": sinusoid_curves(meta_config, config.inner_steps,
                                                         source.seed, meta_params, baseline,
                                                         config.episodes, shots_list)}
        if workdir:
            plot_sinusoid_fits(os.path.join(workdir, "sinusoid_fits.png"), meta_config,
                               config.inner_steps, source.seed, source.shots, meta_params,
                               baseline)
            images.save_curves(
                os.path.join(workdir, "mse_vs_inner_steps.png"),
                {f"{name} K={k}": (list(range(len(c))), [m for m, _ in c])
                 for name, per_k in results["mse_vs_inner_steps"].items()
                 for k, c in per_k.items()},
                xlabel="inner gradient steps", ylabel="query MSE", logy=True,
                title="Sinusoid: MAML vs pretrained baseline")
    else:
        results = classification_results(make_adapter(meta_config, learner, config.inner_steps),
                                          meta_params, source, config.episodes,
                                          config.inner_steps)
    if workdir:
        write_results(workdir, results)
    return results


def write_results(workdir: str, results: dict) -> None:
    metrics.write_json(os.path.join(workdir, "results.json"), results)


def summary_line(results: dict) -> str:
    if results["dataset"] == "omniglot":
        mean, ci = results["accuracy"]
        return (f"{results['ways']}-way {results['shots']}-shot accuracy {100 * mean:.2f} +- "
                f"{100 * ci:.2f}% over {results['episodes']} episodes")
    parts = []
    for name, per_k in results["mse_vs_inner_steps"].items():
        for k, curve in per_k.items():
            parts.append(f"{name} K={k}: MSE {curve[1][0]:.3f} after 1 step, "
                         f"{curve[-1][0]:.3f} after {len(curve) - 1}")
    return "; ".join(parts)

"""Few-shot evaluation as the paper reports it.

* Omniglot: mean query accuracy over `eval_episodes` (600) episodes of held-out characters after
  `test_inner_steps` inner steps (paper: 3 for 5-way, 5 for 20-way), with the 95% confidence
  interval 1.96 s / sqrt(n) of the episode accuracies.
* Sinusoid (Figure 2 of the paper): mean query MSE after 0..test_inner_steps inner steps for each K,
  for MAML and for the pretrained baseline -- the same network regressed on points of all tasks
  (Adam, `baseline_steps` steps), fine-tuned at test time with the same inner SGD.

`evaluate` writes `results.json` and pictures (sinusoid fits before/after adaptation, MSE vs inner
steps) to the workdir.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import images
from maml import core, models, tasks

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


def make_task_evaluator(config, learner: core.Learner) -> Callable:
    """(meta_params, source, num_episodes) -> mean test metrics after `test_inner_steps`."""
    adapter = make_adapter(config.meta_config(), learner, config.test_inner_steps)

    def quick(meta_params, source, num_episodes):
        values = episode_metrics(
            adapter, meta_params,
            lambda i, n: source.batch(i, n, tasks.TEST_STREAM), num_episodes)
        return {k: float(v[:, -1].mean()) for k, v in values.items()}

    return quick


def pretrain_baseline(config, key: jax.Array) -> dict:
    """MLP parameters regressed on the pooled points of many sinusoids: batches of
    `batch_size` tasks x `shots` points, Adam (`meta_lr`), `baseline_steps` steps."""
    model = models.MLP()
    params = model.init(key, jnp.zeros((1, 1)))["params"]
    optimizer = optax.adam(config.meta_lr)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(
            lambda p: tasks.mse(model.apply({"params": p}, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    baseline_stream = 3
    for i in range(config.baseline_steps):
        batch, _ = tasks.sinusoid_tasks(config.seed, i, config.batch_size, config.shots, 0,
                                        baseline_stream)
        params, opt_state, _ = step(params, opt_state, batch["support"]["x"].reshape(-1, 1),
                                    batch["support"]["y"].reshape(-1, 1))
    return params


def sinusoid_curves(config, meta_params: dict, baseline: dict, num_tasks: int,
                    shots_list) -> dict[str, Any]:
    """{'maml'|'pretrained': {K: (mean MSE, CI) per inner step 0..test_inner_steps}}."""
    learner = tasks.regression_learner(models.MLP())
    fixed = core.MetaConfig(inner_steps=1, inner_lr=config.inner_lr)
    baseline_params = {"fast": baseline, "slow": {}, "inner_lr": jnp.float32(config.inner_lr)}
    maml_adapter = make_adapter(config.meta_config(), learner, config.test_inner_steps)
    baseline_adapter = (maml_adapter if config.learn_inner_lr == "none"  # one compilation
                        else make_adapter(fixed, learner, config.test_inner_steps))
    curves: dict[str, Any] = {"maml": {}, "pretrained": {}}
    for shots in shots_list:
        def sample(i, n, shots=shots):
            return tasks.sinusoid_tasks(config.seed, i, n, shots, 100, tasks.TEST_STREAM)[0]
        for name, adapter, params in (("maml", maml_adapter, meta_params),
                                      ("pretrained", baseline_adapter, baseline_params)):
            losses = episode_metrics(adapter, params, sample, num_tasks)["loss"]
            curves[name][str(shots)] = [confidence_interval(losses[:, s])
                                        for s in range(losses.shape[1])]
    return curves


def plot_sinusoid_fits(path: str, config, meta_params: dict, baseline: dict) -> str:
    """Three held-out sinusoids: truth, the K support points, and predictions of MAML and the
    pretrained baseline before adaptation and after 1 and `test_inner_steps` steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = models.MLP()
    learner = tasks.regression_learner(model)
    batch, info = tasks.sinusoid_tasks(config.seed, 0, 3, config.shots, 0, tasks.TEST_STREAM)
    grid = np.linspace(-5, 5, 200, dtype=np.float32)[:, None]
    fixed = core.MetaConfig(inner_steps=1, inner_lr=config.inner_lr)
    runs = (("MAML", meta_params, config.meta_config()),
            ("pretrained", {"fast": baseline, "slow": {}, "inner_lr": jnp.float32(config.inner_lr)}, fixed))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=90, sharex=True)
    for row, (name, params, meta_config) in enumerate(runs):
        for t in range(3):
            task = tasks.task_slice(batch, t)
            slow = params["slow"]
            path_params = core.adapt_path(
                params["fast"], task["support"], lambda f, b: learner.support_loss(f, slow, b),
                core.test_time_lr(meta_config, params["inner_lr"]), config.test_inner_steps)
            ax = axes[row, t]
            ax.plot(grid, info["amplitude"][t] * np.sin(grid - info["phase"][t]), "k-",
                    label="truth")
            ax.plot(task["support"]["x"], task["support"]["y"], "k^", label=f"K={config.shots}")
            for steps, style in ((0, ":"), (1, "--"), (config.test_inner_steps, "-")):
                predict = model.apply({"params": models.merge_params(path_params[steps], slow)},
                                      grid)
                ax.plot(grid, predict, style, label=f"{name}, {steps} steps")
            ax.legend(fontsize=7)
            ax.set_title(f"{name}: A={info['amplitude'][t]:.2f}, b={info['phase'][t]:.2f}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(config, meta_params: dict, source, workdir: str | None = None,
             learner: core.Learner | None = None) -> dict[str, Any]:
    """The paper's evaluation of `meta_params`; writes results.json and pictures to `workdir`.

    `learner`: the one meta-training used (its compiled adapter is reused); built if None."""
    if config.dataset == "sinusoid":
        baseline = pretrain_baseline(config, jax.random.PRNGKey(config.seed + 1))
        shots_list = config.test_shots or (config.shots,)
        results = {"dataset": "sinusoid", "tasks": config.eval_episodes,
                   "mse_vs_inner_steps": sinusoid_curves(config, meta_params, baseline,
                                                         config.eval_episodes, shots_list)}
        if workdir:
            plot_sinusoid_fits(os.path.join(workdir, "sinusoid_fits.png"), config, meta_params,
                               baseline)
            images.save_curves(
                os.path.join(workdir, "mse_vs_inner_steps.png"),
                {f"{name} K={k}": (list(range(len(c))), [m for m, _ in c])
                 for name, per_k in results["mse_vs_inner_steps"].items()
                 for k, c in per_k.items()},
                xlabel="inner gradient steps", ylabel="query MSE", logy=True,
                title="Sinusoid: MAML vs pretrained baseline")
    else:
        if learner is None:
            from maml import train
            learner = train.make_learner(config)
        adapter = make_adapter(config.meta_config(), learner, config.test_inner_steps)
        values = episode_metrics(adapter, meta_params,
                                 lambda i, n: source.batch(i, n, tasks.TEST_STREAM),
                                 config.eval_episodes)
        accuracy = values["accuracy"]
        results = {"dataset": "omniglot", "ways": config.ways, "shots": config.shots,
                   "episodes": int(accuracy.shape[0]), "test_inner_steps": config.test_inner_steps,
                   "accuracy": confidence_interval(accuracy[:, -1]),
                   "accuracy_vs_inner_steps": [confidence_interval(accuracy[:, s])
                                               for s in range(accuracy.shape[1])]}
    if workdir:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


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

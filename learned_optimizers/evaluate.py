"""Evaluation of a learned optimizer against tuned baselines on held-out tasks.

`compare_with_baselines`: for every optimizer (the LSTM and the baselines of `baselines.py`, each
baseline's learning rate tuned on validation tasks) the loss f(θ_t) is recorded along
t = 0 .. max(horizons) on test tasks: fresh quadratics, or fresh initialisations of the MLP trained
on the held-out split. Reported per horizon h: the mean, median and log10-mean (mean of log10 f)
of f(θ_h) over test tasks; the ratio of the LSTM's mean to Adam's, and each optimizer's rank by
mean (1 = lowest). `write_results` writes them to `eval.json`, `plot` the learning curves (mean
over tasks, log scale). The validation and test tasks are drawn with `eval_keys`, the same for
every meta-training seed.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax

from common import images, metrics
from learned_optimizers import baselines, tasks

EVAL_FILE = "eval.json"


def eval_keys(eval_seed: int, num_validation: int, num_test: int) -> tuple[jax.Array, jax.Array]:
    """Keys of the validation tasks (model and learning-rate selection) and of the test tasks."""
    validation_key, test_key = jax.random.split(jax.random.PRNGKey(10_000 + eval_seed))
    return (jax.random.split(validation_key, num_validation),
            jax.random.split(test_key, num_test))


def loss_curves(tx: optax.GradientTransformation, family: tasks.TaskFamily, keys: jax.Array,
                num_steps: int, data=None) -> np.ndarray:
    """f(θ_t), t = 0 .. num_steps, of every task drawn with `keys`: shape [tasks, num_steps + 1]."""
    data = family.data if data is None else data
    run = jax.jit(jax.vmap(lambda key, data: tasks.learning_curve(tx, family, key, num_steps, data),
                           in_axes=(0, None)))
    return np.asarray(run(keys, data))


def summarize(curves: np.ndarray, horizons: Sequence[int]) -> dict[str, dict[str, float]]:
    """{horizon: mean, median, log10_mean of f(θ_horizon) over tasks} (as JSON-ready floats)."""
    out = {}
    for h in horizons:
        final = curves[:, h].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            log10 = np.log10(final)
        out[str(h)] = {"mean": float(np.mean(final)), "median": float(np.median(final)),
                       "log10_mean": float(np.mean(log10))}
    return out


def compare(stats: Mapping[str, Mapping[str, Mapping[str, float]]],
            horizons: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Per horizon: the LSTM's mean over Adam's, and every optimizer's rank by mean loss."""
    out = {}
    for h in map(str, horizons):
        means = {name: s[h]["mean"] for name, s in stats.items()}
        order = sorted(means, key=lambda n: means[n] if np.isfinite(means[n]) else np.inf)
        out[h] = {"ratio_lstm_to_adam": means["lstm"] / means["adam"],
                  "rank": {name: order.index(name) + 1 for name in means}}
    return out


def evaluate_family(optimizers: Mapping[str, optax.GradientTransformation],
                    family: tasks.TaskFamily, keys: jax.Array, horizons: Sequence[int]):
    """(curves {name: [tasks, T + 1]}, stats {name: summarize(...)}) of every optimizer."""
    curves = {name: loss_curves(tx, family, keys, max(horizons)) for name, tx in optimizers.items()}
    return curves, {name: summarize(c, horizons) for name, c in curves.items()}


def plot(path: str, curves: Mapping[str, np.ndarray], title: str) -> str:
    xs = np.arange(next(iter(curves.values())).shape[1])
    return images.save_curves(path, {n: (xs, np.mean(c, axis=0)) for n, c in curves.items()},
                              xlabel="step", ylabel="mean loss over test tasks", title=title,
                              logy=True)


def compare_with_baselines(learned: optax.GradientTransformation,
                           validation_family: tasks.TaskFamily, test_family: tasks.TaskFamily,
                           validation_keys: jax.Array, test_keys: jax.Array, tuning_horizon: int,
                           horizons: Sequence[int]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tunes the baselines' learning rates for `tuning_horizon` steps on the validation tasks, then
    runs them and the `learned` optimizer on the test tasks: (curves, results). The results hold
    each optimizer's mean test loss at every step 0..max(horizons) (`mean_curves`)."""
    learning_rates = baselines.tune(validation_family, validation_keys, tuning_horizon)
    optimizers = {"lstm": learned,
                  **{n: baselines.with_learning_rate(n, lr) for n, lr in learning_rates.items()}}
    horizons = sorted(set(horizons))
    curves, stats = evaluate_family(optimizers, test_family, test_keys, horizons)
    mean_curves = {name: np.mean(c, axis=0).tolist() for name, c in curves.items()}
    return curves, {"learning_rates": learning_rates, "stats": stats,
                    "comparison": compare(stats, horizons), "num_test_tasks": int(len(test_keys)),
                    "mean_curves": mean_curves}


def write_results(workdir: str, results: Mapping[str, Any]) -> str:
    """Writes `results` to `<workdir>/eval.json` (process 0 only); returns the path."""
    path = os.path.join(workdir, EVAL_FILE)
    if jax.process_index() == 0:  # a diverged optimizer's loss is a result: null
        metrics.write_json(path, results, non_finite="null")
    return path

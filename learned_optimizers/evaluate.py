"""Evaluation of a learned optimizer against tuned baselines on held-out tasks.

For every optimizer (the LSTM and the baselines of `baselines.py`, each baseline's learning rate
tuned on validation tasks) the loss f(θ_t) is recorded along t = 0 .. max(horizons) on test tasks:
fresh quadratics, or fresh initialisations of the MLP trained on the held-out split. Reported per
horizon h: the mean, median and log10-mean (mean of log10 f) of f(θ_h) over test tasks; the ratio
of the LSTM's mean to Adam's, and each optimizer's rank by mean (1 = lowest). Results go to
`eval.json`, learning curves (mean over tasks, log scale) to `learning_curves[_<family>].png`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax

from common import images
from learned_optimizers import baselines, meta_train, tasks

EVAL_FILE = "eval.json"


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


def evaluate_target(config: meta_train.Config, meta_params, family_name: str,
                    workdir: str | None = None) -> dict[str, Any]:
    """Tunes the baselines on validation tasks of `family_name`, evaluates all on test tasks."""
    validation_keys, test_keys = meta_train.eval_keys(config.eval_seed, config.num_validation_tasks,
                                                      config.num_test_tasks)
    validation_family = meta_train.make_family(config, "train", family_name)
    test_family = meta_train.make_family(config, "test", family_name)
    learning_rates = baselines.tune(validation_family, validation_keys, config.horizon)
    optimizers = {"lstm": meta_train.make_optimizer(config, meta_params),
                  **{n: baselines.with_learning_rate(n, lr) for n, lr in learning_rates.items()}}
    horizons = sorted(set(config.eval_horizons))
    curves, stats = evaluate_family(optimizers, test_family, test_keys, horizons)
    if workdir is not None:
        suffix = "" if family_name == config.task else f"_{family_name}"
        plot(os.path.join(workdir, f"learning_curves{suffix}.png"), curves,
             f"{family_name}: {len(test_keys)} test tasks (LSTM meta-trained on {config.task})")
    return {"learning_rates": learning_rates, "stats": stats,
            "comparison": compare(stats, horizons), "num_test_tasks": int(len(test_keys))}


def evaluate_run(config: meta_train.Config, meta_params, workdir: str) -> dict[str, Any]:
    """Evaluates φ on the config's family and transfer targets; writes `eval.json`."""
    results = {"task": config.task,
               "families": {name: evaluate_target(config, meta_params, name, workdir)
                            for name in (config.task, *config.transfer_tasks)}}
    if jax.process_index() == 0:
        path = os.path.join(workdir, EVAL_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
    return results


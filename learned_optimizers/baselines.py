"""Hand-designed baselines with tuned learning rates: SGD, Nesterov momentum, RMSprop, Adam.

Each optimizer's learning rate is chosen from the log grid 10^-4 .. 10^1 in quarter decades by the
mean loss f(θ_T) over validation tasks (a non-finite loss on any task rules a rate out); a choice
at either end of the grid is logged as a warning (the grid may be too narrow for that task). The
whole grid × tasks is one compiled call: `optax.inject_hyperparams` makes the learning rate an
input of the transformation, so it can be `vmap`ped like any other array.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from absl import logging

from learned_optimizers import tasks

LEARNING_RATES = 10.0 ** np.arange(-4.0, 1.01, 0.25)  # 21 rates


def nesterov(learning_rate, momentum: float = 0.9) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


BASELINES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "nag": nesterov,
    "rmsprop": optax.rmsprop,
    "adam": optax.adam,
}


def with_learning_rate(name: str, learning_rate) -> optax.GradientTransformation:
    """Baseline `name` with its learning rate an (possibly traced) array hyperparameter."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; choose one of {tuple(BASELINES)}.")
    return optax.inject_hyperparams(BASELINES[name])(learning_rate=learning_rate)


def grid_losses(name: str, family: tasks.TaskFamily, keys: jax.Array, num_steps: int,
                learning_rates=LEARNING_RATES, data=None) -> np.ndarray:
    """f(θ_T) of baseline `name` for every (learning rate, task): shape [rates, tasks]."""
    data = family.data if data is None else data

    @jax.jit
    def run(rates, keys, data):
        def final(rate, key):
            return tasks.learning_curve(with_learning_rate(name, rate), family, key, num_steps,
                                        data)[-1]
        return jax.vmap(lambda rate: jax.vmap(lambda key: final(rate, key))(keys))(rates)

    return np.asarray(run(jnp.asarray(learning_rates, jnp.float32), keys, data))


def best_learning_rate(losses: np.ndarray, learning_rates=LEARNING_RATES) -> float:
    """The rate of least mean loss over tasks; rates with any non-finite loss are excluded."""
    finite = np.all(np.isfinite(losses), axis=1)
    if not finite.any():
        raise FloatingPointError("Every learning rate of the grid diverged on some task.")
    mean = np.where(finite, np.mean(np.where(np.isfinite(losses), losses, 0.0), axis=1), np.inf)
    best = int(np.argmin(mean))
    if best in (0, len(mean) - 1):
        logging.warning("The best learning rate %g is at the end of the grid %g .. %g; the "
                        "optimum may lie outside it.", learning_rates[best], learning_rates[0],
                        learning_rates[-1])
    return float(np.asarray(learning_rates)[best])


def tune(family: tasks.TaskFamily, keys: jax.Array, num_steps: int, names=tuple(BASELINES),
         learning_rates=LEARNING_RATES, data=None) -> dict[str, float]:
    """{baseline: its best learning rate on the validation tasks drawn with `keys`}."""
    return {name: best_learning_rate(grid_losses(name, family, keys, num_steps, learning_rates,
                                                 data), learning_rates)
            for name in names}

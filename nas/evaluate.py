"""The evaluation of a finished search: the best architecture found, retrained and scored once on
the test set when the objective trains children (`final_test`), the best reward so far against the
evaluations (`best_reward.png`), and the summary in `<workdir>/result.json`."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from absl import logging

from common import images, parallel
from nas.child import ChildObjective, ChildTrainer, Layers
from nas.history import Record, best_record, best_so_far, count_evaluations
from nas.search_space import Architecture, SearchSpace, cnn_layers

FinalTest = Callable[[Architecture, int], dict[str, Any]]


def retrain_and_test(trainer: ChildTrainer, layers: Layers, num_steps: int) -> dict[str, Any]:
    """Trains `layers` from scratch for `num_steps`; its validation and test accuracy."""
    if trainer.data.test is None:
        raise ValueError("No test split loaded.")
    params, info = trainer.train(layers, num_steps)
    return {"layers": [list(layer) for layer in layers], "num_steps": num_steps, **info,
            "validation_accuracy": trainer.accuracy(layers, params, trainer.data.validation),
            "test_accuracy": trainer.accuracy(layers, params, trainer.data.test),
            "total_compile_s": trainer.compile_s, "total_train_s": trainer.train_s}


def final_test(objective: ChildObjective, architecture: Architecture,
               num_steps: int) -> dict[str, Any]:
    """Retrains an architecture of the objective's CNN space for `num_steps`; its validation and
    test accuracy (a `FinalTest` once `objective` is bound)."""
    return retrain_and_test(objective.trainer, cnn_layers(objective.space, architecture),
                            num_steps)


def save_best_curve(workdir: str, algorithm: str, history: Sequence[Record]) -> str:
    """best_reward.png: the best reward so far against the evaluations spent."""
    xs = [r.evaluations for r in history]
    return images.save_curves(os.path.join(workdir, "best_reward.png"),
                              {algorithm: (xs, best_so_far(history))},
                              xlabel="evaluations", ylabel="best reward so far",
                              title=f"{algorithm}: best reward vs evaluations")


def summarize(algorithm: str, space: SearchSpace, history: Sequence[Record]) -> dict[str, Any]:
    """The counts of a search -- `evaluations` (objective calls, the budget spent, = distinct
    architectures) and `proposals` (repeats included) -- and its best record."""
    return {"algorithm": algorithm, "evaluations": count_evaluations(history),
            "proposals": len(history), "best": json.loads(best_record(history).to_json(space))}


def evaluate(workdir: str, algorithm: str, space: SearchSpace, history: Sequence[Record],
             final_test: FinalTest | None = None, final_num_steps: int = 0,
             identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a search (`summarize`, the search's `identity`: space and objective), and
    with `final_test` its result for the best architecture trained `final_num_steps` (every
    process calls it). Process 0 also writes `result.json` and `best_reward.png`."""
    best = best_record(history)
    summary = {**summarize(algorithm, space, history), "search": identity,
               "evaluation_cost_s": sum(r.cost_s for r in history)}
    if final_test is not None:
        summary["final"] = final_test(best.architecture, final_num_steps)
    if parallel.is_main_process():
        save_best_curve(workdir, algorithm, history)
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        logging.info("Best of %d evaluations: %s reward %.4f %s", count_evaluations(history),
                     space.decode(best.architecture), best.reward, best.info)
    return summary

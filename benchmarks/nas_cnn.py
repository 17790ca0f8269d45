"""A real architecture search on Fashion-MNIST: child CNNs trained for real, REINFORCE vs random
search at an equal number of child trainings over several seeds, and each search's best
architecture retrained and scored once on the test set, beside a hand-designed CNN.

Protocol: the settings of `launch/configs/nas_cnn_fashion_mnist.flags` (what a user of the
launcher gets): Zoph & Le's CNN space of `--num_layers` layers (filter height/width in {1,3,5,7},
filters in {8,12,16,24} -- a narrower version of the paper's {24,36,48,64} that fits a 2-core CPU --
stride in {1,2}); each child trains `--num_steps` Adam steps (batch 32) on the Fashion-MNIST
training images minus 5,000 validation images carved from them, and its reward is its validation
accuracy. Every search gets `--budget` child trainings (repeated proposals are free); the
controller, evolution and budget rule are the `nas.train.Config` defaults. The children's
initialisation and minibatch order are those of seed 0 in every search, so the objective is one
fixed function of the architecture and the search seeds (`--seeds`) vary only the search. The best
child of each search (by validation accuracy) and the hand-designed CNN are retrained for
`--final_num_steps` steps and scored once on the 10,000 test images.

    python -m benchmarks.nas_cnn [--seeds 0,1,2 --budget 30 --algorithms reinforce,random]

Workdirs (history.jsonl, best_reward.png, result.json) go to --workdir/<algorithm>_seed<s>: a
rerun of the same command continues; the table goes to benchmarks/results/nas_cnn.json and the
curves to nas_cnn.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np
from matplotlib.figure import Figure

from benchmarks import machine
from benchmarks.stats import mean_sd, welch_greater
from common import config as config_lib
from launch import flags as launch_flags
from launch import nas as launch_nas
from nas import evaluate, train
from nas import history as history_lib

BASELINE = ((3, 3, 8, 1), (3, 3, 16, 2), (3, 3, 24, 2))  # plain 3x3 stack: widening, 2 downsamples
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
FLAG_FILE = os.path.join(REPO, "launch", "configs", "nas_cnn_fashion_mnist.flags")


def base_config(budget: int | None = None, num_steps: int | None = None,
                final_num_steps: int | None = None, data_dir: str | None = None) -> train.Config:
    """The flag file's config (seed 0), with the given settings replaced."""
    launch_flags.parse_flagfile(FLAG_FILE)
    config = launch_nas.make_config()
    child = dataclasses.replace(config.child, num_steps=num_steps or config.child.num_steps)
    return dataclasses.replace(config, budget=budget or config.budget, child=child,
                               final_num_steps=final_num_steps or config.final_num_steps,
                               data_dir=data_dir, seed=0)


def run_search(config: train.Config, problem, workdir: str) -> dict:
    space, objective, final_test = problem
    start = time.perf_counter()
    summary = train.train_and_evaluate(config, workdir, space=space, objective=objective,
                                       final_test=final_test)
    history = history_lib.read_history(workdir)
    trained = [r for r in history if not r.cached]  # one per child training; repeats are free
    return {"best_validation_so_far": history_lib.best_so_far(trained).tolist(),
            "validation_accuracies": [r.reward for r in trained],
            "best_layers": summary["final"]["layers"],
            "best_validation_accuracy": summary["best"]["reward"],
            "test_accuracy": summary["final"]["test_accuracy"],
            "retrained_validation_accuracy": summary["final"]["validation_accuracy"],
            "params": summary["final"]["params"],
            "child_trainings": summary["evaluations"], "proposals": summary["proposals"],
            "children_compile_s": sum(r.info.get("compile_s", 0.0) for r in trained),
            "children_train_s": sum(r.info.get("train_s", 0.0) for r in trained),
            "wall_s_this_invocation": time.perf_counter() - start}


def over_seeds(values) -> dict:
    return {**mean_sd(values), "per_seed": [float(v) for v in values]}


def save_figure(path: str, runs: dict, budget: int) -> None:
    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    xs = np.arange(1, budget + 1)
    for algorithm, per_seed in runs.items():
        curves = np.array([r["best_validation_so_far"][:budget] for r in per_seed.values()])
        line, = ax.plot(xs, curves.mean(0), label=f"{algorithm} (mean of {len(curves)} seeds)")
        ax.fill_between(xs, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("child trainings")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title("Fashion-MNIST CNN search: mean and min-max over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="reinforce,random")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budget", type=int, default=None, help="default: the flag file's")
    parser.add_argument("--num_steps", type=int, default=None, help="child training steps")
    parser.add_argument("--final_num_steps", type=int, default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--workdir", default="runs/nas_cnn_benchmark")
    args = parser.parse_args()
    start = time.perf_counter()
    base = base_config(args.budget, args.num_steps, args.final_num_steps, args.data_dir)
    budget = base.budget
    problem = train.make_problem(base)  # one trainer for every search: compiled shapes shared
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {}
    for algorithm in args.algorithms.split(","):
        runs[algorithm] = {}
        for seed in seeds:
            config = dataclasses.replace(base, algorithm=algorithm, seed=seed)
            r = run_search(config, problem, os.path.join(args.workdir, f"{algorithm}_seed{seed}"))
            runs[algorithm][str(seed)] = r
            print(f"{algorithm} seed {seed}: best validation {r['best_validation_accuracy']:.4f} "
                  f"{r['best_layers']} -> test {r['test_accuracy']:.4f} "
                  f"({r['child_trainings']} trainings, {r['proposals']} proposals)", flush=True)
    baseline = evaluate.retrain_and_test(problem[1].trainer, BASELINE, base.final_num_steps)

    marks = [n for n in (5, 10, 20, 30, 50, 100) if n <= budget]
    summary = {algorithm: {
        **{f"best_validation_at_{n}": over_seeds([r["best_validation_so_far"][n - 1]
                                               for r in per_seed.values()]) for n in marks},
        **{f"mean_validation_of_children_{n - 9}_{n}": over_seeds(
            [np.mean(r["validation_accuracies"][n - 10:n]) for r in per_seed.values()])
           for n in range(10, budget + 1, 10)},
        "test_accuracy_of_best": over_seeds([r["test_accuracy"] for r in per_seed.values()]),
        "params_of_best": over_seeds([r["params"] for r in per_seed.values()])}
        for algorithm, per_seed in runs.items()}
    p_values = {}
    if {"reinforce", "random"} <= set(runs):
        p_values = {key: welch_greater(summary["reinforce"][key]["per_seed"],
                                       summary["random"][key]["per_seed"])
                    for key in [f"best_validation_at_{n}" for n in marks]
                    + ["test_accuracy_of_best"]}

    print(f"\nFashion-MNIST CNN search: {budget} child trainings of {base.child.num_steps} steps, "
          f"seeds {args.seeds}; best retrained {base.final_num_steps} steps (mean +- sd)")
    print(f"{'':18s}" + "".join(f"{f'best val @{n}':>18s}" for n in marks)
          + f"{'test of best':>18s}")
    for algorithm, s in summary.items():
        print(f"{algorithm:18s}" + "".join(
            f"{s[k]['mean']:>11.4f} +-{s[k]['sd']:.3f}"
            for k in [f"best_validation_at_{n}" for n in marks] + ["test_accuracy_of_best"]))
    print(f"{'hand-designed CNN':18s}" + " " * 18 * len(marks)
          + f"{baseline['test_accuracy']:>11.4f} ({baseline['params']} params)")
    print("p, REINFORCE > random (one-sided Welch):", p_values)

    os.makedirs(RESULTS, exist_ok=True)
    save_figure(os.path.join(RESULTS, "nas_cnn.png"), runs, budget)
    out = {"benchmark": "nas_cnn", "protocol": __doc__.split("\n\n")[1], "args": vars(args),
           "config": config_lib.to_dict(base), "machine": machine.machine_record(),
           "versions": {"jax": jax.__version__, "numpy": np.__version__},
           "summary": summary, "p_values_reinforce_greater_random_one_sided_welch": p_values,
           "runs": runs, "baseline": baseline,
           "total_compile_s": problem[1].trainer.compile_s,
           "total_train_s": problem[1].trainer.train_s,
           "wall_s_this_invocation": time.perf_counter() - start}
    with open(os.path.join(RESULTS, "nas_cnn.json"), "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", os.path.join(RESULTS, "nas_cnn.json"))


if __name__ == "__main__":
    main()

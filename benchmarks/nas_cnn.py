"""A real architecture search on Fashion-MNIST: child CNNs trained for real, REINFORCE vs random
search at an equal number of children, and the best architecture retrained against a
hand-designed CNN of similar size.

Protocol: Zoph & Le's CNN space (`--num_layers` layers of filter height/width in {1,3,5,7},
filters in `--num_filters` -- {8,12,16,24} by default, a narrower version of the paper's
{24,36,48,64} that fits a shared 2-core CPU -- stride in {1,2}); each child trains `--num_steps`
Adam steps (batch 64)
on 55,000 training images and is scored on 5,000 validation images carved from the training set.
The best child of each search (by validation accuracy) and the baseline CNN are then retrained
for `--final_num_steps` steps and scored once on the 10,000 test images.

    python -m benchmarks.nas_cnn [--budget 20 --num_layers 3 --num_steps 100 --final_num_steps 1000]

Workdirs (history.jsonl, best_reward.png, result.json) go to --workdir (resumable); the table to
benchmarks/results/nas_cnn.json and nas_cnn.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import numpy as np

from common import images
from nas import evaluate, train
from nas import history as history_lib
from nas.child import ChildConfig
from nas.controller import ControllerConfig

BASELINE = ((3, 3, 8, 1), (3, 3, 16, 2), (3, 3, 24, 2))  # plain 3x3 stack: widening, 2 downsamples
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="reinforce,random")
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--num_layers", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--validation_size", type=int, default=5000)
    parser.add_argument("--num_filters", default="8,12,16,24",
                        help="filter-count choices (the paper's 24,36,48,64 is ~6x the compute)")
    parser.add_argument("--num_steps", type=int, default=100)
    parser.add_argument("--final_num_steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=ControllerConfig.learning_rate,
                        help="controller learning rate (default: the Config default)")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--workdir", default="/tmp/nas_cnn_benchmark")
    args = parser.parse_args()

    start = time.perf_counter()
    child = ChildConfig(dataset="fashion_mnist", num_steps=args.num_steps,
                        batch_size=args.batch_size, validation_size=args.validation_size)
    base = train.Config(space="cnn", data_dir=args.data_dir, budget=args.budget,
                        num_layers=args.num_layers, child=child,
                        num_filters=tuple(int(n) for n in args.num_filters.split(",")),
                        final_num_steps=args.final_num_steps, seed=args.seed,
                        controller=ControllerConfig(learning_rate=args.learning_rate),
                        architectures_per_step=min(5, args.budget // 2),
                        checkpoint_every=1, log_every=5)
    # One trainer for every search: compiled shapes are shared.
    space, objective, final_test = train.make_problem(base)
    runs = {}
    for algorithm in args.algorithms.split(","):
        config = dataclasses.replace(base, algorithm=algorithm)
        t0 = time.perf_counter()
        summary = train.train_and_evaluate(config, os.path.join(args.workdir, algorithm),
                                           space=space, objective=objective,
                                           final_test=final_test)
        history = history_lib.read_history(os.path.join(args.workdir, algorithm))
        runs[algorithm] = {
            "best_validation_so_far": history_lib.best_so_far(history).tolist(),
            "best_architecture": summary["best"]["values"],
            "best_layers": summary["final"]["layers"],
            "best_validation_accuracy": summary["best"]["reward"],
            "final": summary["final"],
            "distinct_children": summary["distinct_architectures"],
            "children_compile_s": sum(r.info.get("compile_s", 0.0) for r in history),
            "children_train_s": sum(r.info.get("train_s", 0.0) for r in history),
            "wall_s": time.perf_counter() - t0}
    baseline = evaluate.retrain_and_test(objective.trainer, BASELINE, args.final_num_steps)

    print(f"\nFashion-MNIST CNN search: {args.budget} children of {args.num_steps} steps each, "
          f"{args.num_layers} layers; retrained {args.final_num_steps} steps")
    checkpoints = [n for n in (5, 10, 20, 50, 100) if n <= args.budget]
    print(f"{'':22s}" + "".join(f"{f'best val @{n}':>14s}" for n in checkpoints)
          + f"{'test (retrained)':>18s}{'params':>9s}{'compile s':>11s}{'train s':>9s}")
    for algorithm, r in runs.items():
        curve = r["best_validation_so_far"]
        print(f"{algorithm:22s}" + "".join(f"{curve[n - 1]:>14.4f}" for n in checkpoints)
              + f"{r['final']['test_accuracy']:>18.4f}{r['final']['params']:>9d}"
              + f"{r['children_compile_s']:>11.0f}{r['children_train_s']:>9.0f}")
    print(f"{'hand-designed CNN':22s}" + " " * 14 * len(checkpoints)
          + f"{baseline['test_accuracy']:>18.4f}{baseline['params']:>9d}")
    for algorithm, r in runs.items():
        print(f"{algorithm} best: {r['best_layers']}")

    os.makedirs(RESULTS, exist_ok=True)
    images.save_curves(os.path.join(RESULTS, "nas_cnn.png"),
                       {a: (np.arange(1, len(r["best_validation_so_far"]) + 1),
                            r["best_validation_so_far"]) for a, r in runs.items()},
                       xlabel="children trained", ylabel="best validation accuracy",
                       title="Fashion-MNIST CNN search")
    out = {"benchmark": "nas_cnn", "protocol": __doc__.split("\n\n")[1],
           "args": vars(args), "config": dataclasses.asdict(base),
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "note": "shared 2-core machine, 3 other jobs running: times are inflated"},
           "versions": {"jax": jax.__version__, "numpy": np.__version__},
           "runs": runs, "baseline": {"layers": [list(layer) for layer in BASELINE], **baseline},
           "total_compile_s": objective.trainer.compile_s,
           "total_train_s": objective.trainer.train_s,
           "wall_s": time.perf_counter() - start}
    with open(os.path.join(RESULTS, "nas_cnn.json"), "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", os.path.join(RESULTS, "nas_cnn.json"))


if __name__ == "__main__":
    main()

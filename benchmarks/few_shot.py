"""The few-shot table: MAML, first-order MAML and Prototypical Networks on the same Omniglot test
episodes, collected from finished launcher runs (`python -m launch.maml ...`).

    .venv/bin/python -m benchmarks.few_shot --run=NAME=WORKDIR[:WALL_S] [--run=...] \
        [--partial=NAME] [--ways=N --shots=K] [--out=benchmarks/results/few_shot.json]

Each row comes from one workdir: its config (learner, ways, shots, split, first order), the
meta-iterations (episodes per update: `meta_batch_size`) its checkpointed run reached, the test
accuracy and its 95% confidence interval over the episodes of its `results.json` (600 for the
configs' final evaluation), the held-out accuracy during training, and the launcher command's
flags (`flags.txt`). WALL_S is the wall time of the launcher run(s) in seconds, measured outside
(e.g. `date +%s` before and after). `--partial=NAME` marks a row whose run stopped before its
config's schedule (a short budget; the same command continues it). Rows of other names already in
the output are kept, so runs can be added one at a time. The machine (CPU model, cores, load) is
recorded with every row.

`--ways`/`--shots` evaluate each run's newest checkpoint on N-way K-shot test episodes instead
(`maml.train.evaluate_checkpoint`, 600 episodes): the Prototypical Networks paper tests one
60-way-trained model at 5 and 20 ways.

Episodes are identical across methods when ways, shots, queries, seed, split and rotate agree: the
test stream is a pure function of those (`maml/tasks.py:episodes`), whatever the learner.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks import machine
from common import metrics, workdirs
from maml import train

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "results", "few_shot.json")


def machine_now() -> dict:
    """`benchmarks.machine`'s record and the load average when the row is written."""
    return {**machine.machine_record(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def method_name(config: dict) -> str:
    if config.get("learner", "maml") == "protonet":
        return "Prototypical Networks"
    if config.get("learner") == "pretrain":
        return "pretrained classifier, head fitted to the support set"
    return "MAML, first order" if config["inner"]["first_order"] else "MAML"


def row_of(name: str, workdir: str, wall_s: float | None, partial: bool,
           results: dict | None = None) -> dict:
    """One table row from a finished run's workdir (see the module docstring); `results`: its
    evaluation (default: its results.json)."""
    config = workdirs.read_json(os.path.join(workdir, workdirs.CONFIG_FILE))
    results = results or workdirs.read_json(os.path.join(workdir, "results.json"))
    rows = metrics.read_metrics(workdir)
    with open(os.path.join(workdir, "flags.txt")) as f:
        flags = [line.strip() for line in f if line.strip()]
    mean, ci = results["accuracy"]
    return {
        "name": name, "method": method_name(config), "ways": results["ways"],
        "shots": results["shots"], "queries": config["queries"],
        "split": config.get("split", "random"), "train_ways": config.get("train_ways") or
        config["ways"], "meta_batch_size": config["meta_batch_size"],
        "meta_iterations": results.get("step") or (rows[-1]["step"] if rows else 0),
        "episodes": results["episodes"], "test_inner_steps": results["test_inner_steps"],
        "accuracy": mean, "ci95": ci,
        "test_accuracy_during_training": [(r["step"], r["test_accuracy"]) for r in rows
                                          if "test_accuracy" in r],
        "wall_s": wall_s, "partial": partial, "workdir": workdir, "flags": flags,
        "machine": machine_now(), "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def parse_run(text: str) -> tuple[str, str, float | None]:
    """'NAME=WORKDIR[:WALL_S]' -> (name, workdir, wall seconds or None)."""
    name, _, rest = text.partition("=")
    workdir, _, wall = rest.partition(":")
    return name, workdir, float(wall) if wall else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", default=[], help="NAME=WORKDIR[:WALL_S]")
    parser.add_argument("--partial", action="append", default=[],
                        help="NAME of a row whose run stopped before its config's schedule")
    parser.add_argument("--ways", type=int, help="evaluate the checkpoints N-way")
    parser.add_argument("--shots", type=int, help="... K-shot (with --ways)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    if (args.ways is None) != (args.shots is None):
        parser.error("--ways and --shots go together.")
    table = workdirs.read_json(args.out) if os.path.exists(args.out) else {"rows": []}
    for text in args.run:
        name, workdir, wall_s = parse_run(text)
        results = None
        if args.ways:
            results = train.evaluate_checkpoint(workdir, args.ways, args.shots, args.episodes)
        row = row_of(name, workdir, wall_s, name in args.partial, results)
        table["rows"] = [r for r in table["rows"] if r["name"] != name] + [row]
        print(f"{name}: {row['method']} {row['ways']}-way {row['shots']}-shot, "
              f"{row['meta_iterations']} meta-iterations: {100 * row['accuracy']:.1f} +- "
              f"{100 * row['ci95']:.1f}% over {row['episodes']} episodes")
    metrics.write_json(args.out, table)


if __name__ == "__main__":
    main()

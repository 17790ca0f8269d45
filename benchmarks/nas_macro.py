"""REINFORCE vs regularized evolution vs random search on NAS-Bench-Macro, at equal budgets.

Protocol (the benchmark has no validation split): every search sees the seed-0 CIFAR-10 accuracy
as reward; the architecture it chooses is its best by reward, and we report that architecture's
test accuracy = mean of the seed-1 and seed-2 accuracies. The budget counts evaluations (distinct
architectures; a repeated proposal is free), proposals capped at 10x the budget, as in
`nas.train`. Budgets 50 / 100 / 300, 10 search seeds (0-9), each algorithm with the shipped
defaults (`nas.train.Config()`, = `launch/configs/nas_macro_*.flags`); p-values of a one-sided
Welch t-test of REINFORCE > random search and REINFORCE > evolution over the seeds.

The search with budget b is the prefix of the search with budget 300 up to the proposal that
spends the b-th evaluation (or the 10 b-th proposal): proposals do not depend on the budget, which
`check_prefix` verifies on seed 0 by running budget 100 directly.

`--tune` runs the sweep of `SWEEP` (REINFORCE's levers one at a time, then combinations;
evolution's P and S) on search seeds 100-119, never the reported ones, scored by the mean test
accuracy at budgets 100 and 300 among the settings whose searches spend at least 90% of the
300 evaluations on average (a policy that collapses ends on the proposal cap); the winner was made
the default of `nas.train.Config` by hand, and the sweep is kept in the JSON (a run without
`--tune` keeps the previous sweep).

    python -m benchmarks.nas_macro [--tune]

Writes benchmarks/results/nas_macro.json and nas_macro.png (best-so-far test accuracy of the
chosen architecture vs evaluations, mean and min-max band over the seeds; REINFORCE's policy
entropy and evaluations per proposal).
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
from benchmarks.stats import welch_greater
from common import config as config_lib
from nas import history as history_lib
from nas import train
from nas.search_space import MacroBenchmark

BUDGETS = (50, 100, 300)
REPORTED_SEEDS = tuple(range(10))
TUNING_SEEDS = tuple(range(100, 120))
DEFAULTS = train.Config(space="nas_bench_macro")
PAPER = {"controller_learning_rate": 6e-4, "controller_normalize_advantages": False,
         "controller_reward_transform": "cubed", "controller_temperature": 1.0,
         "controller_tanh_constant": 0.0, "controller_entropy_weight": 1e-4,
         "controller_baseline_decay": 0.95, "controller_updates_per_step": 1,
         "controller_ppo_clip": 0.0, "controller_topk_size": 0, "controller_topk_weight": 0.0,
         "architectures_per_step": 5}
# The paper's levers changed one at a time from PAPER, then variations around STAGE (the first
# combination that worked); every row sets all levers, so the sweep does not depend on the
# defaults of the day.
NORMALIZED = {**PAPER, "controller_learning_rate": 1e-2, "controller_normalize_advantages": True,
              "controller_reward_transform": "identity"}
ENAS = {**NORMALIZED, "controller_temperature": 5.0, "controller_tanh_constant": 2.5}
STAGE = {**ENAS, "controller_entropy_weight": 0.2, "controller_updates_per_step": 3}
DECAY = {**STAGE, "controller_baseline_decay": 0.8, "controller_entropy_weight": 0.3}
SWEEP = {
    "reinforce": [
        PAPER,
        {**PAPER, "controller_learning_rate": 2e-2, "architectures_per_step": 10},
        NORMALIZED,
        ENAS,
        {**ENAS, "controller_entropy_weight": 0.1},
        STAGE,
        {**STAGE, "controller_entropy_weight": 0.1},
        {**STAGE, "controller_entropy_weight": 0.3},
        {**STAGE, "controller_learning_rate": 2e-2},
        {**STAGE, "controller_updates_per_step": 1},
        {**STAGE, "controller_updates_per_step": 5},
        {**STAGE, "controller_updates_per_step": 5, "controller_ppo_clip": 0.2},
        {**STAGE, "architectures_per_step": 10},
        {**STAGE, "controller_tanh_constant": 0.0, "controller_temperature": 1.0},
        {**STAGE, "controller_normalize_advantages": False, "controller_reward_transform": "cubed"},
        {**STAGE, "controller_baseline_decay": 0.8},
        {**STAGE, "controller_baseline_decay": 0.8, "controller_updates_per_step": 5},
        {**STAGE, "controller_baseline_decay": 0.8, "controller_learning_rate": 2e-2},
        DECAY,
        {**DECAY, "controller_topk_size": 10, "controller_topk_weight": 0.25},
        {**DECAY, "controller_topk_size": 10, "controller_topk_weight": 0.5},
        {**DECAY, "controller_topk_size": 10, "controller_topk_weight": 1.0},
        {**DECAY, "controller_topk_size": 5, "controller_topk_weight": 1.0},
        {**DECAY, "controller_topk_size": 20, "controller_topk_weight": 1.0},
        {**DECAY, "controller_topk_size": 10, "controller_topk_weight": 1.0,
         "controller_entropy_weight": 0.4},
        {**DECAY, "controller_topk_size": 10, "controller_topk_weight": 0.5,
         "architectures_per_step": 3},
    ],
    "evolution": [{"evolution_population_size": p, "evolution_tournament_size": s}
                  for p, s in ((10, 3), (20, 5), (20, 10), (50, 10), (50, 25))],
}
MIN_SPENT = 0.9  # a setting qualifies when its searches spend >= 90% of the budget on average
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def configure(algorithm: str, **settings) -> train.Config:
    """The defaults for `algorithm` with `settings` set by flag name (`controller_...`)."""
    subs = {f.name: getattr(DEFAULTS, f.name) for f in dataclasses.fields(DEFAULTS)
            if dataclasses.is_dataclass(getattr(DEFAULTS, f.name))}
    top = {}
    for name, value in settings.items():
        sub = next((s for s in subs if name.startswith(s + "_")), None)
        if sub is None:
            top[name] = value
        else:
            subs[sub] = dataclasses.replace(subs[sub], **{name[len(sub) + 1:]: value})
    return dataclasses.replace(DEFAULTS, algorithm=algorithm, **subs, **top)


def prefix(history: list[history_lib.Record], budget: int, factor: int) -> list:
    """The history of the same search with budget `budget`: up to the proposal that spends the
    `budget`-th evaluation, or the first `factor * budget` proposals."""
    spent = [i for i, r in enumerate(history) if r.evaluations == budget and not r.cached]
    end = spent[0] + 1 if spent else len(history)
    return history[:min(end, factor * budget)]


def chosen_test_accuracy(history: list[history_lib.Record]) -> np.ndarray:
    """After each proposal: test accuracy of the best-by-reward architecture so far."""
    out, best = [], None
    for r in history:
        if best is None or r.reward > best.reward:
            best = r
        out.append(best.info["test_accuracy"])
    return np.array(out)


def run(benchmark: MacroBenchmark, config: train.Config) -> dict:
    """One search: its history, seconds, and per observed batch (proposals, evaluations, the
    searcher's metrics)."""
    trace = []
    searcher = train.make_searcher(config, benchmark.space)
    on_step = lambda h: trace.append((len(h), h[-1].evaluations,  # noqa: E731
                                      searcher.last_metrics.get("entropy", float("nan"))))
    start = time.perf_counter()
    history = train.run_search(searcher, benchmark, benchmark.space, config.budget,
                               config.max_proposals, on_step=on_step)
    return {"history": history, "seconds": time.perf_counter() - start, "trace": trace}


def check_prefix(benchmark: MacroBenchmark, config: train.Config, full: list) -> None:
    direct = run(benchmark, dataclasses.replace(config, budget=100))["history"]
    cut = prefix(full, 100, config.max_proposals_factor)
    assert [(r.architecture, r.cached) for r in direct] == [(r.architecture, r.cached)
                                                           for r in cut], config.algorithm


def evaluate(benchmark, algorithm: str, settings: dict, seeds, budgets=BUDGETS) -> dict:
    """Per budget: the chosen architecture's test accuracy per seed, evaluations and proposals;
    the best-so-far curves against evaluations, and REINFORCE's trace, of the largest budget."""
    runs = [run(benchmark, configure(algorithm, budget=max(budgets), seed=seed, **settings))
            for seed in seeds]
    factor = DEFAULTS.max_proposals_factor
    results = {}
    for budget in budgets:
        cuts = [prefix(r["history"], budget, factor) for r in runs]
        accs = [chosen_test_accuracy(h)[-1] for h in cuts]
        results[budget] = {
            "test_mean": float(np.mean(accs)), "test_sd": float(np.std(accs, ddof=1)),
            "test_per_seed": [float(a) for a in accs],
            "evaluations_per_seed": [history_lib.count_evaluations(h) for h in cuts],
            "proposals_per_seed": [len(h) for h in cuts],
            "seed0_reward_mean": float(np.mean([100 * history_lib.best_record(h).reward
                                                for h in cuts]))}
    results["seconds_per_run_median"] = float(np.median([r["seconds"] for r in runs]))
    curves = np.full((len(runs), max(budgets)), np.nan)
    for i, r in enumerate(runs):
        acc = chosen_test_accuracy(r["history"])
        for record, a in zip(r["history"], acc):  # NaN after a search that ended on the cap
            curves[i, record.evaluations - 1] = a
    results["curves"] = curves
    results["traces"] = [r["trace"] for r in runs]
    return results


def tune(benchmark) -> list[dict]:
    sweep = []
    for algorithm, grid in SWEEP.items():
        for settings in grid:
            r = evaluate(benchmark, algorithm, settings, TUNING_SEEDS, budgets=(100, 300))
            row = {"algorithm": algorithm, "settings": settings,
                   "is_default": configure(algorithm, **settings) == configure(algorithm),
                   **{f"test_mean_{b}": r[b]["test_mean"] for b in (100, 300)},
                   **{f"evaluations_mean_{b}": float(np.mean(r[b]["evaluations_per_seed"]))
                      for b in (100, 300)},
                   "score": (r[100]["test_mean"] + r[300]["test_mean"]) / 2}
            row["qualifies"] = row["evaluations_mean_300"] >= MIN_SPENT * 300
            sweep.append(row)
            print(f"tune {algorithm:10s} {settings}: {row['test_mean_100']:.3f} @100, "
                  f"{row['test_mean_300']:.3f} @300, evaluations {row['evaluations_mean_300']:.0f}"
                  f" of 300", flush=True)
    for algorithm in SWEEP:
        rows = [r for r in sweep if r["algorithm"] == algorithm and r["qualifies"]]
        winner = max(rows, key=lambda r: r["score"])
        winner["winner"] = True
        print(f"winner {algorithm}: {winner['settings']} (score {winner['score']:.3f}; the "
              f"defaults {'are' if winner['is_default'] else 'are NOT'} this setting)")
    return sweep


def save_figure(path: str, table: dict, oracle: float) -> None:
    fig = Figure(figsize=(12, 4.5), dpi=100)
    ax, ax2 = fig.subplots(1, 2)
    xs = np.arange(1, max(BUDGETS) + 1)
    for name, r in table.items():
        curves = r["curves"]
        line, = ax.plot(xs, np.nanmean(curves, axis=0), label=name)
        ax.fill_between(xs, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0),
                        color=line.get_color(), alpha=0.15)
    ax.axhline(oracle, color="k", linestyle=":", label="oracle")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("test acc. of chosen architecture (%)")
    ax.set_title("NAS-Bench-Macro: mean and min-max over 10 seeds")
    ax.set_ylim(oracle - 1.0, oracle + 0.1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax3 = ax2.twinx()
    for i, trace in enumerate(table["reinforce"]["traces"]):
        props, evals, entropy = np.array(trace).T
        ax2.plot(evals, entropy, color="C0", alpha=0.5, label="policy entropy" if i == 0 else None)
        ax3.plot(evals, evals / props, color="C3", alpha=0.5,
                 label="evaluations / proposals" if i == 0 else None)
    ax2.set_xlabel("evaluations")
    ax2.set_ylabel("entropy of the sampled architectures (nats)", color="C0")
    ax3.set_ylabel("evaluations / proposals", color="C3")
    ax3.set_ylim(0, 1.05)
    ax2.set_title("REINFORCE (defaults), one line per seed")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help="run the sweep on seeds 100-119")
    parser.add_argument("--data_dir", default=None)
    args = parser.parse_args()
    benchmark = MacroBenchmark(args.data_dir)
    oracle_architecture, oracle = benchmark.oracle()
    json_path = os.path.join(RESULTS, "nas_macro.json")
    previous = json.load(open(json_path)) if os.path.exists(json_path) else {}
    sweep = tune(benchmark) if args.tune else previous.get("tuning_sweep")
    for row in sweep or []:  # a kept sweep: against today's defaults
        row["is_default"] = (configure(row["algorithm"], **row["settings"])
                             == configure(row["algorithm"]))

    table = {algorithm: evaluate(benchmark, algorithm, {}, REPORTED_SEEDS)
             for algorithm in train.ALGORITHMS}
    for algorithm in train.ALGORITHMS:
        check_prefix(benchmark, configure(algorithm, budget=300, seed=0),
                     run(benchmark, configure(algorithm, budget=300, seed=0))["history"])
    p_values = {f"reinforce>{other}": {
        str(b): welch_greater(table["reinforce"][b]["test_per_seed"],
                              table[other][b]["test_per_seed"]) for b in BUDGETS}
        for other in ("random", "evolution")}

    print(f"\nNAS-Bench-Macro, test accuracy (%) of the architecture chosen by seed-0 accuracy, "
          f"mean +- sd over seeds {REPORTED_SEEDS[0]}-{REPORTED_SEEDS[-1]} (evaluations, "
          "proposals: means)")
    for name, r in table.items():
        print(f"{name:10s}" + "".join(
            f"  {r[b]['test_mean']:.2f} +- {r[b]['test_sd']:.2f} "
            f"({np.mean(r[b]['evaluations_per_seed']):.0f}, "
            f"{np.mean(r[b]['proposals_per_seed']):.0f})" for b in BUDGETS))
    print(f"oracle    {oracle:.2f}\np-values {p_values}")
    print("median seconds per search of 300:",
          {name: round(r["seconds_per_run_median"], 3) for name, r in table.items()})

    os.makedirs(RESULTS, exist_ok=True)
    save_figure(os.path.join(RESULTS, "nas_macro.png"), table, oracle)
    out = {"benchmark": "nas_macro", "protocol": __doc__.split("\n\n")[1],
           "machine": machine.machine_record(),
           "versions": {"jax": jax.__version__, "numpy": np.__version__},
           "reported_seeds": list(REPORTED_SEEDS), "tuning_seeds": list(TUNING_SEEDS),
           "defaults": config_lib.to_dict(DEFAULTS), "tuning_sweep": sweep,
           "oracle": {"architecture": oracle_architecture, "test_accuracy": oracle},
           "p_values_one_sided_welch": p_values,
           "results": {name: {str(b): r[b] for b in BUDGETS} for name, r in table.items()}}
    with open(json_path, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", json_path)


if __name__ == "__main__":
    main()

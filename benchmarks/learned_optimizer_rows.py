"""The quality rows of `benchmarks/learned_optimizer.py`'s result file: one per config (or
variant), task family and horizon, over meta-training seeds, built from the runs' eval.json, and
seeds added to a row later (`rows_with_added_seeds`). No flags, so tests can import it."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from matplotlib.figure import Figure

from benchmarks.stats import mean_sd, pooled


def command() -> str:
    """This invocation as a command line."""
    return " ".join(["python -m benchmarks.learned_optimizer", *sys.argv[1:]])


def devices() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()} x {device.device_kind} ({device.platform}), jax {jax.__version__}"


def row_key(row: dict) -> str:
    """A quality row's key in the result file: <config>/<family>/<horizon>."""
    return f"{row['config']}/{row['family']}/{row['horizon']}"


def plot_curves(path: str, name: str, family: str, per_seed: list[dict], seeds) -> str:
    """Left: each optimizer's mean test loss per step (mean over seeds); right: the per-step ratio
    LSTM / tuned Adam of each seed and their mean."""
    fig = Figure(figsize=(12, 4.5), dpi=100)
    left, right = fig.subplots(1, 2)
    for opt in per_seed[0]["mean_curves"]:
        curve = np.mean([r["mean_curves"][opt] for r in per_seed], axis=0)
        left.plot(curve, label=opt)
    left.set(yscale="log", xlabel="optimizee step", ylabel="mean test loss",
             title=f"{name} ({family}): mean over seeds {', '.join(map(str, seeds))}")
    ratios = [np.asarray(r["mean_curves"]["lstm"]) / np.asarray(r["mean_curves"]["adam"])
              for r in per_seed]
    for seed, ratio in zip(seeds, ratios):
        right.plot(ratio, alpha=0.5, label=f"seed {seed}")
    right.plot(np.mean(ratios, axis=0), "k-", lw=2, label="mean")
    right.axhline(1.0, color="gray", ls="--")
    right.set(xlabel="optimizee step", ylabel="LSTM / tuned Adam (mean loss)",
              title="per-step ratio (< 1: the LSTM is ahead)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    return path


def quality_rows(name: str, seeds, runs: list[dict], meta_steps: list[int], results_dir: str,
                 trained_on: str, objective: str, extra_flags=()) -> dict:
    """The rows of one config's (or variant's) runs, one per family and horizon."""
    out = {}
    for family in runs[0]["families"]:
        per_seed = [r["families"][family] for r in runs]
        picture = None
        if all("mean_curves" in r for r in per_seed):
            picture = os.path.basename(plot_curves(
                os.path.join(results_dir, f"learned_optimizer_{name}_{family}_curves.png"),
                name, family, per_seed, seeds))
        for h in per_seed[0]["comparison"]:
            row = {
                "config": name, "family": family, "horizon": int(h), "seeds": list(seeds),
                "mean_final_loss": {opt: mean_sd([r["stats"][opt][h]["mean"] for r in per_seed])
                                    for opt in per_seed[0]["stats"]},
                "ratio_lstm_to_adam": mean_sd([r["comparison"][h]["ratio_lstm_to_adam"]
                                               for r in per_seed]),
                "ratio_per_seed": [r["comparison"][h]["ratio_lstm_to_adam"] for r in per_seed],
                "lstm_rank": mean_sd([r["comparison"][h]["rank"]["lstm"] for r in per_seed]),
                "learning_rates": per_seed[0]["learning_rates"], "meta_steps": meta_steps,
                "curves_png": picture, "trained_on": trained_on,
                "evaluated_on": devices(), "objective": objective, "command": command()}
            if extra_flags:
                row["extra_flags"] = list(extra_flags)
            out[row_key(row)] = row
    return out


def rows_with_added_seeds(old: dict, new: dict) -> dict:
    """`old` (a row of some seeds) and `new` (the same config, family and horizon, other seeds) as
    one row over both, as `quality_rows` would give it over all their runs. Refused where the
    seeds overlap or the baselines were tuned to other learning rates (another protocol)."""
    if set(old["seeds"]) & set(new["seeds"]):
        raise ValueError(f"{row_key(new)}: seeds {new['seeds']} overlap the file's {old['seeds']}")
    if old["learning_rates"] != new["learning_rates"]:
        raise ValueError(f"{row_key(new)}: the baselines' tuned learning rates differ from the "
                         f"file's row ({new['learning_rates']} vs {old['learning_rates']}); "
                         "rerun all seeds together")
    ratios = old["ratio_per_seed"] + new["ratio_per_seed"]
    pictures = [p for row in (old, new) for p in np.atleast_1d(row["curves_png"]) if p]
    return {**new, "seeds": old["seeds"] + new["seeds"],
            "mean_final_loss": {name: pooled(old["mean_final_loss"][name], losses)
                                for name, losses in new["mean_final_loss"].items()},
            "ratio_lstm_to_adam": mean_sd(ratios), "ratio_per_seed": ratios,
            "lstm_rank": pooled(old["lstm_rank"], new["lstm_rank"]),
            "meta_steps": old["meta_steps"] + new["meta_steps"], "curves_png": pictures,
            "earlier_seeds_command": old["command"]}

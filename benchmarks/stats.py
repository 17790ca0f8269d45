"""Statistics the benchmarks report over seeds: mean and standard deviation (also of two groups
pooled), and Welch t-tests (one- and two-sided)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def mean_sd(values) -> dict[str, float]:
    """Mean, sample standard deviation (ddof 1; 0 for a single value) and count of `values`."""
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1
            else 0.0, "n": int(len(values))}


def pooled(a: dict, b: dict) -> dict:
    """`mean_sd` of the union of two groups of values, from each group's `mean_sd`."""
    n = a["n"] + b["n"]
    mean = (a["n"] * a["mean"] + b["n"] * b["mean"]) / n
    squares = ((a["n"] - 1) * a["sd"] ** 2 + (b["n"] - 1) * b["sd"] ** 2
               + a["n"] * b["n"] / n * (a["mean"] - b["mean"]) ** 2)
    return {"mean": float(mean), "sd": float(np.sqrt(squares / (n - 1))) if n > 1 else 0.0,
            "n": n}


def welch_greater(a, b) -> float:
    """One-sided Welch t-test p-value of mean(a) > mean(b) (1 when both are constant)."""
    if np.std(a) == 0 and np.std(b) == 0:
        return 0.0 if np.mean(a) > np.mean(b) else 1.0
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)


def welch_two_sided(a, b) -> float:
    """Two-sided Welch t-test p-value of mean(a) = mean(b) (nan with fewer than 2 values a side)."""
    if min(len(a), len(b)) < 2:
        return float("nan")
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)

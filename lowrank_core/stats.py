"""Paired statistics over seeds: how two arms of the LoRA grid differ, with a 95% t-interval and a verdict.

Two arms are compared on the seeds both ran (seed s of one arm against seed s of the other), so seed-to-seed
variation shared by both arms (data order, initial draws) cancels out. The verdict on a difference arm − reference:

- `better` / `worse`: the 95% interval excludes 0, on the side that is better / worse for the metric;
- `within noise`: the interval contains 0 (identical arms land here);
- `undetermined`: fewer than two paired seeds, so no interval exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .grid import AXES, arm_label

CONFIDENCE = 0.95
BETTER, WORSE, WITHIN_NOISE, UNDETERMINED = "better", "worse", "within noise", "undetermined"
CONVERGENCE = (("steps_to_target", False), ("delta_distance", False))  # (metric, higher is better) of init comparisons


def mean_interval(values: Sequence[float]) -> dict:
    """n, mean, std and the 95% t-interval of the mean of `values` (missing values left out); std and the
    interval are NaN below two values, and the interval is the mean itself when every value is equal."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def paired_difference(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> dict:
    """a − b per pair (pairs with a missing side left out): `diffs`, `n`, `mean`, `std`, `ci_low`, `ci_high` (see
    `mean_interval`) and the `verdict` on a against b (see the module's docstring)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diffs = diffs[~np.isnan(diffs)]
    result = {"diffs": diffs.tolist(), **mean_interval(diffs)}
    if result["n"] < 2:
        verdict = UNDETERMINED
    elif result["ci_low"] > 0 or result["ci_high"] < 0:
        verdict = BETTER if (result["ci_low"] > 0) == higher_is_better else WORSE
    else:
        verdict = WITHIN_NOISE
    return result | {"verdict": verdict}


def compare_arms(runs: pd.DataFrame, arm: dict, reference: dict, metric: str, higher_is_better: bool) -> dict:
    """`paired_difference` of `metric` between the runs of `arm` and of `reference` (dicts of the axes),
    paired by `seed` over the seeds both ran, plus each side's mean over those seeds."""
    def per_seed(which: dict) -> pd.Series:
        rows = runs.loc[(runs[list(AXES)] == pd.Series(which)[list(AXES)]).all(axis=1)]
        return rows.groupby("seed")[metric].mean()

    paired = pd.concat({"value": per_seed(arm), "reference": per_seed(reference)}, axis=1, join="inner").dropna()
    result = paired_difference(paired["value"], paired["reference"], higher_is_better)
    return result | {"seeds": paired.index.tolist(), "value_mean": paired["value"].mean(),
                     "reference_mean": paired["reference"].mean()}


def axis_comparisons(runs: pd.DataFrame, baseline: dict, metric: str, higher_is_better: bool,
                     axes: Sequence[str] = AXES) -> pd.DataFrame:
    """Per axis in `axes` and value other than the baseline's: the arm equal to `baseline` on the other axes against
    the baseline arm, on `metric` (see `compare_arms`). Values without such an arm (e.g. only in an extra arm that
    differs on two axes) are left out, and every value when the baseline arm is not in `runs`; on a product grid
    every value has one.

    Columns: axis, value, reference (the baseline's value), arm (label), the `paired_difference` keys but `diffs`,
    seeds, value_mean, reference_mean.
    """
    arms = runs[list(AXES)].drop_duplicates()
    rows = []
    if not (arms == pd.Series(baseline)[list(AXES)]).all(axis=1).any():
        axes = ()  # the baseline arm did not run: nothing to compare with
    for axis in axes:
        others = [a for a in AXES if a != axis]
        matching = arms.loc[(arms[others] == pd.Series(baseline)[others]).all(axis=1)]
        for value in matching[axis]:
            if value != baseline[axis]:
                arm = {**baseline, axis: value}
                result = compare_arms(runs, arm, baseline, metric, higher_is_better)
                result.pop("diffs")
                rows.append({"axis": axis, "value": value, "reference": baseline[axis], "arm": arm_label(arm),
                             "metric": metric, **result})
    return pd.DataFrame(rows, columns=["axis", "value", "reference", "arm", "metric", "n", "mean", "std", "ci_low",
                                       "ci_high", "verdict", "seeds", "value_mean", "reference_mean"])


def convergence_steps(runs: pd.DataFrame) -> pd.Series:
    """`steps_to_target` with a run that never reached its target (missing) counted as its `max_steps`: censored, the
    true count is larger, so a difference involving such a run is understated, never invented. Without a
    `max_steps` column such runs stay missing and drop out of the pairs."""
    if "max_steps" not in runs:
        return runs["steps_to_target"]
    return runs["steps_to_target"].fillna(runs["max_steps"])


def init_comparisons(runs: pd.DataFrame, baseline: dict, reference: str = "random") -> pd.DataFrame:
    """Every init other than `reference` against it, the other axes at the baseline's, on steps to the target
    loss (see `convergence_steps`) and ΔW distance to the teacher, both lower is better (`axis_comparisons` rows)."""
    runs = runs.assign(steps_to_target=convergence_steps(runs))
    reference_arm = {**baseline, "init": reference}
    return pd.concat([axis_comparisons(runs, reference_arm, metric, higher, axes=("init",))
                      for metric, higher in CONVERGENCE], ignore_index=True)


def infer_baseline(runs: pd.DataFrame) -> dict:
    """The arm with the most arms one axis away from it (the centre of a one-at-a-time grid); ties go to the arm
    that comes first in `runs` (on a product grid, its first row)."""
    arms = runs[list(AXES)].drop_duplicates().to_numpy()
    neighbours = [int(((arms != arm).sum(axis=1) == 1).sum()) for arm in arms]
    return dict(zip(AXES, arms[int(np.argmax(neighbours))].tolist()))

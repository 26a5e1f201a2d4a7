"""Paired statistics over seeds on constructed inputs: known differences found with the right sign, identical arms
within noise, one seed undetermined, pairs by seed, the one-axis-away arm of a one-at-a-time or product grid."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from lowrank_core.stats import (axis_comparisons, convergence_steps, infer_baseline, init_comparisons,
                                mean_interval, paired_difference)

BASELINE = {"objective": "lm", "preset": "standard", "init": "random", "strategy": "later_half",
            "learning_rate": "default"}


def runs_of(arms: dict[tuple[str, ...], list[float]], **columns) -> pd.DataFrame:
    """One row per arm (objective, preset, init, strategy, learning_rate) and seed, its roc_auc from the list, seeds
    0, 1, ..."""
    return pd.DataFrame([{**dict(zip(BASELINE, arm)), "seed": seed,
                          "roc_auc": score, **{name: values[arm][seed] for name, values in columns.items()}}
                         for arm, scores in arms.items() for seed, score in enumerate(scores)])


def arm(**changes) -> tuple[str, ...]:
    return tuple({**BASELINE, **changes}.values())


def test_a_known_difference_is_found_with_its_t_interval():
    result = paired_difference([0.8, 0.87, 0.88], [0.7, 0.75, 0.8])
    assert result["diffs"] == pytest.approx([0.1, 0.12, 0.08])
    assert (result["n"], result["mean"], result["std"]) == pytest.approx((3, 0.1, 0.02))
    half = 4.302653 * 0.02 / math.sqrt(3)  # t quantile 0.975 at 2 degrees of freedom
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((0.1 - half, 0.1 + half))
    assert result["verdict"] == "better"
    assert paired_difference([0.7, 0.75, 0.8], [0.8, 0.87, 0.88])["verdict"] == "worse"
    wide = paired_difference([0.8, 0.9, 0.85], [0.7, 0.75, 0.8])  # the same mean, spread 0.05: the interval holds 0
    assert wide["mean"] == pytest.approx(0.1) and wide["verdict"] == "within noise"


def test_lower_is_better_flips_the_verdict():
    faster = paired_difference([10, 12, 11], [30, 31, 33], higher_is_better=False)
    assert faster["mean"] < 0 and faster["verdict"] == "better"
    assert paired_difference([30, 31, 33], [10, 12, 11], higher_is_better=False)["verdict"] == "worse"


def test_identical_or_noisy_arms_are_within_noise():
    assert paired_difference([0.7, 0.8, 0.6], [0.7, 0.8, 0.6])["verdict"] == "within noise"
    noisy = paired_difference([0.8, 0.6, 0.75], [0.7, 0.7, 0.7])  # differences +0.1, -0.1, +0.05
    assert noisy["ci_low"] < 0 < noisy["ci_high"] and noisy["verdict"] == "within noise"


def test_one_pair_has_no_interval_and_missing_pairs_drop_out():
    one = paired_difference([0.9], [0.7])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.2)
    assert math.isnan(one["std"]) and math.isnan(one["ci_low"]) and one["verdict"] == "undetermined"
    dropped = paired_difference([0.9, np.nan, 0.8], [0.7, 0.6, np.nan])
    assert dropped["n"] == 1 and dropped["verdict"] == "undetermined"
    assert paired_difference([], [])["n"] == 0 and math.isnan(mean_interval([])["mean"])
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0, 2.0], [1.0])


def test_axis_comparisons_pair_the_one_axis_away_arm_with_the_baseline_by_seed():
    runs = runs_of({arm(): [0.70, 0.72, 0.71], arm(preset="full"): [0.80, 0.83, 0.81],
                    arm(preset="light"): [0.69, 0.74, 0.70], arm(init="svd"): [0.60, 0.62, 0.61],
                    arm(preset="full", init="svd"): [0.99, 0.99, 0.99]})  # an extra arm two axes away
    runs = runs[~((runs["preset"] == "light") & (runs["seed"] == 0))]  # light ran seeds 1 and 2 only
    compared = axis_comparisons(runs, BASELINE, "roc_auc", higher_is_better=True).set_index("value")
    assert list(compared.index) == ["full", "light", "svd"]
    assert compared.loc["full", "mean"] == pytest.approx(0.1033333)
    assert compared.loc["full", "verdict"] == "better" and compared.loc["svd", "verdict"] == "worse"
    assert compared.loc["full", ["arm", "reference"]].tolist() == ["lm/full/random/later_half", "standard"]
    light = compared.loc["light"]
    assert light["seeds"] == [1, 2] and light["n"] == 2
    assert (light["value_mean"], light["reference_mean"]) == pytest.approx((0.72, 0.715))  # the paired seeds only
    assert light["verdict"] == "within noise"


def test_a_product_grid_compares_the_arm_differing_only_on_that_axis():
    scores = {"standard": 0.0, "full": 0.1, "random": 0.0, "svd": -0.2}
    runs = runs_of({arm(preset=preset, init=init): [0.7 + scores[preset] + scores[init] + 0.01 * s for s in range(3)]
                    for preset, init in itertools.product(("standard", "full"), ("random", "svd"))})
    compared = axis_comparisons(runs, BASELINE, "roc_auc", True).set_index("value")
    assert compared["mean"].to_dict() == pytest.approx({"full": 0.1, "svd": -0.2})
    other = axis_comparisons(runs, {**BASELINE, "preset": "full"}, "roc_auc", True)
    assert other.set_index("value").loc["svd", "arm"] == "lm/full/svd/later_half"
    assert axis_comparisons(runs, {**BASELINE, "preset": "light"}, "roc_auc", True).empty  # no baseline arm


def test_init_comparisons_count_never_reached_as_max_steps_and_prefer_lower():
    arms = {arm(): [0.7] * 3, arm(init="svd"): [0.7] * 3, arm(init="pissa"): [0.7] * 3}
    steps = {arm(): [np.nan, np.nan, 50], arm(init="svd"): [10, 12, 11], arm(init="pissa"): [np.nan, np.nan, 50]}
    distance = {arm(): [0.9, 0.92, 0.91], arm(init="svd"): [0.5, 0.52, 0.49], arm(init="pissa"): [0.9, 0.95, 0.9]}
    runs = runs_of(arms, steps_to_target=steps, delta_distance=distance, max_steps={a: [60] * 3 for a in arms})
    assert convergence_steps(runs).tolist()[:3] == [60, 60, 50]
    compared = init_comparisons(runs, BASELINE).set_index(["value", "metric"])
    svd_steps = compared.loc[("svd", "steps_to_target")]
    assert svd_steps["mean"] == pytest.approx((10 - 60 + 12 - 60 + 11 - 50) / 3) and svd_steps["verdict"] == "better"
    assert compared.loc[("svd", "delta_distance"), "verdict"] == "better"
    assert compared.loc[("pissa", "steps_to_target"), "verdict"] == "within noise"  # both never reached, or both 50
    assert compared.loc[("pissa", "steps_to_target"), "reference"] == "random"
    against_svd = init_comparisons(runs, BASELINE, reference="svd").set_index(["value", "metric"])
    assert against_svd.loc[("random", "delta_distance"), "verdict"] == "worse"


def test_the_baseline_is_the_arm_with_the_most_one_axis_neighbours():
    one_at_a_time = runs_of({arm(preset="full"): [0.7], arm(): [0.7], arm(init="svd"): [0.7],
                             arm(strategy="all"): [0.7], arm(preset="full", init="svd"): [0.7]})
    assert infer_baseline(one_at_a_time) == BASELINE
    product = runs_of({arm(preset=p, init=i): [0.7] for p in ("full", "standard") for i in ("svd", "random")})
    assert infer_baseline(product) == {**BASELINE, "preset": "full", "init": "svd"}  # a tie: the first row

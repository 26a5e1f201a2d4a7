"""The report's findings and warnings on constructed result sets: two sets of numbers give different, correct
sentences; a question without its inputs says so; each warning fires on its case and stays silent on a clean one."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from lowrank_core.delta import DeltaConfig, analyse_deltas, summarise_groups
from lowrank_core.grid import AXES, arm_path
from lowrank_core.modalities import Score
from lowrank_core.report_findings import (Grid, axes_finding, chance_warnings, delta_finding, findings_section,
                                          fine_tune_finding, frozen_head_warnings, grid_warnings, history_warnings,
                                          init_finding, label_blind_warnings, lowrank_finding, nan_warnings,
                                          noise_warnings, teacher_warnings, warnings_section)

BASELINE = {"objective": "lm", "preset": "standard", "init": "random", "strategy": "later_half",
            "learning_rate": "default"}
NOISE = (0.0, 0.01, -0.01)  # per seed, shared by every arm: it cancels in paired differences


def runs_of(arms: dict[tuple, dict], seeds: int = 3) -> pd.DataFrame:
    """One clean run per arm (a tuple of (axis, value) changes from the baseline) and seed; `arms` maps each arm to
    its column values (a list: per seed), over the defaults."""
    rows = []
    for changes, columns in arms.items():
        for seed in range(seeds):
            row = {**BASELINE, **dict(changes), "seed": seed, "roc_auc": 0.7 + NOISE[seed], "accuracy": 0.7,
                   "final_loss": 0.3, "label_blind_loss": 0.69, "positive_rate": 0.5, "steps_to_target": 30.0,
                   "max_steps": 60, "delta_distance": 0.8, "trainable_parameters": 1000, "train_seconds": 10.0,
                   "peak_memory_mb": 100.0}
            rows.append(row | {name: value[seed] if isinstance(value, list) else value
                               for name, value in columns.items()})
    return pd.DataFrame(rows)


def references_of(teacher: float = 0.9, base: float = 0.5, **ranked: float) -> pd.DataFrame:
    rows = [{"model": "base", "roc_auc": base, "positive_rate": 0.3},
            {"model": "teacher", "roc_auc": teacher, "positive_rate": 0.5}]
    rows += [{"model": name, "rank": int(name.removeprefix("teacher_r")), "roc_auc": score, "positive_rate": 0.5}
             for name, score in ranked.items()]
    return pd.DataFrame(rows).set_index("model")


def history_of(val_losses: list[float], train_losses: list[float], name: str = "teacher",
               batch_losses: list[list[float]] | None = None) -> pd.DataFrame:
    """A history with a validation loss every 10 steps (the mean of that evaluation's `batch_losses`, when given) and
    the training loss falling linearly between the `train_losses` given at the same steps."""
    if batch_losses is not None:
        val_losses = [float(np.mean(losses)) for losses in batch_losses]
    steps = np.arange(1, 10 * len(val_losses) + 1)
    loss = np.interp(steps, 10 * np.arange(1, len(train_losses) + 1), train_losses)
    val = [val_losses[s // 10 - 1] if s % 10 == 0 else np.nan for s in steps]
    history = pd.DataFrame({"step": steps, "loss": loss, "lr": 1e-3, "samples_per_s": 10.0, "val_loss": val,
                            "arm": name})
    if batch_losses is not None:
        history["val_batch_losses"] = [" ".join(map(str, batch_losses[s // 10 - 1])) if s % 10 == 0 else np.nan
                                       for s in steps]
    return history


def grid_of(runs: pd.DataFrame, references: pd.DataFrame | None = None) -> Grid:
    return Grid(runs, references if references is not None else references_of(), history_of([1.0], [1.0]), BASELINE)


FULL, LIGHT, SVD, ALL = (("preset", "full"),), (("preset", "light"),), (("init", "svd"),), (("strategy", "all"),)


def test_a_swept_learning_rate_is_answered_like_the_other_axes():
    swept = grid_of(runs_of({(): {}, (("learning_rate", "0.01"),): {"roc_auc": [0.8, 0.81, 0.79]}}))
    finding = axes_finding(swept)
    assert finding.question.startswith("Which preset, strategy, objective and learning rate score best")
    assert finding.answer.endswith("learning_rate: 0.01 scores best (0.8 vs 0.7 for default, Δ +0.1 [+0.1, +0.1]) "
                                   "at 1× the trainable parameters, 1× the train time, 1× the peak memory of default.")
    assert "learning rate" not in axes_finding(grid_of(runs_of({(): {}}))).question


def test_the_winning_preset_is_claimed_only_when_its_interval_supports_it():
    better = grid_of(runs_of({(): {}, FULL: {"roc_auc": [0.8, 0.81, 0.79], "trainable_parameters": 2000,
                                             "train_seconds": 15.0}, LIGHT: {"roc_auc": [0.71, 0.7, 0.69]}}))
    worse = grid_of(runs_of({(): {}, FULL: {"roc_auc": [0.6, 0.61, 0.59]}, LIGHT: {"roc_auc": [0.72, 0.68, 0.7]}}))
    answer = axes_finding(better).answer
    assert answer.startswith("preset: full scores best (0.8 vs 0.7 for standard, Δ +0.1 [+0.1, +0.1]) at 2× the "
                             "trainable parameters, 1.5× the train time, 1× the peak memory of standard;")
    assert "strategy: only later_half in the grid; objective: only lm in the grid." in answer
    assert axes_finding(worse).answer.startswith(
        "preset: no value scores better than the baseline standard beyond noise (full worse beyond noise);")
    all_worse = grid_of(runs_of({(): {}, FULL: {"roc_auc": [0.6, 0.61, 0.59]}}))
    assert axes_finding(all_worse).answer.startswith("preset: the baseline standard scores best")
    alone = axes_finding(grid_of(runs_of({(): {}})))
    assert alone.answer.startswith("preset: only standard in the grid;") and alone.confidence == ""
    assert axes_finding(None).answer.startswith("Cannot be answered")


def test_svd_init_is_judged_on_steps_and_distance_against_every_other_init():
    faster = grid_of(runs_of({(): {"steps_to_target": [40.0, np.nan, 44.0]},
                              SVD: {"steps_to_target": [10.0, 12.0, 11.0], "delta_distance": [0.5, 0.52, 0.51]}}))
    answer = init_finding(faster).answer
    # random's seed 1 never reached the target: counted as max_steps 60
    expected = ((10 - 40) + (12 - 60) + (11 - 44)) / 3
    assert answer.startswith(f"SVD init vs random: reaches the target loss sooner (Δ steps {expected:+.3g} [")
    assert "and ends closer to the teacher (Δ distance -0.29 [" in answer

    same = grid_of(runs_of({(): {}, SVD: {"delta_distance": [0.9, 0.7, 0.85]}}))
    assert init_finding(same).answer == (
        "SVD init vs random: reaches the target loss neither sooner nor later beyond noise (Δ steps +0 [+0, +0]) "
        "and ends neither closer to the teacher nor farther from the teacher beyond noise (Δ distance +0.0167 "
        "[-0.242, +0.275]).")
    without = grid_of(runs_of({(): {}, (("init", "pissa"),): {}}))
    assert init_finding(without).answer == "Cannot be answered: svd is not in the grid (inits: random, pissa)."
    elsewhere = grid_of(runs_of({(): {}, (("init", "svd"), ("preset", "full")): {}}))
    assert "no svd arm shares the baseline's objective" in init_finding(elsewhere).answer


def test_when_neither_init_reaches_the_target_loss_the_finding_says_so_instead_of_a_zero_width_interval():
    never = runs_of({(): {"steps_to_target": np.nan}, SVD: {"steps_to_target": np.nan,
                                                             "delta_distance": [0.5, 0.52, 0.51]}})
    assert init_finding(grid_of(never)).answer.startswith(
        "SVD init vs random: reaches the target loss neither sooner nor later (neither it nor random reaches it in "
        "60 steps) and ends closer to the teacher (Δ distance -0.29 [")
    once = never.assign(steps_to_target=[np.nan] * 4 + [50.0, np.nan])  # svd's seed 1 reached it
    assert "neither sooner nor later beyond noise (Δ steps -3.33 [-17.7, +11])" in init_finding(grid_of(once)).answer


def test_on_a_product_grid_svd_init_is_judged_under_every_strategy():
    """Where the adapters go can decide whether ΔW helps: each strategy both inits ran with gets its own clause."""
    runs = runs_of({(): {}, SVD: {"delta_distance": [0.9, 0.7, 0.85]}, ALL: {"steps_to_target": 40.0},
                    (("init", "svd"), ("strategy", "all")): {"steps_to_target": [1.0, 2.0, 1.0],
                                                               "delta_distance": [0.4, 0.42, 0.41]}})
    answer = init_finding(grid_of(runs)).answer
    assert answer.startswith("SVD init vs random: reaches the target loss neither sooner nor later beyond noise")
    assert ("; vs random at all: reaches the target loss sooner (Δ steps -38.7 [-40.1, -37.2])" in answer
            and "and ends closer to the teacher (Δ distance -0.39 [" in answer)


def test_the_fine_tune_gap_and_the_rank_r_shares_follow_the_references():
    runs = runs_of({(): {}, FULL: {"roc_auc": [0.8, 0.82, 0.78]}})
    finding = fine_tune_finding(grid_of(runs, references_of(0.9, 0.5, teacher_r8=0.86, teacher_r2=0.7)))
    assert finding.answer == (
        "The best LoRA arm lm/full/random/later_half reaches test roc_auc 0.8 [0.75, 0.85] against the full "
        "fine-tune's 0.9 and is +0.1 [+0.0503, +0.15] from it (teacher − arm); the ΔW_r references hold 50% at "
        "r=2, 90% at r=8 of its gain over the base (0.5 → 0.9).")
    assert finding.confidence.startswith("the arm's 95% t-interval over 3 seeds;")
    one_seed = fine_tune_finding(grid_of(runs_of({(): {}}, seeds=1)))
    assert "reaches test roc_auc 0.7 against" in one_seed.answer and one_seed.confidence.startswith("one seed, no")
    close = fine_tune_finding(grid_of(runs, references_of(0.82, 0.5)))
    assert "matches the full fine-tune within noise; there are no ΔW_r references" in close.answer
    with_intervals = references_of(0.9, 0.5).assign(roc_auc_low=[0.38, 0.84], roc_auc_high=[0.62, 0.96])
    sampled = fine_tune_finding(grid_of(runs, with_intervals))
    assert "against the full fine-tune's 0.9 [0.84, 0.96] and is" in sampled.answer
    assert sampled.confidence.endswith("single evaluations (the teacher's interval: 95% DeLong over the test samples)")


UNLEARNED = references_of(0.5, 0.44, teacher_r4=0.48).assign(roc_auc_low=[0.33, 0.38, 0.36],
                                                              roc_auc_high=[0.55, 0.62, 0.6])
UNLEARNED_WHY = ("Cannot be answered: the full fine-tune did not learn the task (its test roc_auc 0.5 [0.38, 0.62] is "
                 "at chance (0.5)), so ")


def test_findings_that_need_the_teacher_cannot_be_answered_when_it_learned_nothing():
    runs = runs_of({(): {}, SVD: {"steps_to_target": [10.0, 12.0, 11.0], "delta_distance": [0.5, 0.52, 0.51]}})
    init, fine_tune = init_finding(grid_of(runs, UNLEARNED)), fine_tune_finding(grid_of(runs, UNLEARNED))
    assert init.answer == UNLEARNED_WHY + ("svd init starts from a ΔW that holds nothing of the task and closeness to "
                                           "the teacher means nothing.")
    assert fine_tune.answer == UNLEARNED_WHY + ("neither an arm's distance from it nor the ΔW_r references' share of "
                                                "its gain means anything.")
    assert (init.confidence, init.evidence, fine_tune.confidence) == ("", "warnings", "")
    flat = fine_tune_finding(grid_of(runs, references_of(0.62, 0.6, teacher_r2=0.61)))  # no interval: the margin
    assert "(its test roc_auc 0.62 is not 0.05 better than the base's 0.6), so" in flat.answer
    learned = grid_of(runs, references_of(0.9, 0.44, teacher_r4=0.8))
    assert init_finding(learned).answer.startswith("SVD init vs random: reaches the target loss sooner")
    assert fine_tune_finding(learned).answer.startswith("The best LoRA arm")


def test_when_every_arm_is_at_chance_no_axis_is_judged():
    at_chance = runs_of({(): {"roc_auc": [0.5, 0.52, 0.48]}, FULL: {"roc_auc": [0.53, 0.54, 0.52]}})
    finding = axes_finding(grid_of(at_chance))
    assert finding.answer == ("Cannot be answered: every arm's mean test roc_auc is within 0.05 of chance (0.5), so "
                              "no axis can be judged.")
    assert finding.confidence == ""
    one_learned = at_chance.assign(roc_auc=[0.5, 0.52, 0.48, 0.8, 0.81, 0.79])
    assert axes_finding(grid_of(one_learned)).answer.startswith("preset: full scores best")


def delta_analysis(language: torch.Tensor, vision: torch.Tensor) -> dict:
    """`svd_analysis.json`'s ranks, modules and groups for a language attention and a vision MLP ΔW."""
    deltas = {"model.language_model.layers.0.self_attn.q_proj": language, "model.visual.blocks.0.mlp.fc1": vision}
    cfg = DeltaConfig(ranks=(1, 2))
    analysis = analyse_deltas(((name, delta, 1.0) for name, delta in deltas.items()),
                              {name: list(delta.shape) for name, delta in deltas.items()}, cfg)
    return {"ranks": [1, 2], "modules": analysis.modules, "groups": summarise_groups(analysis.modules, [1, 2])}


def test_the_delta_finding_says_low_rank_or_not_and_where():
    g = torch.Generator().manual_seed(0)
    orthogonal = torch.linalg.qr(torch.randn(16, 16, generator=g))[0]  # a flat spectrum
    rank_one = torch.outer(torch.randn(16, generator=g), torch.randn(16, generator=g))
    low = delta_finding(delta_analysis(10 * rank_one / rank_one.norm(), orthogonal / 4))  # norms 10 and 1
    energy = (100 + 1 / 16) / 101  # the rank-one module holds 100 of the 101 squared norm
    assert low.answer == (f"Yes: rank 1 holds {energy:.0%} of ‖ΔW‖² over the 2 changed modules (a flat spectrum "
                          "would give 6%); at rank 1 the most low-rank group is language/attention (100%), the least "
                          "vision/mlp (6%).")
    assert low.confidence.startswith("exact SVD") and low.evidence == "delta"
    analysis = delta_analysis(orthogonal, orthogonal.T)
    energy = analysis["groups"]["all"]["energy"]["2"]
    assert energy == pytest.approx(2 / 16)
    assert delta_finding(analysis).answer.startswith(
        f"No: rank 2 holds {energy:.0%} of ‖ΔW‖² over the 2 changed modules (a flat spectrum would give 12%)")
    assert delta_finding(None).answer.startswith("Cannot be answered")


def test_the_lowrank_finding_ranks_the_nets_by_their_error_ratio():
    def comparison(mse_ratio: float, energy: float) -> dict:
        return {"ratio": {"mse": mse_ratio, "seconds_per_sample": 0.5}, "effective_rank": 4, "n_samples": 8,
                "network": {"energy_captured": energy}, "svd": {"energy_captured": 0.9}}

    finding = lowrank_finding({"MLP": comparison(2.5, 0.7), "ResMLP": comparison(1.25, 0.85)})
    assert finding.answer == ("Closest first: ResMLP reaches 1.25× the SVD's MSE at rank 4 (energy 0.85 vs 0.9) in "
                              "0.5× its time per sample; MLP reaches 2.5× the SVD's MSE at rank 4 (energy 0.7 vs 0.9) "
                              "in 0.5× its time per sample.")
    assert lowrank_finding({}).answer.startswith("Cannot be answered: no low-rank nets were trained")


CLEAN = runs_of({(): {}, FULL: {"roc_auc": [0.8, 0.81, 0.79]}})


def test_a_teacher_no_better_than_the_base_is_flagged():
    assert teacher_warnings(references_of(0.9, 0.5)) == []
    (warning,) = teacher_warnings(references_of(0.62, 0.6))
    assert warning.startswith("teacher: test roc_auc 0.62 is not 0.05 better than the base's 0.6")


def test_a_teacher_at_chance_or_within_its_interval_of_the_base_is_flagged():
    """Its sampling interval decides where the references hold one: at chance, or not beyond the base's score."""
    assert teacher_warnings(UNLEARNED) == [
        "teacher: test roc_auc 0.5 [0.38, 0.62] is at chance (0.5): the full fine-tune did not learn the task, so "
        "comparisons with it measure nothing."]
    assert teacher_warnings(references_of(0.53, 0.3))[0].startswith("teacher: test roc_auc 0.53 is at chance (0.5):")
    overlapping = references_of(0.7, 0.62).assign(roc_auc_low=[0.51, 0.6], roc_auc_high=[0.73, 0.8])
    assert teacher_warnings(overlapping)[0].startswith(
        "teacher: test roc_auc 0.7 [0.6, 0.8] is not better than the base's 0.62 beyond its interval: the full")
    beyond = references_of(0.7, 0.62).assign(roc_auc_low=[0.51, 0.65], roc_auc_high=[0.73, 0.75])
    assert teacher_warnings(beyond) == []


def test_a_rank_r_reference_at_chance_is_flagged():
    assert chance_warnings(CLEAN, references_of(teacher_r8=0.86)) == []
    references = references_of(teacher_r2=0.52, teacher_r4=0.6, teacher_r8=0.86).assign(
        roc_auc_low=np.nan, roc_auc_high=np.nan)
    references.loc["teacher_r4", ["roc_auc_low", "roc_auc_high"]] = [0.45, 0.75]
    assert chance_warnings(CLEAN, references) == ["teacher_r2: test roc_auc 0.52 is at chance (0.5).",
                                                  "teacher_r4: test roc_auc 0.6 [0.45, 0.75] is at chance (0.5)."]


def test_arms_at_chance_and_one_answer_for_every_sample_are_flagged():
    assert chance_warnings(CLEAN, references_of()) == []
    runs = runs_of({(): {}, FULL: {"roc_auc": [0.5, 0.52, 0.51]}, LIGHT: {"positive_rate": [0.5, 1.0, 0.5]},
                    SVD: {"roc_auc": [0.2, 0.3, 0.25]}})
    references = references_of(teacher_r4=0.14)
    references.loc[["base", "teacher"], "positive_rate"] = 0.0  # a blind base may give one answer: not flagged
    inverted = ("is below chance: it ranks tampered samples below real ones, a signal of the wrong sign rather than "
                "none; a higher score than another's does not mean it learned more.")
    assert chance_warnings(runs, references) == [
        "lm/full/random/later_half: mean test roc_auc 0.51 is at chance (within 0.05 of 0.5).",
        f"lm/standard/svd/later_half: mean test roc_auc 0.25 {inverted}",
        f"teacher_r4: test roc_auc 0.14 {inverted}",
        "lm/light/random/later_half: predicts one class for every test sample (seed 1 positive).",
        "teacher: predicts negative for every test sample."]


@pytest.mark.parametrize("low, high, flagged", [(0.3, 0.49, True), (0.3, 0.52, False), (np.nan, np.nan, True)])
def test_a_reference_below_chance_is_flagged_only_beyond_its_sampling_interval(low, high, flagged):
    references = references_of(0.92, 0.41).assign(roc_auc_low=[low, 0.87], roc_auc_high=[high, 0.97])
    interval = "" if np.isnan(low) else f" [{low:.3g}, {high:.3g}]"
    expected = [f"base: test roc_auc 0.41{interval} is below chance: it ranks tampered samples below real ones, a "
                "signal of the wrong sign rather than none; a higher score than another's does not mean it learned "
                "more."]
    assert chance_warnings(CLEAN, references) == (expected if flagged else [])


@pytest.mark.parametrize("low, high, flagged", [(0.51, 0.73, True), (0.49, 0.71, False), (np.nan, np.nan, False)])
def test_a_base_above_chance_beyond_its_sampling_interval_is_flagged(low, high, flagged):
    references = references_of(0.92, 0.62).assign(roc_auc_low=[low, 0.87], roc_auc_high=[high, 0.97])
    expected = ["base: test roc_auc 0.62 [0.51, 0.73] is above chance beyond the test split's sampling noise: the "
                "untrained base already reads part of the signal, so a gain over the base understates what a "
                "fine-tune learned."]
    assert chance_warnings(CLEAN, references) == (expected if flagged else [])


def test_a_final_loss_at_the_label_blind_bound_is_flagged():
    assert label_blind_warnings(CLEAN) == []
    runs = runs_of({(): {"final_loss": [0.3, 0.65, 2.07], "roc_auc": [0.5, 0.52, 0.48]},
                    FULL: {"final_loss": 0.69, "label_blind_loss": np.nan}})
    assert label_blind_warnings(runs) == [
        "lm/standard/random/later_half: final training loss 0.942× the label-blind bound 0.69 (seed 1): it learned "
        "the answer format, not the label.",
        "lm/standard/random/later_half: final training loss 3× the label-blind bound 0.69 (seed 2): it has not even "
        "learned the answer format."]


def test_an_arm_ranking_above_chance_at_the_label_blind_bound_is_not_told_it_learned_no_label():
    """It ranks by the label without being confident of it: its loss alone does not say it learned no label."""
    confident_not = runs_of({(): {"final_loss": 0.66, "roc_auc": [0.886, 0.89, 0.882]}})
    assert label_blind_warnings(confident_not) == []
    assert label_blind_warnings(confident_not.assign(roc_auc=0.52)) == [
        "lm/standard/random/later_half: final training loss 0.957×, 0.957×, 0.957× the label-blind bound 0.69 (seed "
        "0, 1, 2): it learned the answer format, not the label."]


def test_an_axis_without_a_difference_beyond_noise_is_flagged():
    assert noise_warnings(CLEAN, BASELINE) == []
    runs = runs_of({(): {}, FULL: {"roc_auc": [0.8, 0.81, 0.79]}, ALL: {"roc_auc": [0.72, 0.69, 0.7]}})
    assert noise_warnings(runs, BASELINE) == [
        "strategy: no value differs from the baseline later_half beyond noise on test roc_auc (all (within noise)); "
        "this axis measured nothing at 3 seed(s)."]
    one_seed = runs_of({(): {}, FULL: {"roc_auc": [0.9]}}, seeds=1)
    assert "(full (undetermined)); this axis measured nothing at 1 seed(s)" in noise_warnings(one_seed, BASELINE)[0]


def test_rising_validation_loss_with_falling_training_loss_is_flagged():
    assert history_warnings({"teacher": history_of([1.0, 0.8, 0.7], [1.0, 0.6, 0.4])}) == []
    assert history_warnings({"teacher": history_of([1.0, 0.8, 1.1], [1.0, 1.2, 1.4])}) == []  # training rose too
    (warning,) = history_warnings({"teacher": history_of([1.0, 0.8, 0.9], [1.0, 0.6, 0.4])})
    assert warning.startswith("teacher: validation loss rose from 0.8 (step 20) to 0.9 (step 30) while the training "
                              "loss fell from 0.")
    assert history_warnings({"teacher": history_of([1.0, 0.8, 0.83], [1.0, 0.6, 0.4])}) == []  # under 5%


def test_a_validation_rise_is_flagged_only_beyond_the_noise_of_the_validation_batches():
    first, best = [1.1, 0.9, 1.2, 1.0], [0.8, 0.7, 0.9, 0.8]
    consistent = [0.92, 0.79, 1.01, 0.88]  # every batch up, by 0.1 on average
    noisy = [1.0, 0.2, 1.3, 0.9]  # the same mean rise, up on two batches and down on another
    assert stats.ttest_rel(noisy, best, alternative="greater").pvalue > 0.025  # the noisy case as constructed
    rise = stats.ttest_rel(consistent, best).confidence_interval(0.95)
    assert rise.low > 0
    (warning,) = history_warnings({"teacher": history_of([], [1.0, 0.6, 0.4], batch_losses=[first, best, consistent])})
    assert warning.startswith(f"teacher: validation loss rose from 0.8 (step 20) to 0.9 (step 30), by +0.1 "
                              f"[{rise.low:+.3g}, {rise.high:+.3g}] per validation batch (paired over 4 batches) "
                              "while the training loss fell from 0.")
    assert history_warnings({"teacher": history_of([], [1.0, 0.6, 0.4], batch_losses=[first, best, noisy])}) == []


def test_nan_guard_flags_missing_and_non_finite_numbers_only_where_expected():
    assert nan_warnings(CLEAN, references_of()) == []
    runs = runs_of({(): {"roc_auc": [0.7, np.nan, 0.7], "steps_to_target": np.nan},
                    FULL: {"delta_distance": [0.8, 0.8, np.inf]},
                    (("objective", "head"),): {"final_loss": np.nan}})  # no head run has it: not flagged
    references = references_of()
    references.loc["teacher", "roc_auc"] = np.nan
    assert nan_warnings(runs, references) == [
        "NaN guard: lm/standard/random/later_half/seed1 has no finite roc_auc while other runs of its objective do.",
        "NaN guard: lm/full/random/later_half/seed2 has no finite delta_distance while other runs of its objective do.",
        "NaN guard: reference teacher has no finite roc_auc while other references do."]
    history = history_of([1.0, 0.8], [1.0, 0.5])
    history.loc[3, "loss"] = np.nan
    assert history_warnings({"lm/standard/random/later_half/seed0": history}) == [
        "NaN guard: lm/standard/random/later_half/seed0 has a missing or non-finite loss at 1 step(s), first at "
        "step 4."]


def test_frozen_head_arms_not_above_their_head_alone_beyond_noise_are_flagged():
    head_frozen, hybrid_frozen = (("objective", "head_frozen"),), (("objective", "hybrid_frozen"),)
    runs = runs_of({(): {"roc_auc": [0.7, 0.71, 0.69]},  # below the head, but it does not keep it frozen
                    head_frozen: {"roc_auc": [0.8, 0.82, 0.79]},  # the head's score within its seeds' spread
                    hybrid_frozen: {"roc_auc": [0.86, 0.85, 0.87]}})  # above it beyond that spread
    interval, above = (stats.t.interval(0.95, 2, loc=np.mean(seeds), scale=stats.sem(seeds))
                       for seeds in ([0.8, 0.82, 0.79], [0.86, 0.85, 0.87]))
    assert interval[0] < 0.8 < interval[1] and above[0] > 0.8  # the cases as constructed
    assert frozen_head_warnings(runs, 0.8) == [
        f"head_frozen/standard/random/later_half: mean test roc_auc 0.803 [{interval[0]:.3g}, {interval[1]:.3g}] over "
        "3 seed(s) is not above the pre-trained head's alone (0.8) beyond noise: its adapters added nothing "
        "measurable to the frozen head."]
    assert frozen_head_warnings(runs, None) == [] and frozen_head_warnings(runs, 0.75) == []
    one_seed = runs_of({hybrid_frozen: {"roc_auc": [0.79]}}, seeds=1)
    assert frozen_head_warnings(one_seed, 0.8)[0].startswith("hybrid_frozen/standard/random/later_half: mean test "
                                                             "roc_auc 0.79 over 1 seed(s) is not above")
    assert frozen_head_warnings(runs_of({hybrid_frozen: {"roc_auc": [0.81]}}, seeds=1), 0.8) == []


def test_grid_warnings_gather_every_check_and_stay_silent_on_a_clean_grid():
    clean = grid_of(CLEAN)
    assert grid_warnings(clean, history_of([1.0, 0.8], [1.0, 0.5])) == []
    assert grid_warnings(clean, history_of([1.0, 0.8, 0.9], [1.0, 0.6, 0.4]))[0].startswith("teacher: validation")
    broken = grid_of(CLEAN, references_of(0.5, 0.5))
    assert grid_warnings(broken)[0].startswith("teacher: test roc_auc 0.5 is at chance (0.5): the full")


def write_inputs(directory, runs: pd.DataFrame, references: pd.DataFrame, teacher_val: list[float]) -> dict:
    """The report's inputs for a grid: its three tables and the teacher's history."""
    (directory / "teacher").mkdir()
    history_of(teacher_val, [1.0, 0.6, 0.4][: len(teacher_val)]).drop(columns="arm").to_csv(
        directory / "teacher" / "history.csv", index=False)
    history = pd.concat([history_of([1.0, 0.8], [1.0, 0.5], arm_path(row)).assign(**row)
                         for row in runs[[*AXES, "seed"]].to_dict("records")])
    files = {"lora_table": directory / "ablation.csv", "lora_references": directory / "references.csv",
             "lora_history": directory / "history.csv", "teacher": directory / "teacher"}
    runs.to_csv(files["lora_table"], index=False)
    references.reset_index().to_csv(files["lora_references"], index=False)
    history.to_csv(files["lora_history"], index=False)
    return {name: str(path) for name, path in files.items()}


def test_the_sections_render_from_files_with_links_to_their_evidence(tmp_path):
    (tmp_path / "clean").mkdir()
    clean = write_inputs(tmp_path / "clean", CLEAN, references_of(), [1.0, 0.8])
    assert warnings_section(clean).html.endswith("<p>No warnings.</p>")
    findings = findings_section(clean)
    assert findings.anchor == "findings" and "<code>lm/standard/random/later_half</code>" in findings.html
    items = re.findall(r"<li>(.*?)</li>", findings.html)
    assert len(items) == 5
    # no ΔW analysis, no low-rank nets: no evidence; no svd in the grid: the grid's inits in the axis effects
    assert re.findall(r'href="#([\w-]+)"', findings.html) == ["effects", "effects", "lora-comparison"]
    assert "preset: full scores best (0.8 vs 0.7 for standard" in items[2]
    assert f"<code>{clean['lora_table']}</code>" in items[2]

    (tmp_path / "broken").mkdir()
    broken = write_inputs(tmp_path / "broken", CLEAN, references_of(0.5, 0.5), [1.0, 0.8, 0.9])
    section = warnings_section(broken)
    assert section.anchor == "warnings"
    assert [w[:30] for w in re.findall(r"<li>(.*?)</li>", section.html)] == [
        "teacher: test roc_auc 0.5 is a", "teacher: validation loss rose "]
    fine_tune = re.findall(r"<li>(.*?)</li>", findings_section(broken).html)[3]
    assert "the full fine-tune did not learn the task" in fine_tune
    assert warnings_section({}).html.endswith("<p>No warnings.</p>")
    assert all("Cannot be answered" in item for item in re.findall(r"<li>(.*?)</li>", findings_section({}).html))


@pytest.mark.parametrize("score, verdict", [(0.8, "full scores best"), (0.7, "no value scores better")])
def test_findings_follow_the_numbers_in_the_table(tmp_path, score, verdict):
    runs = runs_of({(): {}, FULL: {"roc_auc": [score + n for n in (0.0, 0.012, -0.01)]}})
    files = write_inputs(tmp_path, runs, references_of(), [1.0])
    assert f"preset: {verdict}" in findings_section(files).html


DEPTH_SCORE = Score("abs_rel", "AbsRel", higher_is_better=False, chance=None)


def test_a_lower_is_better_score_picks_the_lowest_and_has_no_chance_level():
    """Depth arms are judged by test AbsRel: the best value is the lowest, the teacher must be lower than the base,
    and there is no chance level to warn about."""
    runs = runs_of({(): {"abs_rel": [0.20, 0.21, 0.19]}, FULL: {"abs_rel": [0.12, 0.13, 0.11]},
                    LIGHT: {"abs_rel": [0.30, 0.31, 0.29]}})
    references = pd.DataFrame([{"model": "base", "abs_rel": 0.4}, {"model": "teacher", "abs_rel": 0.1},
                               {"model": "teacher_r4", "rank": 4, "abs_rel": 0.25}]).set_index("model")
    grid = Grid(runs, references, history_of([1.0], [1.0]), BASELINE, DEPTH_SCORE)
    assert axes_finding(grid).answer.startswith("preset: full scores best (0.12 vs 0.2 for standard, Δ -0.08")
    answer = fine_tune_finding(grid).answer
    assert answer.startswith("The best LoRA arm lm/full/random/later_half reaches test abs_rel 0.12")
    assert "the ΔW_r references hold 50% at r=4 of its gain over the base (0.4 → 0.1)" in answer
    assert teacher_warnings(references, DEPTH_SCORE) == []
    (warning,) = teacher_warnings(references.assign(abs_rel=[0.4, 0.38, 0.3]), DEPTH_SCORE)
    assert warning.startswith("teacher: test abs_rel 0.38 is not 0.05 better than the base's 0.4")
    assert chance_warnings(runs.assign(roc_auc=0.5), references, DEPTH_SCORE) == []

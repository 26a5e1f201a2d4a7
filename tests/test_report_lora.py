"""The LoRA grid's report section, rendered from small synthetic grid tables: the sortable experiment table, full
fine-tune vs LoRA, the effect of each axis against the baseline, score against cost, ΔW distance per module group
and the loss curves by init."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from lowrank_core.report_lora import axis_effects, lora_section, pareto_front
from lowrank_core.report_sections import stage_sections

TEACHER = {"model": "teacher", "source": "lm", "roc_auc": 0.9, "roc_auc_low": 0.84, "roc_auc_high": 0.96,
           "lm_loss": 0.5, "trainable_parameters": 400000, "total_parameters": 400000, "trainable_percent": 100.0,
           "adapter_bytes": 1600000.0, "peak_memory_mb": 800.0, "train_seconds": 20.0, "samples_per_s": 20.0}
BASE = {"model": "base", "source": "lm", "roc_auc": 0.5, "roc_auc_low": 0.38, "roc_auc_high": 0.62, "lm_loss": 6.0,
        "trainable_parameters": 0, "total_parameters": 400000, "trainable_percent": 0.0}
RANKED = [{"model": f"teacher_r{rank}", "rank": rank, "source": "lm", "roc_auc": roc_auc, "lm_loss": 1.0,
           "trainable_parameters": 0, "total_parameters": 400000} for rank, roc_auc in ((2, 0.7), (4, 0.86))]
LAYERS = {("vision", "attention"): 2, ("vision", "mlp"): 2, ("merger", "mlp"): 0, ("language", "attention"): 2}


def arm_row(objective: str, init: str, seed: int, preset: str = "standard", strategy: str = "all") -> dict:
    """One arm × seed of `ablation.csv`: head metrics only with a head, LM metrics only with an LM objective."""
    offset = 0.01 * seed + (0.1 + 0.01 * seed ** 2 if init == "svd" else 0.0)
    head = objective != "lm"
    return {
        "objective": objective, "preset": preset, "init": init, "strategy": strategy, "learning_rate": "default",
        "seed": seed, "source": "head" if head else "lm", "accuracy": 0.6 + offset, "f1": 0.55 + offset,
        "roc_auc": 0.7 + offset, "average_precision": 0.65 + offset, "pixel_f1": 0.3 + offset if head else np.nan,
        "pixel_iou": 0.2 + offset if head else np.nan, "lm_loss": np.nan if objective == "head" else 3.0 - offset,
        "perplexity": np.nan if objective == "head" else 20.0, "lm_roc_auc": np.nan if head else 0.7 + offset,
        "final_loss": 1.0 - offset, "final_val_loss": 1.1 - offset, "initial_loss": 2.0,
        "steps_to_target": 8 if init == "svd" else np.nan, "target_loss": 0.9, "delta_distance": 0.8 - offset,
        "trainable_parameters": 4000 if head else 2000, "total_parameters": 404000 if head else 400000,
        "trainable_percent": 1.0 if head else 0.5, "adapter_bytes": 16000 if head else 8000,
        "peak_memory_mb": 400.0 + 10 * seed, "train_seconds": 2.0 + seed, "samples_per_s": 50.0 + seed,
        "positive_rate": 0.4 + offset, "label_blind_loss": np.nan if head else 1.5, "max_steps": 10, "lr": 1e-3,
    }


def write_grid(directory, arms: list[tuple[str, str, str]], seeds: int) -> dict[str, str]:
    """The grid's four tables for `arms` (objective, init, preset) × `seeds`, as `stage_sections` names them."""
    runs = pd.DataFrame([arm_row(objective, init, seed, preset) for seed in range(seeds)
                         for objective, init, preset in arms])
    history = pd.DataFrame([
        {"step": step, "loss": 2.0 / step + 0.05 * seed + (0.2 if init == "random" else 0.0), "lr": 1e-3,
         "samples_per_s": 50.0, "val_loss": 1.5 if step == 10 else np.nan,
         "arm": f"{objective}/{preset}/{init}/all/lr_default/seed{seed}", "objective": objective, "preset": preset,
         "init": init, "strategy": "all", "learning_rate": "default", "seed": seed}
        for seed in range(seeds) for objective, init, preset in arms for step in range(1, 11)])
    distance = pd.DataFrame([
        {"objective": objective, "preset": preset, "init": init, "strategy": "all", "learning_rate": "default",
         "seed": seed, "tower": tower,
         "kind": kind, "layer": layer if layers else None,
         "relative_distance": 0.5 + 0.1 * layer + 0.01 * seed + (0.2 if init == "random" else 0.0)}
        for seed in range(seeds) for objective, init, preset in arms
        for (tower, kind), layers in LAYERS.items() for layer in range(max(layers, 1))])
    files = {"lora_table": directory / "ablation.csv", "lora_references": directory / "references.csv",
             "lora_history": directory / "ablation_history.csv", "lora_module_distance": directory / "distance.csv"}
    runs.to_csv(files["lora_table"], index=False)
    pd.DataFrame([BASE, TEACHER, *RANKED]).to_csv(files["lora_references"], index=False)
    history.to_csv(files["lora_history"], index=False)
    distance.to_csv(files["lora_module_distance"], index=False)
    return {name: str(path) for name, path in files.items()}


ARMS = [("head", "random", "standard"), ("head", "random", "small"), ("head", "svd", "standard"),
        ("lm", "random", "standard"), ("hybrid", "pissa", "standard")]  # head/random twice: one panel, two lines


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict[str, str]:
    return write_grid(tmp_path_factory.mktemp("grid"), ARMS, seeds=3)


@pytest.fixture(scope="module")
def section_html(grid) -> str:
    return lora_section(grid["lora_table"], grid["lora_references"], grid["lora_history"],
                        grid["lora_module_distance"]).html


def tables(section: str) -> list[list[list[str]]]:
    """The section's sortable tables, each as rows (the header first) of cell texts."""
    return [[re.findall(r"<t[hd]>(.*?)</t[hd]>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]
            for body in re.findall(r'<table class="sortable">(.*?)</table>', section)]


def as_dicts(rows: list[list[str]]) -> list[dict[str, str]]:
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def test_the_experiment_table_holds_one_row_per_arm_and_seed(section_html):
    experiments = as_dicts(tables(section_html)[0])
    assert sorted((r["objective"], r["init"], r["preset"], r["seed"]) for r in experiments) == sorted(
        (*arm, str(seed)) for arm in ARMS for seed in range(3))
    for column in ("strategy", "source", "roc_auc", "pixel_iou", "lm_loss", "delta_distance",
                   "steps_to_target", "final_loss", "trainable_parameters", "trainable_percent", "adapter_bytes",
                   "peak_memory_mb", "samples_per_s", "train_seconds"):
        assert column in experiments[0]
    assert {r["trainable_parameters"] for r in experiments} == {"4000", "2000"}  # counts as integers


def test_missing_values_render_as_a_dash(section_html):
    experiments = as_dicts(tables(section_html)[0])
    lm = next(r for r in experiments if r["objective"] == "lm")
    head = next(r for r in experiments if r["objective"] == "head" and r["init"] == "random")
    assert lm["pixel_iou"] == "–" and lm["lm_loss"] == "3"
    assert head["lm_loss"] == "–" and head["steps_to_target"] == "–"
    assert not [cell for rows in tables(section_html) for row in rows for cell in row if cell.lower() == "nan"]


def test_the_tables_are_sortable_by_an_inline_script(section_html):
    assert len(tables(section_html)) == 4
    assert section_html.count("<script>") == 1 and 'querySelectorAll("table.sortable")' in section_html
    assert not re.search(r"<script\b[^>]*\bsrc=|<link\b|url\(|@import", section_html)


def test_full_fine_tune_vs_lora_gives_lora_over_teacher_ratios(section_html):
    comparison = {r["model"]: r for r in as_dicts(tables(section_html)[1])}
    assert list(comparison) == ["teacher (full fine-tune)", "base (untrained)",
                                "teacher_r2 (base + rank-2 ΔW of the teacher)",
                                "teacher_r4 (base + rank-4 ΔW of the teacher)", "LoRA head (mean of 9)",
                                "LoRA lm (mean of 3)", "LoRA hybrid (mean of 3)"]
    teacher, head, lm = (comparison[name] for name in ("teacher (full fine-tune)", "LoRA head (mean of 9)",
                                                       "LoRA lm (mean of 3)"))
    assert teacher["trainable parameters"] == "400000" and teacher["storage bytes"] == "1600000"
    assert teacher["params LoRA / teacher"] == "–"
    assert comparison["teacher_r4 (base + rank-4 ΔW of the teacher)"]["ROC-AUC"] == "0.86"
    intervals = {name: row["ROC-AUC 95% interval"] for name, row in comparison.items()}
    assert intervals["teacher (full fine-tune)"] == "[0.84, 0.96]" and intervals["base (untrained)"] == "[0.38, 0.62]"
    assert intervals["teacher_r4 (base + rank-4 ΔW of the teacher)"] == intervals["LoRA lm (mean of 3)"] == "–"
    assert float(head["params LoRA / teacher"]) == pytest.approx(4000 / 400000)
    assert float(lm["storage LoRA / teacher"]) == pytest.approx(8000 / 1600000)
    assert float(head["memory LoRA / teacher"]) == pytest.approx(410 / 800, rel=1e-3)  # mean over seeds 0, 1, 2
    assert head["scores from"] == "head" and head["LM loss"] == "–"


def test_axis_effects_are_paired_differences_against_the_baseline(grid, section_html):
    runs = pd.read_csv(grid["lora_table"])
    baseline = {"objective": "head", "preset": "standard", "init": "random", "strategy": "all",
                "learning_rate": "default"}
    effects = axis_effects(runs, baseline).set_index(["axis", "value"])
    # every value one axis away from the baseline; hybrid/pissa differs on two axes and stays out
    assert list(effects.index) == [("objective", "lm"), ("preset", "small"), ("init", "svd")]
    arm = lambda init: runs[(runs["objective"] == "head") & (runs["preset"] == "standard") & (runs["init"] == init)]
    diffs = arm("svd").set_index("seed")["roc_auc"] - arm("random").set_index("seed")["roc_auc"]
    half = 4.302653 * diffs.std() / 3 ** 0.5  # t quantile 0.975 at 2 degrees of freedom
    svd = effects.loc[("init", "svd")]
    assert svd["roc_auc Δ"] == pytest.approx(diffs.mean())
    assert (svd["roc_auc ci_low"], svd["roc_auc ci_high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert svd["roc_auc verdict"] == "better" and svd["final_loss verdict"] == "better"  # lower final loss is better
    assert svd["roc_auc"] == pytest.approx(arm("svd")["roc_auc"].mean()) and svd["seeds"] == 3
    assert effects.loc[("preset", "small"), "roc_auc verdict"] == "within noise"

    shown = {(r["axis"], r["value"]): r for r in as_dicts(tables(section_html)[2])}
    low, high = (float(x) for x in re.findall(r"\[(.*), (.*)\]", shown[("init", "svd")]["roc_auc Δ [95% CI]"])[0])
    assert (low, high) == pytest.approx((diffs.mean() - half, diffs.mean() + half), abs=1e-3)
    assert shown[("init", "svd")]["roc_auc verdict"] == "better" and shown[("init", "svd")]["reference"] == "random"
    assert "<code>head/standard/random/all</code>" in section_html  # the inferred baseline, named


def test_pareto_front_keeps_the_points_no_other_beats_on_both(section_html):
    score = pd.Series([0.9, 0.8, 0.8, 0.7, np.nan], index=list("abcde"))
    cost = pd.Series([10.0, 5.0, 6.0, 1.0, 0.5], index=list("abcde"))
    assert pareto_front(score, cost).tolist() == [True, True, False, True, False]  # c: b scores as high for less

    pareto = re.search(r'<div id="pareto">(.*?)</div>', section_html, re.S).group(1)
    fronts = dict(re.findall(r"<li>(.*?): (.*?)</li>", pareto))
    # lm/random costs 2000 parameters, the head arms 4000; among those head/svd scores highest
    assert re.findall(r"<code>(.*?)</code>", fronts["trainable parameters"]) == [
        "lm/standard/random/all", "head/standard/svd/all"]
    assert images(pareto) == ["test roc_auc against cost"]


def test_module_distance_is_averaged_per_group_and_arm(grid, section_html):
    distance = pd.read_csv(grid["lora_module_distance"])
    block = re.search(r'<div id="module-distance">(.*?)</div>', section_html, re.S).group(1)
    rows = {r["arm"]: r for r in as_dicts(tables(block)[0])}
    vision = distance[(distance["tower"] == "vision") & (distance["kind"] == "mlp") & (distance["init"] == "svd")]
    assert float(rows["head/standard/svd/all"]["vision/mlp"]) == pytest.approx(vision["relative_distance"].mean(),
                                                                               rel=1e-3)
    assert float(rows["lm/standard/random/all"]["merger/mlp"]) == pytest.approx(0.5 + 0.01 + 0.2)  # seeds 0–2
    assert images(block) == ["ΔW distance by module group"]


def images(section: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', section)


def test_figures_in_order(section_html):
    assert images(section_html) == ["test roc_auc against cost", "ΔW distance by module group",
                                    "training loss by init"]


def test_one_seed_gives_no_interval_and_an_undetermined_verdict(tmp_path):
    files = write_grid(tmp_path, [("lm", "random", "standard"), ("lm", "svd", "standard")], seeds=1)
    section = lora_section(files["lora_table"], files["lora_references"], files["lora_history"]).html
    assert len(as_dicts(tables(section)[0])) == 2
    (effect,) = as_dicts(tables(section)[2])
    assert effect["roc_auc Δ [95% CI]"] == "+0.1" and effect["roc_auc verdict"] == "undetermined"
    assert 'id="module-distance"' not in section and images(section) == ["test roc_auc against cost",
                                                                          "training loss by init"]


def test_stage_sections_add_the_section_only_with_all_three_tables(grid):
    assert [s.title for s in stage_sections(grid)] == ["LoRA ablation grid"]
    assert stage_sections({name: path for name, path in grid.items() if name != "lora_history"}) == []


def test_an_lr_sweep_gets_its_figure_and_no_sweep_gets_none(grid, section_html, tmp_path):
    assert 'id="learning-rate"' not in section_html
    runs, history = pd.read_csv(grid["lora_table"]), pd.read_csv(grid["lora_history"])
    faster = (runs["objective"] == "head") & (runs["preset"] == "standard")
    swept = runs[faster].assign(learning_rate="0.01", lr=0.01, roc_auc=runs.loc[faster, "roc_auc"] - 0.1)
    runs = pd.concat([runs.assign(learning_rate=runs["learning_rate"].where(~faster, "0.001")), swept])
    history = pd.concat([history, history[(history["objective"] == "head") & (history["preset"] == "standard")]
                         .assign(learning_rate="0.01")])
    paths = {name: tmp_path / f"{name}.csv" for name in ("runs", "history")}
    runs.to_csv(paths["runs"], index=False)
    history.to_csv(paths["history"], index=False)
    baseline = {"objective": "head", "preset": "standard", "init": "random", "strategy": "all",
                "learning_rate": "0.001"}
    html_text = lora_section(paths["runs"], grid["lora_references"], paths["history"], baseline=baseline).html
    block = re.search(r'<div id="learning-rate">(.*?)</div>', html_text, re.S).group(1)
    assert "<img" in block and "preset standard, strategy all" in block and 'id="rank"' not in html_text
    effects = as_dicts(tables(html_text)[2])
    lr_rows = [row for row in effects if row["axis"] == "learning_rate"]
    assert [(row["value"], row["reference"], row["roc_auc verdict"]) for row in lr_rows] == [
        ("0.01", "0.001", "worse")]


def test_a_rank_sweep_plots_the_baseline_presets_ranks(grid, tmp_path):
    runs = pd.read_csv(grid["lora_table"])
    head = runs[(runs["objective"] == "head") & (runs["preset"] == "standard")]
    ranked = pd.concat([head.assign(preset=f"standard-r{rank}", rank=rank, roc_auc=head["roc_auc"] + rank / 100)
                        for rank in (2, 4, 8)])
    path = tmp_path / "ranked.csv"
    pd.concat([runs, ranked]).to_csv(path, index=False)
    baseline = {"objective": "head", "preset": "standard-r2", "init": "random", "strategy": "all",
                "learning_rate": "default"}
    html_text = lora_section(path, grid["lora_references"], grid["lora_history"], baseline=baseline).html
    block = re.search(r'<div id="rank">(.*?)</div>', html_text, re.S).group(1)
    assert "<img" in block and "preset standard (alpha by lora.grid.rank_alpha)" in block
    assert 'id="learning-rate"' not in html_text

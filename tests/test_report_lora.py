"""The LoRA grid's report section, rendered from small synthetic grid tables: the sortable experiment table, full
fine-tune vs LoRA, the effect of each axis and the loss curves by init."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from lowrank_core.report_lora import axis_effects, lora_section
from lowrank_core.report_sections import stage_sections

TEACHER = {"model": "teacher", "source": "lm", "roc_auc": 0.9, "lm_loss": 0.5, "trainable_parameters": 400000,
           "total_parameters": 400000, "trainable_percent": 100.0, "adapter_bytes": 1600000.0,
           "peak_memory_mb": 800.0, "train_seconds": 20.0, "samples_per_s": 20.0}
BASE = {"model": "base", "source": "lm", "roc_auc": 0.5, "lm_loss": 6.0, "trainable_parameters": 0,
        "total_parameters": 400000, "trainable_percent": 0.0}


def arm_row(objective: str, init: str, seed: int, preset: str = "standard", strategy: str = "all") -> dict:
    """One arm × seed of `ablation.csv`: head metrics only with a head, LM metrics only with an LM objective."""
    offset = 0.01 * seed + (0.1 if init == "svd" else 0.0)
    head = objective != "lm"
    return {
        "objective": objective, "preset": preset, "init": init, "strategy": strategy, "seed": seed,
        "source": "head" if head else "lm", "accuracy": 0.6 + offset, "f1": 0.55 + offset, "roc_auc": 0.7 + offset,
        "average_precision": 0.65 + offset, "pixel_f1": 0.3 + offset if head else np.nan,
        "pixel_iou": 0.2 + offset if head else np.nan, "lm_loss": np.nan if objective == "head" else 3.0 - offset,
        "perplexity": np.nan if objective == "head" else 20.0, "lm_roc_auc": np.nan if head else 0.7 + offset,
        "final_loss": 1.0 - offset, "final_val_loss": 1.1 - offset, "initial_loss": 2.0,
        "steps_to_target": 8 if init == "svd" else np.nan, "target_loss": 0.9, "delta_distance": 0.8 - offset,
        "trainable_parameters": 4000 if head else 2000, "total_parameters": 404000 if head else 400000,
        "trainable_percent": 1.0 if head else 0.5, "adapter_bytes": 16000 if head else 8000,
        "peak_memory_mb": 400.0 + 10 * seed, "train_seconds": 2.0 + seed, "samples_per_s": 50.0 + seed,
    }


def write_grid(directory, arms: list[tuple[str, str, str]], seeds: int) -> dict[str, str]:
    """The grid's three tables for `arms` (objective, init, preset) × `seeds`, as `stage_sections` names them."""
    runs = pd.DataFrame([arm_row(objective, init, seed, preset) for seed in range(seeds)
                         for objective, init, preset in arms])
    history = pd.DataFrame([
        {"step": step, "loss": 2.0 / step + 0.05 * seed + (0.2 if init == "random" else 0.0), "lr": 1e-3,
         "samples_per_s": 50.0, "val_loss": 1.5 if step == 10 else np.nan,
         "arm": f"{objective}/{preset}/{init}/all/seed{seed}", "objective": objective, "preset": preset,
         "init": init, "strategy": "all", "seed": seed}
        for seed in range(seeds) for objective, init, preset in arms for step in range(1, 11)])
    files = {"lora_table": directory / "ablation.csv", "lora_references": directory / "references.csv",
             "lora_history": directory / "ablation_history.csv"}
    runs.to_csv(files["lora_table"], index=False)
    pd.DataFrame([BASE, TEACHER]).to_csv(files["lora_references"], index=False)
    history.to_csv(files["lora_history"], index=False)
    return {name: str(path) for name, path in files.items()}


ARMS = [("head", "random", "standard"), ("head", "random", "small"), ("head", "svd", "standard"),
        ("lm", "random", "standard"), ("hybrid", "pissa", "standard")]  # head/random twice: one panel, two lines


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict[str, str]:
    return write_grid(tmp_path_factory.mktemp("grid"), ARMS, seeds=3)


@pytest.fixture(scope="module")
def section_html(grid) -> str:
    return lora_section(grid["lora_table"], grid["lora_references"], grid["lora_history"]).html


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
    assert len(tables(section_html)) == 3
    assert section_html.count("<script>") == 1 and 'querySelectorAll("table.sortable")' in section_html
    assert not re.search(r"<script\b[^>]*\bsrc=|<link\b|url\(|@import", section_html)


def test_full_fine_tune_vs_lora_gives_lora_over_teacher_ratios(section_html):
    comparison = {r["model"]: r for r in as_dicts(tables(section_html)[1])}
    assert list(comparison) == ["teacher (full fine-tune)", "base (untrained)", "LoRA head (mean of 9)",
                                "LoRA lm (mean of 3)", "LoRA hybrid (mean of 3)"]
    teacher, head, lm = (comparison[name] for name in ("teacher (full fine-tune)", "LoRA head (mean of 9)",
                                                       "LoRA lm (mean of 3)"))
    assert teacher["trainable parameters"] == "400000" and teacher["storage bytes"] == "1600000"
    assert teacher["params LoRA / teacher"] == "–"
    assert float(head["params LoRA / teacher"]) == pytest.approx(4000 / 400000)
    assert float(lm["storage LoRA / teacher"]) == pytest.approx(8000 / 1600000)
    assert float(head["memory LoRA / teacher"]) == pytest.approx(410 / 800, rel=1e-3)  # mean over seeds 0, 1, 2
    assert head["scores from"] == "head" and head["LM loss"] == "–"


def test_axis_effects_are_means_and_seed_spreads_of_per_seed_means(grid, section_html):
    runs = pd.read_csv(grid["lora_table"])
    effects = axis_effects(runs).set_index(["axis", "value"])
    assert list(effects.index) == [  # objectives and inits in their usual order, the other axes as they appear
        ("objective", "head"), ("objective", "lm"), ("objective", "hybrid"), ("preset", "standard"),
        ("preset", "small"), ("init", "random"), ("init", "svd"), ("init", "pissa"), ("strategy", "all")]
    random = runs[runs["init"] == "random"]
    per_seed = random.groupby("seed")["roc_auc"].mean()  # over both head/random arms and lm/random
    assert effects.loc[("init", "random"), "roc_auc mean"] == pytest.approx(per_seed.mean())
    assert effects.loc[("init", "random"), "roc_auc std"] == pytest.approx(per_seed.std())
    assert effects.loc[("init", "random"), ["rows", "seeds"]].tolist() == [9, 3]
    head = runs[runs["objective"] == "head"].groupby("seed")["final_loss"].mean()
    assert effects.loc[("objective", "head"), "final_loss std"] == pytest.approx(head.std())

    shown = {(r["axis"], r["value"]): r for r in as_dicts(tables(section_html)[2])}
    assert shown[("init", "random")]["roc_auc"] == f"{per_seed.mean():.4g} ± {per_seed.std():.2g}"
    assert shown[("init", "svd")]["rows"] == "3"


def test_loss_curves_are_drawn_by_init(section_html):
    assert re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', section_html) == ["training loss by init"]


def test_one_seed_and_one_init_render_without_a_spread(tmp_path):
    files = write_grid(tmp_path, [("lm", "random", "standard")], seeds=1)
    section = lora_section(files["lora_table"], files["lora_references"], files["lora_history"]).html
    assert len(as_dicts(tables(section)[0])) == 1
    effects = as_dicts(tables(section)[2])
    assert [effect["roc_auc"] for effect in effects] == ["0.7"] * 4  # one seed: no spread
    assert "training loss by init" in section


def test_stage_sections_add_the_section_only_with_all_three_tables(grid):
    assert [s.title for s in stage_sections(grid)] == ["LoRA ablation grid"]
    assert stage_sections({name: path for name, path in grid.items() if name != "lora_history"}) == []

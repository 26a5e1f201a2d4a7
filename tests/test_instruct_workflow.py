"""The tiny SFT study end to end (config/examples/text_sft_tiny.yaml): a tiny arithmetic-pretrained Qwen2 LM
fine-tuned on synthetic word problems, random against svd init over a rank axis, scored by greedy answers."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPORT, copy_workflow, grid_tables, run_to_report, snakemake, write_yaml
from lowrank_core.io import read_json

EXAMPLE = "config/examples/text_sft_tiny.yaml"
TEXT = {"id": str, "prompt": str, "reference": str, "generated": str}  # predictions.csv's text columns


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    return run_to_report(tmp_path_factory.mktemp("sft"), EXAMPLE)[0]


def test_the_teacher_beats_the_base_on_test_exact_match_and_loss(sft_run):
    _, references = grid_tables(sft_run)
    base, teacher = references.loc["base"], references.loc["teacher"]
    assert base["exact_match"] <= 0.2  # the base knows arithmetic, not the task: it does not answer the problems
    assert teacher["exact_match"] >= base["exact_match"] + 0.5
    assert teacher["lm_loss"] < 0.5 * base["lm_loss"]
    assert teacher["numeric_accuracy"] >= teacher["exact_match"]  # the answers are numbers


def test_students_learn_and_svd_students_start_lower_and_answer_better_than_random_ones(sft_run):
    runs, references = grid_tables(sft_run)
    assert (runs["lm_loss"] < 0.5 * references.at["base", "lm_loss"]).all(), runs[["preset", "init", "lm_loss"]]
    paired = runs.pivot_table(index=["preset", "seed"], columns="init", values=["initial_loss", "exact_match"])
    assert (paired["initial_loss"]["svd"] < paired["initial_loss"]["random"] - 0.2).all(), paired  # same rank, seed
    # 40 test problems: a difference of 6 answers is beyond a coin's noise on them
    assert (paired["exact_match"]["svd"] >= paired["exact_match"]["random"] + 0.15).all(), paired


def test_the_rank_axis_expands_to_its_arms_and_svd_arms_take_their_ranks_factors(sft_run):
    runs, _ = grid_tables(sft_run)
    assert sorted(set(runs["preset"])) == ["full-r4", "full-r8"]
    assert (runs["rank"] == runs["preset"].str.removeprefix("full-r").astype(int)).all()
    assert (runs["alpha"] == runs["rank"]).all()  # rank_alpha: r
    for rank in (4, 8):
        stats = read_json(sft_run / f"results/lora/sft/full-r{rank}/svd/all/lr_default/seed0/train_stats.json")
        assert stats["init_factors"] == f"factors_r{rank}.safetensors"


def test_every_evaluation_wrote_one_prediction_per_test_record(sft_run):
    test = read_json(sft_run / "results/dataset/manifest.json")["splits"]["test"]["records"]
    files = [*(sft_run / "results/eval").glob("sft/**/predictions.csv"),
             *(sft_run / "results/eval/references").glob("*_predictions.csv")]
    runs, references = grid_tables(sft_run)
    assert len(files) == len(runs) + len(references)
    for path in files:
        predictions = pd.read_csv(path, dtype=TEXT, keep_default_na=False)
        assert predictions["id"].tolist() == [record["id"] for record in test], path
        assert predictions["reference"].tolist() == [record["messages"][-1]["content"] for record in test], path


def test_forgetting_is_each_models_general_text_loss_over_the_bases(sft_run):
    runs, references = grid_tables(sft_run)
    assert references.at["base", "forgetting"] == 0
    assert (runs["forgetting"] == runs["general_loss"] - references.at["base", "general_loss"]).all()
    # fine-tuned on word problems, the models lose some of the number facts the base was pre-trained on
    assert references.at["teacher", "forgetting"] > 0 and (runs["forgetting"] > 0).all()
    page = (sft_run / REPORT).read_text()
    assert "What does fine-tuning cost in general ability" in page


def test_the_report_leads_with_findings_and_links_every_prediction_file(sft_run):
    page = (sft_run / REPORT).read_text()
    assert page.index('<section id="findings">') < page.index('<section id="predictions">')
    links = re.findall(r'href="(\.\./eval/[^"]+predictions\.csv)"', page)
    runs, references = grid_tables(sft_run)
    assert len(links) == len(runs) + len(references)
    assert all((sft_run / "results/reports" / link).resolve().is_file() for link in links)


def test_a_record_over_max_length_fails_in_the_dataset_job_naming_it(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    short = write_yaml(tmp_path / "short.yaml", "sft:\n  max_length: 30\nmodel:\n  tiny_text:\n    pretrain_steps: 0\n")
    result = snakemake(workdir, REPORT, "--configfile", EXAMPLE, str(short))
    assert result.returncode == 1
    line = re.search(r"DataError: \S+/train\.json: record 0 \(id 'train_00000'\): .* max_length (is )?30",
                     result.stderr)
    assert line, result.stderr[-2000:]
    ran = sorted(path.stem for path in (workdir / "results/logs").iterdir())
    assert ran == ["build_tiny_model", "make_synthetic_dataset", "prepare_dataset", "prepare_model"]
    assert not (workdir / "results/dataset/manifest.json").exists()

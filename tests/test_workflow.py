"""The workflow end to end on the embedded default, reruns after config edits, and clean failures."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
import transformers
import yaml
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

from conftest import REPO, REPORT, copy_workflow, scheduled_jobs, snakemake, snakemake_many, write_yaml
from lowrank_core.grid import arm_path
from lowrank_core.head import load_head
from lowrank_core.io import load_tensors, read_json

ARCHS = ("ResMLP", "MLP", "AdaLoRA")
FEATURE_USERS = {"pretrain_head": 1, "train_lowrank_proj": 3, "compare_lowrank": 3}
TEACHER = {"train_teacher": 1, "export_delta": 1}
# The default grid: 15 arms x 3 seeds, one train_lora job (training and evaluating every seed) per arm; 5 arms have a
# head objective, 3 of them a frozen one (2 head_frozen), 2 the svd init, 1 the light preset, 2 a hybrid objective,
# 10 the lm objective.
SEEDS = (0, 1, 2)
ARMS, HEAD_ARMS, FROZEN_HEAD_ARMS, HEAD_FROZEN_ARMS = 15, 5, 3, 2
SVD_ARMS, LIGHT_ARMS, HYBRID_ARMS, LM_ARMS = 2, 1, 2, 10
ARM_RUNS = ARMS * len(SEEDS)
STEPS, TEACHER_STEPS = 80, 300  # lora.train.max_steps, teacher.max_steps
RANKS = (4, 8, 16, 32)  # delta.ranks: one ΔW_r reference each, next to the base and the teacher
ALL_ARMS = {"train_lora": ARMS, "evaluate_references": 1, "collect": 1}
AXES = ["objective", "preset", "init", "strategy", "seed"]
CHANCE, LEARNED = 0.5, 0.15  # test ROC-AUC of a blind guess; the margin by which a model that learned clears a bar
TEACHER_BAR = 0.90  # the study's design: the full fine-tune reaches this test ROC-AUC through its answer
PRESET_RANKS = {"light": 2, "standard": 4, "full": 8, "aggressive": 16}


def test_features_have_the_contracted_shapes_and_metadata(default_run):
    for split, count in (("train", 320), ("val", 64), ("test", 96)):
        tensors, meta = load_tensors(default_run / f"results/features/{split}.safetensors")
        assert tensors["features"].shape == (count, 64, 64)  # 8x8 tokens x text hidden size
        assert tensors["labels"].tolist() == [i % 2 for i in range(count)]
        assert tensors["token_masks"].shape == (count, 8, 8) and tensors["has_mask"].all()
        assert (tensors["token_masks"].flatten(1).amax(1) > 0).tolist() == [bool(i % 2) for i in range(count)]
        assert (meta["grid_h"], meta["grid_w"], meta["image_size"], meta["split"]) == (8, 8, 64, split)
        assert meta["model_type"] == "qwen2_5_vl" and Path(meta["model"]).name == "tiny"
        assert meta["features_config"]["batch_size"] == 16 and len(meta["image_paths"]) == count
        stats = read_json(default_run / f"results/features/{split}_stats.json")
        assert stats["images"] == count and 1 <= stats["rank_90"] <= stats["rank_99"] <= 64


def test_tampering_is_learnable_from_the_features(default_run):
    """A small probe on cached tokens localises tampering above chance by the learned margin: the data carries a real
    signal."""

    def tokens(split):
        tensors, _ = load_tensors(default_run / f"results/features/{split}.safetensors")
        return tensors["features"].flatten(0, 1).numpy(), (tensors["token_masks"].flatten() > 0.5).numpy()

    (x_train, y_train), (x_test, y_test) = tokens("train"), tokens("test")
    scaler = StandardScaler().fit(x_train)
    probe = MLPClassifier((64,), max_iter=300, random_state=0).fit(scaler.transform(x_train), y_train)
    assert roc_auc_score(y_test, probe.predict_proba(scaler.transform(x_test))[:, 1]) > CHANCE + LEARNED


def test_report_is_self_contained(default_run):
    page = (default_run / REPORT).read_text()
    for heading in ("Provenance", "Dataset", "Vision features", "Detection head", "Low-rank feature decomposition",
                    "Teacher full fine-tune", "Is ΔW low-rank?", "LoRA ablation grid", "config hash",
                    "package versions"):
        assert heading in page
    assert page.count("data:image/png;base64,") >= 2 + 1 + 2 * len(ARCHS) + 2
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script src" not in page


def test_every_job_wrote_its_log_and_benchmark(default_run):
    jobs = ["build_tiny_model", "prepare_model", "make_synthetic_dataset", "prepare_dataset", "pretrain_head",
            "train_teacher", "export_delta", "report"]
    jobs += [f"extract_features_{split}" for split in ("train", "val", "test")]
    jobs += [f"compare_lowrank_{arch}" for arch in ARCHS]
    logs = [f"results/logs/{job}.log" for job in jobs] + [f"results/lowrank/{arch}/train.log" for arch in ARCHS]
    for log in logs:
        assert (default_run / log).is_file(), log
    for job in jobs + [f"train_lowrank_proj_{arch}" for arch in ARCHS]:
        assert (default_run / f"results/benchmarks/{job}.tsv").read_text().startswith("s\t"), job


def test_head_learns_to_detect_and_localise(default_run):
    metrics = read_json(default_run / "results/head/metrics.json")
    test = metrics["test"]
    assert test["classification"]["roc_auc"] > 0.75 and test["classification"]["n"] == 96
    assert test["pixel"]["pixel_iou"] > test["pixel"]["all_zero"]["pixel_iou"] + 0.1
    history = pd.read_csv(default_run / "results/head/history.csv")
    assert list(history["phase"].unique()) == ["warm", "joint"] and len(history) == 3 + 15
    assert history[history["phase"] == "joint"]["val_roc_auc"].max() == metrics["best_val_roc_auc"]
    head = load_head(default_run / "results/head/head.safetensors")
    assert head.init_args == {"in_dim": 64, "hidden": 64, "dropout": 0.1}


@pytest.mark.parametrize("arch", ARCHS)
def test_each_lowrank_net_learns_and_never_beats_the_svd(default_run, arch):
    history = read_json(default_run / f"results/lowrank/{arch}/history.json")
    assert history["best_val_mse"] < history["initial_val_mse"]
    assert history["stop_reason"] in ("early_stopping", "max_epochs") and history["epochs_run"] <= 30
    assert [e["epoch"] for e in history["epochs"]] == list(range(1, history["epochs_run"] + 1))
    comparison = read_json(default_run / f"results/lowrank/{arch}/comparison.json")
    assert comparison["n_samples"] == 96 and comparison["rank"] == 8
    assert comparison["network"]["mse"] >= comparison["svd"]["mse"] > 0
    # it learned: at least half the energy the per-sample SVD (the optimum at its rank) captures; zeros capture none
    assert comparison["network"]["energy_captured"] > 0.5 * comparison["svd"]["energy_captured"]
    assert comparison["ratio"]["mse"] == pytest.approx(comparison["network"]["mse"] / comparison["svd"]["mse"])
    assert comparison["network"]["seconds_per_sample"] > 0 and comparison["svd"]["seconds_per_sample"] > 0
    assert (default_run / f"results/state/lowrank/{arch}/state.safetensors").is_file()


def test_extra_epochs_continue_the_default_run(default_run, tmp_path):
    """Raising `lowrank.extra_epochs` reruns training from the stored state instead of from scratch."""
    workdir = tmp_path / "workflow"
    shutil.copytree(default_run, workdir, symlinks=True)
    before = read_json(workdir / "results/lowrank/MLP/history.json")
    edit = write_yaml(tmp_path / "edit.yaml", "lowrank:\n  extra_epochs: 4\n")
    result = snakemake(workdir, "results/lowrank/MLP/comparison.json", "--configfile", "config/config.yaml", str(edit))
    assert result.returncode == 0, result.stderr[-3000:]
    assert scheduled_jobs(result.stdout + result.stderr) == {"train_lowrank_proj": 1, "compare_lowrank": 1}
    after = read_json(workdir / "results/lowrank/MLP/history.json")
    assert after["segments"][0] == before["segments"][0] and len(after["segments"]) == 2
    assert after["epochs"][: before["epochs_run"]] == before["epochs"]
    assert before["epochs_run"] < after["epochs_run"] <= before["epochs_run"] + 4


def test_teacher_is_a_loadable_fine_tune_with_its_logs(default_run):
    from transformers import AutoModelForImageTextToText

    teacher = default_run / "results/teacher/model"
    history = pd.read_csv(teacher / "history.csv")
    assert list(history["step"]) == list(range(1, TEACHER_STEPS + 1))
    val_loss = history["val_loss"].dropna()
    _, references = tables(default_run)  # on held-out images, below where a model that learned no label would sit
    assert val_loss.min() < min(val_loss.iloc[0], 0.9 * references.loc["teacher", "label_blind_loss"])
    # the report says that it rose again by the end (overfitting) where the rise is beyond the noise of the
    # validation batches, paired batch by batch; not where it is within it
    best, last = (np.array(history.at[index, "val_batch_losses"].split(), float)
                  for index in (val_loss.idxmin(), val_loss.index[-1]))
    rise = stats.ttest_rel(last, best).confidence_interval(0.95)
    warned = "<li>teacher: validation loss rose" in (default_run / REPORT).read_text()
    assert warned == (val_loss.iloc[-1] > 1.05 * val_loss.min() and rise.low > 0)
    print(f"teacher validation loss: lowest {val_loss.min():.3f}, last {val_loss.iloc[-1]:.3f}, rise per batch "
          f"[{rise.low:+.3f}, {rise.high:+.3f}], warned: {warned}")
    model = AutoModelForImageTextToText.from_pretrained(teacher)
    base = AutoModelForImageTextToText.from_pretrained(default_run / "data/models/tiny")
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, base.get_parameter(name))]
    assert any(".visual." in name for name in changed) and any("language_model" in name for name in changed)
    assert list((default_run / "results/tensorboard/teacher").rglob("events.out.tfevents.*"))
    assert (default_run / "results/state/teacher/checkpoint").is_dir()


def test_delta_export_holds_lora_factors_of_the_teachers_change(default_run):
    delta = default_run / "results/delta"
    analysis = read_json(delta / "svd_analysis.json")
    assert analysis["ranks"] == [4, 8, 16, 32] and analysis["groups"]["all"]["modules"] > 0
    assert {"vision", "language"} <= set(analysis["groups"]["by_tower"])
    energy = analysis["groups"]["all"]["energy"]
    assert 0 < energy["4"] <= energy["8"] <= energy["16"] <= energy["32"] <= 1 + 1e-6
    for rank in analysis["ranks"]:
        factors, _ = load_tensors(delta / f"factors_r{rank}.safetensors")
        module = analysis["modules"][0]
        out_features, in_features = module["shape"]
        assert factors[f"{module['name']}.lora_A"].shape == (rank, in_features)
        assert factors[f"{module['name']}.lora_B"].shape == (out_features, rank)
    assert "Energy captured" in (delta / "svd_summary.txt").read_text()


def test_every_arm_is_trained_evaluated_and_collected(default_run):
    table = pd.read_csv(default_run / "results/reports/ablation.csv")
    assert len(table) == ARM_RUNS and not table.duplicated(AXES).any()
    assert set(table["preset"]) == {"light", "standard", "full", "aggressive"}
    assert set(table["init"]) == {"random", "gaussian", "svd", "pissa", "olora"}
    assert set(table["objective"]) == {"head", "head_frozen", "lm", "hybrid", "hybrid_frozen"}
    assert set(table["strategy"]) == {"later_half", "all", "head_only"} and set(table["seed"]) == set(SEEDS)
    for row in table.itertuples():
        arm = default_run / "results/lora" / arm_path(row._asdict())
        assert {"adapter", "history.csv", "train_stats.json", "target_modules.json"} <= {p.name for p in arm.iterdir()}
        assert (arm / "head.safetensors").exists() == (row.objective in ("head", "hybrid"))
        converted = 2 if row.init in ("pissa", "olora") else 1  # saved as plain LoRA of twice the rank
        assert read_json(arm / "adapter" / "adapter_config.json")["r"] == PRESET_RANKS[row.preset] * converted
        assert len(pd.read_csv(arm / "history.csv")) == STEPS and row.trainable_parameters > 0
        settings = read_json(arm / "train_stats.json")["train"]  # what it trained with: lora.train, its own seed
        assert (settings["lr"], settings["max_steps"], settings["seed"]) == (row.lr, STEPS, row.seed)
        assert list((default_run / "results/tensorboard/lora").glob(f"{row.objective}/**/events.out.tfevents.*"))
    references = pd.read_csv(default_run / "results/reports/references.csv").set_index("model")
    assert references.loc["teacher", "trainable_percent"] == 100 and references.loc["base", "trainable_parameters"] == 0
    assert [references.loc[f"teacher_r{rank}", "rank"] for rank in RANKS] == list(RANKS)
    assert (references.loc[[f"teacher_r{rank}" for rank in RANKS], "trainable_parameters"] == 0).all()
    distance = pd.read_csv(default_run / "results/reports/module_distance.csv")
    svd = table[table["init"] == "svd"]
    assert len(distance.merge(svd[AXES])) > 0 and (distance["relative_distance"] >= 0).all()
    assert set(distance["tower"]) <= {"vision", "merger", "language", "lm_head"}
    assert len(pd.read_csv(default_run / "results/reports/ablation_history.csv")) == STEPS * ARM_RUNS


def tables(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ablation.csv, references.csv indexed by model) of a finished run."""
    return (pd.read_csv(run / "results/reports/ablation.csv"),
            pd.read_csv(run / "results/reports/references.csv").set_index("model"))


def beyond_noise(values: pd.Series) -> float:
    """The lower end of a mean over seeds minus two standard errors: a level the runs clear beyond their noise."""
    return values.mean() - 2 * values.std(ddof=1) / len(values) ** 0.5


def test_the_teacher_learns_the_label_through_its_answer(default_run):
    """The full fine-tune answers the tamper question far above chance and above the untrained base, and its training
    loss ends below the label-blind bound, where a model that learned only the answer format would sit."""
    _, references = tables(default_run)
    teacher, base = references.loc["teacher"], references.loc["base"]
    assert teacher["roc_auc"] >= TEACHER_BAR and teacher["roc_auc"] >= base["roc_auc"] + LEARNED
    history = pd.read_csv(default_run / "results/teacher/model/history.csv")
    assert history["loss"].tail(5).mean() < 0.9 * teacher["label_blind_loss"]
    assert 0 < teacher["positive_rate"] < 1  # not one answer for every image


def test_the_untrained_base_answers_the_tamper_question_at_chance(default_run):
    """The pre-trained base can see grain and say the answer words but cannot tell them apart: its test ROC-AUC
    through its answer is within 0.1 of chance and its sampling interval holds chance."""
    _, references = tables(default_run)
    base = references.loc["base"]
    assert abs(base["roc_auc"] - CHANCE) <= 0.1 and base["roc_auc_low"] <= CHANCE <= base["roc_auc_high"]


def test_the_references_carry_their_sampling_interval_and_the_report_judges_the_base_by_it(default_run):
    """Each reference's test ROC-AUC comes with its 95% interval over the test samples (the table's cells are the
    evaluation's); the warnings call the untrained base not blind exactly when its interval lies above chance."""
    _, references = tables(default_run)
    for name, row in references.iterrows():
        metrics = read_json(default_run / f"results/eval/references/{name}.json")["classification"]
        assert row[["roc_auc_low", "roc_auc_high"]].tolist() == pytest.approx(
            [metrics["roc_auc_low"], metrics["roc_auc_high"]]), name
        assert row["roc_auc_low"] <= row["roc_auc"] <= row["roc_auc_high"], name
        assert row["roc_auc_low"] < row["roc_auc_high"] or name == "base", name  # the base scores every image alike
    page = (default_run / REPORT).read_text()
    warnings = page[page.index('<section id="warnings">'):page.index('<section id="dataset">')]
    flagged = "<li>base: test roc_auc" in warnings and "is above chance beyond the test split" in warnings
    assert flagged == (references.loc["base", "roc_auc_low"] > CHANCE)


GRID_KEYS = [*AXES[:-1], "learning_rate", "seed"]  # an arm run's columns in ablation.csv


def html_table(page: str, after: str) -> pd.DataFrame:
    """The first table after the text `after` in a report page, every cell as its text ('–' for a missing value)."""
    table = page[page.index("<table", page.index(after)):]
    table = table[:table.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table[table.index("<tbody>"):])
    return pd.DataFrame([re.findall(r"<td>(.*?)</td>", row) for row in rows],
                        columns=re.findall(r"<th>(.*?)</th>", table))


def assert_shown(cells: pd.Series, values: pd.Series, what: str, digits: int = 4) -> None:
    """Each cell shows its value rounded to `digits` significant digits, or '–' where the value is missing."""
    for cell, value in zip(cells, values):
        if cell == "–":
            assert pd.isna(value), what
        else:
            assert float(cell) == pytest.approx(value, rel=5.01 * 10.0 ** -digits), what


def test_the_reports_tables_show_the_evaluations_numbers(default_run):
    """Every number of the report's grid table is ablation.csv's, every score there is its seed's metrics.json, and
    every reference in the fine-tune table shows references.csv's score and interval: a stale or misplaced number
    fails."""
    table, references = tables(default_run)
    page = (default_run / REPORT).read_text()
    shown = html_table(page, '<section id="lora"').astype({"seed": int})
    merged = shown.merge(table.astype({"learning_rate": str}), on=GRID_KEYS, suffixes=("_shown", ""))
    assert len(shown) == len(merged) == len(table)
    columns = [column for column in shown.columns if column not in GRID_KEYS and column in table.columns]
    assert {"roc_auc", "delta_distance", "final_loss", "trainable_parameters"} <= set(columns)
    for column in columns:
        if column != "source":
            assert_shown(merged[f"{column}_shown"], merged[column], column)
    for row in table.itertuples():
        metrics = read_json(default_run / "results/eval" / arm_path(row._asdict()) / "metrics.json")
        assert (row.roc_auc, row.final_loss, row.delta_distance) == (
            metrics["classification"]["roc_auc"], metrics["convergence"]["final_loss"],
            metrics["delta"]["relative_distance"])
    fine_tune = html_table(page, "Full fine-tune vs LoRA")
    fine_tune["name"] = fine_tune["model"].str.split(" ").str[0]
    fine_tune = fine_tune.set_index("name").loc[references.index]
    assert_shown(fine_tune["ROC-AUC"], references["roc_auc"], "reference roc_auc")
    low, high = fine_tune["ROC-AUC 95% interval"].str.strip("[]").str.split(", ", expand=True).T.values
    assert_shown(pd.Series(low), references["roc_auc_low"], "interval", digits=3)
    assert_shown(pd.Series(high), references["roc_auc_high"], "interval", digits=3)


def test_a_changed_evaluation_reaches_the_tables_and_the_report_without_a_config_edit(default_run, tmp_path):
    """Rewrite one seed's evaluation, as a rerun of its arm would: collect and the report rerun (no config edit forces
    them) and show the new number."""
    workdir = tmp_path / "workflow"
    shutil.copytree(default_run, workdir, symlinks=True)
    table, _ = tables(workdir)
    row = table.iloc[0]
    evaluation = workdir / "results/eval" / arm_path(row.to_dict()) / "metrics.json"
    metrics = read_json(evaluation)
    metrics["classification"]["roc_auc"] = 0.123456
    evaluation.write_text(json.dumps(metrics))
    result = snakemake(workdir, REPORT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert scheduled_jobs(result.stdout + result.stderr) == {"collect": 1, "report": 1}
    expected = table.copy()
    expected.loc[0, "roc_auc"] = 0.123456
    pd.testing.assert_frame_equal(tables(workdir)[0], expected)
    shown = html_table((workdir / REPORT).read_text(), '<section id="lora"').astype({"seed": int})
    cell = shown.merge(pd.DataFrame([row[GRID_KEYS]]).astype({"learning_rate": str, "seed": int}), on=GRID_KEYS)
    assert cell["roc_auc"].tolist() == ["0.1235"]


def test_every_objectives_baseline_arm_learns_beyond_noise(default_run):
    """For each objective, the baseline arm (full / random / later_half) scores above the base beyond its seed noise
    and by the learned margin on average; every baseline adapter moved from its start; the lm arm's loss falls and it
    gives both answers; the fresh-head arm detects well."""
    table, references = tables(default_run)
    baseline = table[(table["preset"] == "full") & (table["init"] == "random")
                     & (table["strategy"] == "later_half")]
    scores = baseline.groupby("objective")["roc_auc"]
    assert set(scores.groups) == {"head", "head_frozen", "lm", "hybrid", "hybrid_frozen"}
    base = references.loc["base", "roc_auc"]
    for objective, values in scores:
        assert len(values) == len(SEEDS) and beyond_noise(values) > base and values.mean() >= base + LEARNED, objective
    assert scores.mean()["head"] >= 0.75
    for row in baseline.itertuples():  # every adapter moved from its start (B = 0 under the random init)
        adapter = safetensors.torch.load_file(default_run / "results/lora" / arm_path(row._asdict()) / "adapter"
                                              / "adapter_model.safetensors")
        assert any(tensor.abs().max() > 0 for name, tensor in adapter.items() if "lora_B" in name), row
    lm = baseline[baseline["objective"] == "lm"]
    assert (lm["final_loss"] < lm["initial_loss"]).all() and (lm["positive_rate"].between(0, 1, "neither")).any()


def test_svd_init_reaches_the_target_sooner_and_ends_closer_to_the_teacher(default_run):
    """The SVD-init study's two claims, paired per seed (same seed, same data order) on the lm baseline: the svd arm
    reaches the target loss sooner than the random one (never reaching it counts as never) and ends closer to the
    teacher in ‖ΔW_student − ΔW_teacher‖ / ‖ΔW_teacher‖."""
    table, _ = tables(default_run)
    lm = table[(table["objective"] == "lm") & (table["preset"] == "full") & (table["strategy"] == "later_half")]
    lm = lm.set_index(["init", "seed"])
    for seed in SEEDS:
        svd, random = lm.loc[("svd", seed)], lm.loc[("random", seed)]
        assert svd["steps_to_target"] > 0 and not random["steps_to_target"] <= svd["steps_to_target"]
        assert svd["delta_distance"] < random["delta_distance"]


def test_the_task_is_not_trivial(default_run):
    """The arms lie between the base and the teacher (within their sampling intervals) instead of all sitting at a
    perfect score."""
    table, references = tables(default_run)
    means = table.groupby(AXES[:-1])["roc_auc"].mean()
    assert means.max() < 0.99
    assert means.between(references.loc["base", "roc_auc_low"], references.loc["teacher", "roc_auc_high"]).all()


def test_the_arms_spread_out(default_run):
    """The study discriminates: the arms' mean test ROC-AUC spreads over more than 0.05."""
    table, _ = tables(default_run)
    means = table.groupby(AXES[:-1])["roc_auc"].mean()
    assert means.max() - means.min() > 0.05


def test_the_report_leads_with_findings_and_does_not_call_the_teacher_unlearned(default_run):
    """Findings first, then warnings; on the default, none says the teacher did not learn the task, and none names a
    baseline arm."""
    page = (default_run / REPORT).read_text()
    sections = [page.index(f'<section id="{name}">') for name in ("findings", "warnings", "dataset")]
    assert sections == sorted(sections) and page.index("<section") == sections[0] < page.index('id="provenance"')
    warnings = re.findall(r"<li>(.*?)</li>", page[sections[1]:sections[2]])
    assert warnings and not [line for line in warnings if line.startswith("teacher:") and "did not learn" in line]
    baselines = [f"{objective}/full/random/later_half:" for objective in ("lm", "head", "hybrid")]
    assert not [line for line in warnings if line.startswith(tuple(baselines))]
    # a frozen-head arm is flagged exactly when its seeds' 95% t-interval does not lie above the head alone's score
    runs, _ = tables(default_run)
    head = read_json(default_run / "results/head/metrics.json")["test"]["classification"]["roc_auc"]
    frozen = runs[runs["objective"].str.endswith("_frozen")].groupby(["objective", "preset", "init", "strategy"])
    expected = {"/".join(arm) for arm, seeds in frozen["roc_auc"]
                if stats.t.interval(0.95, len(seeds) - 1, loc=seeds.mean(), scale=stats.sem(seeds))[0] <= head
                or seeds.std() == 0 and seeds.mean() <= head}
    flagged = {line.split(":")[0] for line in warnings if "added nothing measurable to the frozen head" in line}
    assert flagged == expected
    print(f"pre-trained head alone: test roc_auc {head:.3f}; frozen-head arms flagged: {sorted(flagged)}")


def test_the_frozen_head_baselines_add_to_their_head(default_run):
    """Neither frozen-head baseline is flagged: their adapters add to the pre-trained head they keep beyond noise."""
    page = (default_run / REPORT).read_text()
    warnings = page[page.index('<section id="warnings">'):page.index('<section id="dataset">')]
    assert not [name for name in ("head_frozen", "hybrid_frozen") if f"<li>{name}/full/random/later_half:" in warnings]


def test_the_console_shows_snakemakes_progress_and_leaves_job_output_to_the_logs(default_run):
    console = (default_run.parent / "console.txt").read_text()
    assert "steps (100%) done" in console
    assert "Warning" not in console and not re.search(r"step/s|it/s|batch/s|epoch/s", console)
    teacher_log = (default_run / "results/logs/train_teacher.log").read_text()
    assert "train: 100%" in teacher_log and "INFO lowrank_core" in teacher_log


def job_starts(workdir: Path) -> list[tuple[str, dict]]:
    """(rule, wildcards) of every job of the run that built the results, in the order the jobs started."""
    log = min((workdir / ".snakemake" / "log").glob("*.snakemake.log"))  # the first (timestamped names): the run
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", log.read_text())[1:]:
        wildcards = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        jobs.append((re.match(r"(?:local)?rule (\w+):", block).group(1),
                     dict(pair.split("=", 1) for pair in wildcards.group(1).split(", ")) if wildcards else {}))
    return jobs


def test_the_teacher_and_the_long_arms_start_first(default_run):
    """The rule priorities at work: the teacher, which the ΔW export, the references and every arm wait for, starts
    as soon as the dataset is prepared (with the first feature extraction, not after the feature users), and every
    arm whose loss runs through the language model starts before the first head-only arm."""
    jobs = job_starts(default_run)
    rules = [rule for rule, _ in jobs]
    assert rules.index("train_teacher") < [i for i, rule in enumerate(rules) if rule == "extract_features"][1]
    arms = [(i, wildcards["objective"]) for i, (rule, wildcards) in enumerate(jobs) if rule == "train_lora"]
    head_only = [i for i, objective in arms if objective in ("head", "head_frozen")]
    through_the_lm = [i for i, objective in arms if objective not in ("head", "head_frozen")]
    assert len(head_only) == HEAD_ARMS - HYBRID_ARMS and len(through_the_lm) == ARMS - len(head_only)
    assert max(through_the_lm) < min(head_only)


@pytest.mark.parametrize("key", ["model", "dataset"])
def test_a_source_that_does_not_exist_fails_before_any_job_instead_of_reporting_old_results(default_run, tmp_path,
                                                                                           key):
    """The finished run's outputs would look up to date: the missing source must stop the workflow first."""
    before = {path: path.stat().st_mtime_ns for path in (default_run / "results").rglob("*")}
    edit = write_yaml(tmp_path / "edit.yaml", f"{key}:\n  source: {tmp_path / 'moved'}\n")
    result = snakemake(default_run, REPORT, "--configfile", "config/config.yaml", str(edit))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].endswith(f"{key}.source: {tmp_path / 'moved'} is not a directory "
                                                   f"({'a local checkpoint' if key == 'model' else 'of annotation files'}"
                                                   f", or '{'tiny' if key == 'model' else 'synthetic'}')")
    assert {path: path.stat().st_mtime_ns for path in (default_run / "results").rglob("*")} == before


def test_a_rerun_without_changes_does_nothing(default_run):
    result = snakemake(default_run, "-n", REPORT)
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


EDITS = [
    ("features:\n  batch_size: 8\n",  # a new pre-trained head: the frozen-head arms rerun too
     {"extract_features": 3, **FEATURE_USERS, "train_lora": FROZEN_HEAD_ARMS,
      "collect": 1, "report": 1, "all": 1}),
    ("dataset:\n  synthetic:\n    seed: 7\n",
     {"make_synthetic_dataset": 1, "prepare_dataset": 1, "extract_features": 3, **FEATURE_USERS, **TEACHER,
      **ALL_ARMS, "report": 1, "all": 1}),
    ("model:\n  tiny:\n    seed: 7\n",
     {"build_tiny_model": 1, "prepare_model": 1, "extract_features": 3, **FEATURE_USERS, **TEACHER, **ALL_ARMS,
      "report": 1, "all": 1}),
    ("head:\n  hidden: 32\n", {"pretrain_head": 1, "train_lora": HEAD_ARMS, "collect": 1,
                                 "report": 1, "all": 1}),
    ("lowrank:\n  extra_epochs: 5\n", {"train_lowrank_proj": 3, "compare_lowrank": 3, "report": 1, "all": 1}),
    ("lowrank:\n  archs: [MLP]\n", {"report": 1, "all": 1}),
    # every arm is measured against the teacher: all rerun (only the svd arms train again, the rest resume)
    ("teacher:\n  max_steps: 50\n", {**TEACHER, "train_lora": ARMS,
                                       "evaluate_references": 1, "collect": 1, "report": 1, "all": 1}),
    ("delta:\n  ranks: [4, 8]\n", {"export_delta": 1, "train_lora": SVD_ARMS,
                                    "evaluate_references": 1, "collect": 1, "report": 1, "all": 1}),
    ("lora:\n  train_by_objective: {head_frozen: {lr: 0.001}}\n",  # every head_frozen arm, nothing else
     {"train_lora": HEAD_FROZEN_ARMS, "collect": 1, "report": 1, "all": 1}),
    ("lora:\n  presets:\n    light: {r: 3}\n", {"train_lora": LIGHT_ARMS, "collect": 1,
                                                   "report": 1, "all": 1}),
    ("lora:\n  fusion_tokens: 3\n", {"train_lora": HYBRID_ARMS, "collect": 1, "report": 1, "all": 1}),
    ("lora:\n  target_loss: {lm: 0.4}\n", {"train_lora": LM_ARMS, "collect": 1, "report": 1, "all": 1}),
    # a new seed reruns every arm's job (its finished seeds resume from their last checkpoint)
    ("lora:\n  grid:\n    seeds: [0, 1, 2, 3]\n", {"train_lora": ARMS, "collect": 1,
                                                      "report": 1, "all": 1}),
    ("resources:\n  extract_features:\n    mem_mb: 3000\n", {}),
]


@pytest.fixture(scope="module")
def edit_dry_runs(default_run, tmp_path_factory) -> dict:
    """A dry run of the finished run for each of EDITS, run at once (a dry run only plans): the runs by edit."""
    root = tmp_path_factory.mktemp("edits")
    runs = {override: (default_run, ("-n", "--configfile", "config/config.yaml",
                                      str(write_yaml(root / f"edit{i}.yaml", override))))
            for i, (override, _) in enumerate(EDITS)}
    return snakemake_many(runs)


@pytest.mark.parametrize("override, expected", EDITS)
def test_a_config_edit_reruns_exactly_its_stage_and_descendants(edit_dry_runs, override, expected):
    result = edit_dry_runs[override]
    assert result.returncode == 0, result.stderr[-3000:]
    assert scheduled_jobs(result.stdout + result.stderr) == expected


def test_bad_config_fails_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    edit = write_yaml(tmp_path / "edit.yaml", "features:\n  batch_size: -1\n")
    result = snakemake(workdir, "--configfile", "config/config.yaml", str(edit))
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1] == "ConfigError: features.batch_size: -1 is less than the minimum of 1"
    assert not (workdir / "results").exists() and not (workdir / "data").exists()


# Stand-ins for the examples' checkpoints: each real model's config (its module tree, checked when the workflow
# starts), without weights
STAND_IN_CONFIGS = {
    "qwen2_5_vl_7b_forgery": transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2),
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4)),
    "qwen3_vl_2b_presets": transformers.Qwen3VLConfig(
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                           patch_size=16, deepstack_visual_indexes=[5, 11, 17]),
        text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128), tie_word_embeddings=True),
    "qwen2_5_math_svd_init": transformers.Qwen2Config(  # Qwen2.5-Math-7B-Instruct
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2_5_text_svd_init": transformers.Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        tie_word_embeddings=True),
    "depth_eth3d": transformers.DepthAnythingConfig(  # Depth-Anything-V2-Metric-Outdoor-Small
        backbone_config=transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                                  patch_size=14, image_size=518, out_indices=[3, 6, 9, 12],
                                                  reshape_hidden_states=False),
        reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64,
        depth_estimation_type="metric", max_depth=80),
    "depth_eth3d_vggt": {"img_size": 518, "patch_size": 14, "embed_dim": 1024},  # VGGT's init arguments
}


# 8 images a split: AdaLoRA's allocator warm-ups must fit the low-rank run (30 epochs of one batch), and a teacher
# batch the training split can fill
SMALL_DATASET = "lowrank:\n  allocator_init_warmup: 5\n  allocator_final_warmup: 5\nteacher:\n  batch_size: 8\n"


@pytest.mark.parametrize("field, value, message", [
    ("label", 3, "'label' must be 0 (real) or 1 (tampered), got 3"),
    ("mask_path", "64by64", "'mask_path' '64by64' is neither \"HxW\" nor an existing file"),
])
def test_a_bad_record_fails_in_the_dataset_job_before_any_other(tmp_path, field, value, message):
    """The records are checked by the first job: a bad one stops the run there, without a manifest or a traceback."""
    from PIL import Image

    workdir = copy_workflow(tmp_path / "workflow")
    data = tmp_path / "user_data"
    data.mkdir()
    for split in ("train", "val", "test"):
        records = []
        for index in range(8):
            Image.new("RGB", (64, 64), (index * 30, 0, 0)).save(data / f"{split}{index}.png")
            records.append({"image_path": f"{split}{index}.png", "label": index % 2, "mask_path": "64x64"})
        if split == "val":
            records[3][field] = value
        (data / f"{split}.json").write_text(json.dumps(records))
    edit = write_yaml(tmp_path / "edit.yaml", f"dataset:\n  source: {data}\n{SMALL_DATASET}")
    result = snakemake(workdir, REPORT, "--configfile", "config/config.yaml", str(edit))
    assert result.returncode == 1
    line = f"DataError: {data / 'val.json'}: record 3: {message}"  # the job's one line, on the terminal too
    assert [text for text in result.stderr.splitlines() if text.startswith(line)], result.stderr[-2000:]
    assert sorted(path.name for path in (workdir / "results/logs").iterdir()) == ["prepare_dataset.log"]
    assert "Traceback" not in (workdir / "results/logs/prepare_dataset.log").read_text()
    assert not (workdir / "results/dataset/manifest.json").exists() and not (workdir / "data").exists()


@pytest.mark.parametrize("example", sorted((REPO / "config/examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_validate_and_dry_run(tmp_path, example):
    """Each example, pointed at a stand-in checkpoint (its model's config) and dataset (where it names local ones),
    validates and builds its DAG."""
    from lowrank_core.modalities.depth.synthetic import SyntheticScenesSpec, generate_synthetic_eth3d

    workdir = copy_workflow(tmp_path / "workflow")
    default = yaml.safe_load((REPO / "config/config.yaml").read_text())  # an example may be an overlay on it
    settings = yaml.safe_load(example.read_text())
    settings = {section: {**default[section], **settings.get(section, {})} for section in ("model", "dataset")}
    modality = settings["model"]["modality"]
    local = ""
    if settings["model"]["source"] != "tiny":
        checkpoint = tmp_path / "checkpoint"
        stand_in = STAND_IN_CONFIGS[example.stem]
        if isinstance(stand_in, dict):  # a VGGT checkpoint: its init arguments and weights
            checkpoint.mkdir()
            (checkpoint / "config.json").write_text(json.dumps(stand_in))
            (checkpoint / "model.safetensors").write_bytes(b"")
        else:
            stand_in.save_pretrained(checkpoint)
        local += f"model:\n  source: {checkpoint}\n"
    if settings["dataset"]["source"] != "synthetic":
        data = tmp_path / "data"
        if modality == "depth":  # scenes in the ETH3D layout, whichever their names
            generate_synthetic_eth3d(data, SyntheticScenesSpec(scenes=2, images_per_scene=60))
            local += f"dataset:\n  source: {data}\n  eth3d:\n    scenes: []\n"
        else:
            data.mkdir()
            for split in ("train", "val", "test"):
                (data / f"{split}.json").write_text(json.dumps([{}] * 256))  # records are checked by the dataset job
            local += f"dataset:\n  source: {data}\n"
    configs = [str(example), *([str(write_yaml(tmp_path / "local.yaml", local))] if local else [])]
    result = snakemake(workdir, "-n", "--configfile", *configs)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = scheduled_jobs(result.stdout + result.stderr)
    tiny = settings["model"]["source"] == "tiny"
    assert ("build_tiny_model" in jobs) == tiny and ("make_synthetic_dataset" in jobs) == tiny
    assert jobs["prepare_model"] == 1 and jobs["report"] == 1
    vision = modality == "vision_language"
    assert jobs.get("extract_features", 0) == (3 if vision else 0)
    assert jobs.get("pretrain_head", 0) == int(vision) and (jobs.get("compare_lowrank", 0) > 0) == vision
    assert jobs["train_teacher"] == jobs["export_delta"] == jobs["collect"] == 1
    assert jobs["train_lora"] > 0 and jobs["evaluate_references"] == 1


def test_lint_is_clean():
    result = snakemake(REPO, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr



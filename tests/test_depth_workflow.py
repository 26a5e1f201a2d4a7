"""The depth study end to end on its tiny example (a tiny Depth Anything, synthetic ETH3D facades): every stage runs,
the teacher and every strategy learn, strategies A < B < C in trainable parameters, and the report shows them."""

import re
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import REPORT, copy_workflow, grid_tables, run_to_report, scheduled_jobs, snakemake, write_yaml
from lowrank_core.io import read_json

EXAMPLE = "config/examples/depth_eth3d_tiny.yaml"
STRATEGIES = ("head_only", "later_half", "all")  # A, B, C
DEPTH_COLUMNS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "mae", "delta1", "delta2", "delta3")
LEARNED = 0.9  # a model that learned depth ends at or below this fraction of the untrained base's test AbsRel


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory) -> Path:
    return run_to_report(tmp_path_factory.mktemp("depth"), EXAMPLE)[0]


def test_the_teacher_and_every_strategy_beat_the_untrained_base(depth_run):
    runs, references = grid_tables(depth_run)
    base = references.at["base", "abs_rel"]
    assert references.at["teacher", "abs_rel"] <= LEARNED * base
    assert references.at["teacher", "delta1"] > references.at["base", "delta1"]
    means = runs.groupby("strategy")["abs_rel"].mean()
    assert set(means.index) == set(STRATEGIES)
    for strategy, abs_rel in means.items():
        assert abs_rel <= LEARNED * base, f"{strategy}: test AbsRel {abs_rel:.4f} against the base's {base:.4f}"


def test_trainable_parameters_rise_from_strategy_a_to_c_and_only_layers_peft_takes_get_adapters(depth_run):
    runs, _ = grid_tables(depth_run)
    trainable = runs[runs["init"] == "random"].groupby("strategy")["trainable_parameters"].first()
    assert trainable["head_only"] < trainable["later_half"] < trainable["all"]
    for strategy in STRATEGIES:
        arm = depth_run / f"results/lora/depth/full/random/{strategy}/lr_default/seed0"
        targets = read_json(arm / "target_modules.json")  # PEFT's adapter_config.json shortens long lists to suffixes
        with safe_open(arm / "adapter/adapter_model.safetensors", "pt") as adapter:
            adapted = {re.sub(r"^base_model\.model\.|\.lora_[AB]\.weight$", "", key) for key in adapter.keys()}
        assert adapted == set(targets)
        assert (strategy == "head_only") == all(name.startswith("head.") for name in targets)


def test_metrics_tables_and_report(depth_run):
    runs, references = grid_tables(depth_run)
    assert set(DEPTH_COLUMNS) <= set(runs.columns) and set(DEPTH_COLUMNS) <= set(references.columns)
    assert runs[list(DEPTH_COLUMNS)].notna().all().all()
    assert len(runs) == 2 * 3 * len(STRATEGIES)  # product of 2 inits x 3 strategies, 3 seeds each
    assert (runs["delta1"] <= runs["delta2"]).all() and (runs["delta2"] <= runs["delta3"]).all()
    manifest = read_json(depth_run / "results/dataset/manifest.json")
    assert {split: info["count"] for split, info in manifest["splits"].items()} == {"train": 39, "val": 6, "test": 6}
    page = (depth_run / REPORT).read_text()
    assert '<section id="depth">' in page and '<section id="findings">' in page
    assert "AbsRel" in page or "abs_rel" in page
    for stage in ("extract_features", "pretrain_head", "train_lowrank_proj"):
        assert not (depth_run / "results/logs" / f"{stage}.log").exists()


def test_an_evaluation_setting_reruns_the_evaluations_not_the_teacher(depth_run, tmp_path):
    """`depth.alignment` is read by evaluation only: the arms and references rerun, the teacher and ΔW do not."""
    edit = write_yaml(tmp_path / "edit.yaml", "depth:\n  alignment: median\n")
    result = snakemake(depth_run, "-n", REPORT, "--configfile", EXAMPLE, str(edit))
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = scheduled_jobs(result.stdout + result.stderr)
    assert jobs == {"train_lora": 2 * len(STRATEGIES), "evaluate_references": 1, "collect": 1, "report": 1}, jobs


def test_a_broken_scene_fails_before_any_job_naming_its_file(tmp_path):
    """A scene whose calibration lacks points3D.txt stops the run when the workflow starts (counting the training
    windows reads every scene's calibration), with one line naming the file."""
    from lowrank_core.modalities.depth.synthetic import SyntheticScenesSpec, generate_synthetic_eth3d

    workdir = copy_workflow(tmp_path / "workflow")
    data = generate_synthetic_eth3d(tmp_path / "eth3d", SyntheticScenesSpec(scenes=1))
    missing = next(data.glob("*/dslr_calibration_undistorted/points3D.txt"))
    missing.unlink()
    edit = write_yaml(tmp_path / "edit.yaml", f"dataset:\n  source: {data}\n")
    result = snakemake(workdir, REPORT, "--configfile", EXAMPLE, str(edit))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"DataError: {missing}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "results").exists() and not (workdir / "data").exists()

"""Shared fixtures: a built tiny model, and copies of the workflow to run Snakemake in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "rules", "workflow_scripts", "config", "environment.yml")
REPORT = "results/reports/ablation.html"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> Path:
    """A clean copy of the workflow run to the report on the default config (its console output in console.txt
    beside it): the workflow tests read it, the SLURM slice starts from its built inputs and compares with it."""
    workdir, result = run_to_report(tmp_path_factory.mktemp("run"))
    (workdir.parent / "console.txt").write_text(result.stdout + result.stderr)
    return workdir


@pytest.fixture(scope="session")
def tiny_model_dir(default_run) -> Path:
    """The default's tiny model (`TinyModelSpec()`, pre-trained), as the default run built it."""
    import yaml

    from lowrank_core.modeling import ModelConfig, TinyModelSpec

    default = yaml.safe_load((REPO / "config/config.yaml").read_text())["model"]
    assert ModelConfig.from_dict(default).tiny == TinyModelSpec()  # what the unit tests take its shape to be
    return default_run / "data/models/tiny"


def vision_inputs(root: Path, model_dir: Path, image_size: int, train: int, val: int, test: int) -> tuple[Path, Path]:
    """(model_info_json, manifest_json) for the model in `model_dir` and a synthetic dataset of these split sizes."""
    from lowrank_core.data import SyntheticSpec, generate_synthetic, validate_dataset
    from lowrank_core.io import write_json

    files = generate_synthetic(root / "data", SyntheticSpec(image_size=image_size, train=train, val=val, test=test))
    write_json(root / "manifest.json", validate_dataset(files))
    write_json(root / "model.json", {"path": str(model_dir), "dtype": "float32", "modality": "vision_language"})
    return root / "model.json", root / "manifest.json"


def launch_data_parallel(target: str, args: str, processes: int = 2) -> None:
    """Run `launch(target, *args, processes=processes)` in a fresh single-threaded Python (accelerate's launcher needs
    a process without an Accelerator yet); `target` is "module:function", `args` the Python source of its arguments,
    which may use TrainConfig and ArmConfig."""
    module, function = target.split(":")
    script = (f"import torch; torch.set_num_threads(1)\n"
              f"from lowrank_core.distributed import launch\n"
              f"from lowrank_core.lora import ArmConfig\n"
              f"from lowrank_core.training import TrainConfig\n"
              f"from {module} import {function}\n"
              f"launch({function}, {args}, processes={processes})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]


def copy_workflow(dest: Path) -> Path:
    """A fresh copy of the workflow (as in a clean clone) under `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest / name)
    return dest


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run snakemake in `workdir`; returns the completed process (stdout and stderr merged)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=3600)  # a hang guard: the default takes 9-19 min on 2 cores


def snakemake_many(runs: dict[str, tuple[Path, tuple[str, ...]]]) -> dict[str, subprocess.CompletedProcess]:
    """`snakemake(workdir, *args)` for each named run, as many at once as there are CPUs (a run that stops at start-up
    is one thread of imports and checks); the completed runs by name."""
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        futures = {name: pool.submit(snakemake, workdir, *args) for name, (workdir, args) in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def run_to_report(root: Path, *configfiles: str) -> tuple[Path, subprocess.CompletedProcess]:
    """A clean copy of the workflow under `root` run to the report, on the default config or with `configfiles`;
    fails the test unless it succeeded. Returns the workflow directory and the run."""
    workdir = copy_workflow(root / "workflow")
    result = snakemake(workdir, REPORT, *(("--configfile", *configfiles) if configfiles else ()))
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result


def grid_tables(workdir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A finished run's arm table (axes read as text) and its reference table (indexed by model)."""
    return (pd.read_csv(workdir / "results/reports/ablation.csv", dtype={"preset": str, "learning_rate": str}),
            pd.read_csv(workdir / "results/reports/references.csv").set_index("model"))


def scheduled_jobs(output: str) -> dict[str, int]:
    """The job counts of a (dry) run's 'Job stats' table."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", output, re.S)
    if not match:
        return {}
    return {name: int(count) for name, count in (line.split() for line in match.group(1).splitlines())}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def assert_reloads_to_trained(trained, adapter_dir: Path, model_dir: Path, batch: dict) -> None:
    """A saved adapter on a fresh base reproduces the trained student's logits (as is and merged), which differ from
    the base's."""
    from peft import PeftModel

    from lowrank_core.modeling import load_model

    reloaded = PeftModel.from_pretrained(load_model(model_dir), adapter_dir)
    with torch.no_grad():
        expected = trained.eval().model(**batch).logits
        torch.testing.assert_close(reloaded.eval()(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(reloaded.merge_and_unload()(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(load_model(model_dir)(**batch).logits, expected, atol=1e-3)

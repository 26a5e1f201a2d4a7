"""Shared fixtures: a built tiny model, and copies of the workflow to run Snakemake in."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "rules", "workflow_scripts", "config", "environment.yml")

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from lowrank_core.modeling import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", TinyModelSpec())


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
                          timeout=1200)


def scheduled_jobs(output: str) -> dict[str, int]:
    """The job counts of a (dry) run's 'Job stats' table."""
    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", output, re.S)
    if not match:
        return {}
    return {name: int(count) for name, count in (line.split() for line in match.group(1).splitlines())}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

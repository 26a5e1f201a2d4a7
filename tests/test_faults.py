"""Jobs that survive faults and share the machine: a SIGKILLed training job resumes, threads never oversubscribe."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_workflow, snakemake, write_yaml
from lowrank_core.io import read_json

TEACHER = "results/teacher/model"
# 30 steps with a checkpoint every 10: a kill costs at most 9 steps of work; the tiny base is not pre-trained (resuming
# does not need a base that can see)
NOT_PRETRAINED = "model:\n  tiny:\n    pretrain_vision_steps: 0\n    pretrain_language_steps: 0\n"
SETTINGS = "teacher:\n  max_steps: 30\n  checkpoint_every: 10\n" + NOT_PRETRAINED


def start_snakemake(workdir, *args) -> subprocess.Popen:
    """Snakemake in its own process group, so that a SIGKILL reaches it and every job it started."""
    command = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    return subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
def test_a_teacher_killed_mid_training_resumes_to_the_same_weights(tmp_path):
    reference = copy_workflow(tmp_path / "reference")
    edit = write_yaml(tmp_path / "edit.yaml", SETTINGS)
    done = snakemake(reference, TEACHER, "--configfile", "config/config.yaml", str(edit))
    assert done.returncode == 0, done.stderr[-3000:]

    workdir = copy_workflow(tmp_path / "killed")
    job = start_snakemake(workdir, TEACHER, "--configfile", "config/config.yaml", str(edit))
    checkpoints = workdir / "results/state/teacher/checkpoint"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("step-*")) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, "the job finished before its first checkpoint"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (workdir / TEACHER).exists()  # no half-written declared output

    resumed = snakemake(workdir, TEACHER, "--configfile", "config/config.yaml", str(edit))  # stale lock: Snakemake
    if "cannot be locked" in resumed.stdout + resumed.stderr:  # refuses until told the old run is gone
        snakemake(workdir, "--unlock", "--configfile", "config/config.yaml", str(edit))
        resumed = snakemake(workdir, TEACHER, "--configfile", "config/config.yaml", str(edit))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    summary = read_json(workdir / TEACHER / "train_summary.json")
    assert summary["resumed_from_step"] >= 10 and summary["resumed_from_step"] % 10 == 0
    print(f"\nkilled after the step-{summary['resumed_from_step']} checkpoint; resumed from step "
          f"{summary['resumed_from_step']} of 30 (at most 9 steps of work lost)")
    expected, actual = (load_file(root / TEACHER / "model.safetensors") for root in (reference, workdir))
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    columns = ["step", "loss", "lr", "val_loss", "val_batch_losses"]
    pd.testing.assert_frame_equal(pd.read_csv(workdir / TEACHER / "history.csv")[columns],
                                  pd.read_csv(reference / TEACHER / "history.csv")[columns])


def test_more_cores_than_cpus_never_oversubscribes(tmp_path):
    """`--cores 8` on a smaller machine: each job claims enough cores that the jobs running together fit the CPUs,
    and no job runs more torch threads than the CPUs."""
    cpus = len(os.sched_getaffinity(0))
    workdir = copy_workflow(tmp_path / "workflow")
    edit = write_yaml(tmp_path / "edit.yaml", NOT_PRETRAINED)  # the claims, not the model, are under test
    done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "8", "results/model/model.json",
                           "--configfile", "config/config.yaml", str(edit)], cwd=workdir,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    claims = {int(n) for n in re.findall(r"^\s+threads: (\d+)$", done.stdout + done.stderr, re.M)}
    # resources.build_tiny_model.threads is 2, resources.default.threads (prepare_model's) 1
    assert claims == {min(8, math.ceil(threads * max(1.0, 8 / cpus))) for threads in (2, 1)}
    for job, threads in (("build_tiny_model", 2), ("prepare_model", 1)):
        log = (workdir / f"results/logs/{job}.log").read_text()
        assert f"INFO lowrank_core: {min(threads, cpus)} torch threads" in log, job


LAUNCH_A_BAD_INPUT = """
from lowrank_core.distributed import launch
from lowrank_core.errors import ConfigError
def rejects_its_batch_size():
    raise ConfigError("lora.train.batch_size: must split evenly over the 2 data-parallel processes")
try:
    launch(rejects_its_batch_size, processes=2)
except ConfigError as error:
    print("raised ConfigError:", error)
"""


def test_a_bad_input_error_in_a_data_parallel_process_comes_back_as_one_line():
    # a fresh interpreter: accelerate's launcher refuses to start where an Accelerator already exists
    result = subprocess.run([sys.executable, "-c", LAUNCH_A_BAD_INPUT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == ("raised ConfigError: lora.train.batch_size: must split evenly over the 2 "
                                              "data-parallel processes")

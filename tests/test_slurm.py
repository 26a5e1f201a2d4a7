"""The execution profiles, and a slice of the workflow through a real single-node SLURM with profiles/slurm.

The SLURM test installs Debian's slurm-wlm and munge when they are missing (root and apt-get needed, otherwise it
is skipped with the reason), starts munged, slurmctld and slurmd with a slurm.conf in a temporary directory
(tests/slurm_cluster.py), runs a slice of the default pipeline (dataset -> features -> head, teacher -> one LoRA arm ->
its evaluation) through `snakemake --profile profiles/slurm`, starting from the default run's built tiny model and
synthetic images, and stops the daemons it started. Its results must equal the default run's, and it prints its wall
time next to what the same jobs took there (--cores 2).
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_workflow, scheduled_jobs, write_yaml
from lowrank_core.io import read_json
from slurm_cluster import SingleNodeSlurm, SlurmUnavailable, ensure_installed

ARM = "head_frozen/full/random/later_half/lr_default/seed0"
SLICE = ("results/head/metrics.json", f"results/eval/{ARM}/metrics.json")  # dataset -> ... -> one arm, evaluated
# The slice tests the cluster, not learning: a short teacher (the arm only measures its distance to it).
SHORT_TEACHER = ("teacher:\n  max_steps: 20\n  eval_every: 10\n  checkpoint_every: 10\n"
                 "resources:\n  train_teacher:\n    threads: 2\n")  # to see a 2-CPU allocation too
# One SLURM job per rule job of the slice (its built inputs, data/, are the default run's); the plugin writes
# `rule_<name>[_wildcards_<values>]` as the job comment.
SLICE_JOBS = {"prepare_model": 1, "prepare_dataset": 1, "extract_features": 3, "pretrain_head": 1,
              "train_teacher": 1, "train_lora": 1}
TWO_THREAD_RULES = ("train_teacher",)  # SHORT_TEACHER's resources; the others have the default's 1
# What a cluster without accounting needs (no sacct, no account); the first status check comes after 1 s, the
# plugin's minimum, instead of 40 s. Logs of successful jobs are kept to be checked.
NO_ACCOUNTING = ("--slurm-status-command", "squeue", "--slurm-no-account",
                 "--slurm-init-seconds-before-status-checks", "1", "--slurm-keep-successful-logs")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    # one test cluster per machine at a time: a concurrent run waits here instead of sharing daemons it may stop
    with open(Path(tempfile.gettempdir()) / "lowrank-test-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ensure_installed()
            cluster = SingleNodeSlurm(tmp_path_factory.mktemp("slurm")).start()
        except SlurmUnavailable as reason:
            pytest.skip(f"no SLURM cluster on this machine: {reason}")
        yield cluster
        cluster.stop()


def test_slurm_profile_plans_the_workflow(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    command = [sys.executable, "-m", "snakemake", "--profile", str(REPO / "profiles" / "slurm"), "--dry-run"]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Using profile" in output and scheduled_jobs(output).get("pretrain_head") == 1


GPU_JOBS = """
rule all:
    input: expand("done/{i}", i=range(4))

rule gpu_job:
    output: "done/{i}"
    threads: 1
    resources: gpu=1
    shell: "date +%s.%N > {output}; sleep 1.5; date +%s.%N >> {output}"
"""


@pytest.mark.parametrize("gpus", [1, 2])
def test_local_profile_never_runs_more_gpu_jobs_than_gpus(tmp_path, gpus):
    (tmp_path / "Snakefile").write_text(GPU_JOBS)
    command = [sys.executable, "-m", "snakemake", "--profile", str(REPO / "profiles" / "local")]
    if gpus != 1:  # the profile's N is 1; the command line sets another
        command += ["--resources", f"gpu={gpus}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    spans = [tuple(map(float, path.read_text().split())) for path in (tmp_path / "done").iterdir()]
    most_at_once = max(sum(start <= moment < end for start, end in spans) for moment, _ in spans)
    assert most_at_once == gpus  # 4 one-GPU jobs and 8 cores: the GPUs are the limit


@pytest.mark.slow
def test_slice_runs_through_slurm(slurm, default_run, tmp_path, capsys):
    workdir = copy_workflow(tmp_path / "slurm_run")
    shutil.copytree(default_run / "data", workdir / "data")  # Snakemake keeps the built inputs it finds
    short = ("--configfile", "config/config.yaml", str(write_yaml(tmp_path / "short_teacher.yaml", SHORT_TEACHER)))
    command = [sys.executable, "-m", "snakemake", "--profile", str(REPO / "profiles" / "slurm"), *SLICE,
               *NO_ACCOUNTING, *short]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, env={**slurm.env, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=1800)
    slurm_seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:] + "\n" + slurm.logs()

    # Every job went through sbatch: one SLURM job per rule job, each with its own log.
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", output))
    assert len(submitted) == sum(SLICE_JOBS.values()) == len(set(submitted.values()))
    queue = slurm.run("squeue", "--states=all", f"--name={run_id}", "--noheader", "--format=%i|%k|%T|%C|%m|%l")
    jobs = [line.split("|") for line in queue.stdout.splitlines()]
    assert {job[0] for job in jobs} == set(submitted.values()), queue.stdout + queue.stderr
    rules = [job[1].removeprefix("rule_").split("_wildcards_")[0] for job in jobs]
    assert collections.Counter(rules) == SLICE_JOBS
    for rule, (job_id, comment, state, cpus, memory, time_limit) in zip(rules, jobs):
        # the configured resources (threads 2 or 1, mem_mb 2000, runtime 30) became the job's allocation
        threads = "2" if rule in TWO_THREAD_RULES else "1"
        assert (state, cpus, memory, time_limit) == ("COMPLETED", threads, "2000M", "30:00"), comment
        assert list((workdir / ".snakemake" / "slurm_logs").glob(f"rule_*/**/{job_id}.log")), comment
    if slurm.own_controller:  # and our slurmctld allocated each of them
        log = slurm.controller_log()  # the main scheduler logs "Allocate JobId=N", the backfill one "Started JobId=N"
        assert all(re.search(rf"(Allocate|Started) JobId={job_id} ", log) for job_id in submitted.values()), log[-3000:]

    # The outputs are right: the head learned to detect tampering, the arm was trained and evaluated.
    metrics = read_json(workdir / SLICE[0])
    assert metrics["test"]["classification"]["roc_auc"] > 0.5
    for name in ("head.safetensors", "head.json", "history.csv", "heatmaps.png"):
        assert (workdir / "results" / "head" / name).stat().st_size > 0
    arm_metrics = read_json(workdir / SLICE[1])
    assert arm_metrics["classification"]["roc_auc"] > 0.5 and arm_metrics["cost"]["trainable_parameters"] > 0
    assert (workdir / "results" / "lora" / ARM / "adapter" / "adapter_model.safetensors").is_file()

    # The same results as the default run's jobs (the teacher differs, and the arm does not read it), in the time
    # its jobs took there.
    local_metrics = read_json(default_run / SLICE[0])
    assert metrics["test"]["classification"] == pytest.approx(local_metrics["test"]["classification"])
    local_arm = read_json(default_run / SLICE[1])
    assert arm_metrics["classification"] == pytest.approx(local_arm["classification"], rel=1e-3)
    benchmarks = [default_run / "results/benchmarks" / f"{job}.tsv" for job in
                  ("prepare_model", "prepare_dataset", "pretrain_head", "train_teacher",
                   *(f"extract_features_{split}" for split in ("train", "val", "test")))]
    benchmarks.append(default_run / "results/benchmarks/train_lora" / f"{ARM.rsplit('/', 1)[0]}.tsv")
    local_seconds = sum(float(path.read_text().splitlines()[1].split("\t")[0]) for path in benchmarks)
    with capsys.disabled():
        print(f"\n{' + '.join(SLICE)} ({sum(SLICE_JOBS.values())} jobs): {slurm_seconds:.0f} s through SLURM "
              f"(sbatch per job, squeue polling); the same jobs took {local_seconds:.0f} s together in the default run "
              f"(--cores 2, {os.cpu_count()} CPUs; its 300-step teacher against the slice's 20)")

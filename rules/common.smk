"""Helpers shared by the rules: config slices, resources and the wildcard constraints."""

import glob
import hashlib
import json
import math
import os
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from lowrank_core.errors import ConfigError, exit_on_bad_input
from lowrank_core.grid import DATA_INITS, FROZEN_HEAD_OBJECTIVES, HEAD_ONLY_OBJECTIVES, INITS, OBJECTIVES
from lowrank_core.grid import VISION_OBJECTIVES
from lowrank_core.grid import AXES, arm_path, arm_train_settings, grid_arms, grid_presets, named_entries
from lowrank_core.modalities import INFO


def validate_config():
    """Snakemake's schema validation (filling in defaults), its error as one line naming the key."""
    try:
        validate(config, "../config/schema.yaml", set_default=True)
    except WorkflowError as error:
        invalid = error.__context__  # the jsonschema ValidationError
        key = ".".join(map(str, invalid.absolute_path)) or "(top level)"
        raise ConfigError(f"{key}: {invalid.message}") from None


exit_on_bad_input(validate_config)
SPLITS = ("train", "val", "test")
# `--cores` above this machine's CPUs (the README's `--cores 8` on a 2-core laptop) would run more torch threads
# than CPUs at once: every job's claim is scaled up by the excess, so that the jobs running together never claim
# more than the CPUs; `run_step` caps each job's torch threads at the CPUs.
CORES_PER_CPU = max(1.0, (workflow.resource_settings.cores or 0) / len(os.sched_getaffinity(0)))
MODALITY = INFO[config["model"]["modality"]]  # what the rules need to know of the modality (no torch)
STRATEGIES = MODALITY.strategies.get(config["model"]["backend"], {})  # built-in, over the model's parts
VISION = MODALITY.vision_features  # the feature, detection-head and low-rank projection stages apply
ARCHS = config["lowrank"]["archs"]
ARMS = exit_on_bad_input(grid_arms, config["lora"], MODALITY.objectives, STRATEGIES)  # one entry per arm and seed
SEEDS = config["lora"]["grid"]["seeds"]
ARM = "{objective}/{preset}/{init}/{strategy}/lr_{learning_rate}"  # an arm's place under results/lora, results/eval,
# logs and state (grid.arm_label)
# the untrained base, the full fine-tune, and the base with the teacher's ΔW_r merged for each exported rank
REFERENCES = ("base", "teacher", *(f"teacher_r{rank}" for rank in config["delta"]["ranks"]))
HEAD_LOSS_KEYS = ("hidden", "dropout", "loc_loss", "loc_weight", "threshold")  # what an arm reads of `head`


wildcard_constraints:
    split="|".join(SPLITS),
    arch="|".join(ARCHS),
    objective="|".join(OBJECTIVES),
    init="|".join(INITS),
    preset="[^/]+",
    strategy="[^/]+",
    learning_rate="[^/]+",


def config_slice(*keys):
    """The config entry at `keys` in canonical form (sorted keys, plain types): a rule's `params`."""
    value = config
    for key in keys:
        value = value[key]
    return json.loads(json.dumps(value, sort_keys=True))


def lowrank_settings():
    """The `lowrank` section without `archs`: adding an arch leaves the others' results valid."""
    return {key: value for key, value in config_slice("lowrank").items() if key != "archs"}


def arm_settings(wildcards):
    """What one arm reads of the config: its preset and strategy, its objective's training settings with the arm's
    learning rate, and other settings (its seeds are a separate param)."""
    lora = config_slice("lora")
    settings = {"objective": wildcards.objective, "init": wildcards.init,
                "preset": grid_presets(lora)[wildcards.preset],
                "strategy": named_entries(STRATEGIES, lora["strategies"])[wildcards.strategy],
                "train": arm_train_settings(lora, wildcards.objective, wildcards.learning_rate), **task_settings()}
    if wildcards.objective in VISION_OBJECTIVES:
        settings["head"] = {key: config["head"][key] for key in HEAD_LOSS_KEYS}
    if wildcards.objective.startswith("hybrid"):
        settings |= {key: lora[key] for key in ("fusion_tokens", "lm_weight")}
    if wildcards.init == "pissa":
        settings["pissa_niter"] = lora["pissa_niter"]
    if wildcards.init in DATA_INITS:
        settings[wildcards.init] = lora[wildcards.init]
    return settings


def arm_priority(wildcards):
    """Arms whose loss runs through the language model take the longest (1.5x a head-only arm on the tiny model):
    they start first, so that the grid ends on short jobs rather than on one long job beside idle cores."""
    return int(wildcards.objective not in HEAD_ONLY_OBJECTIVES)


def grid_baseline():
    """The baseline arm the report compares every axis value with: the first entry of each `lora.grid` list."""
    return {axis: ARMS[0][axis] for axis in AXES}  # grid_arms puts it first on either design


def task_settings(training_only=False):
    """What every objective of the modality reads beyond training: the image size where records carry images, the
    modality's own section (`depth`, `sft`), without its evaluation-only keys for `training_only` (the teacher)."""
    settings = {"image_size": config["features"]["image_size"] if MODALITY.image_inputs else None}
    if MODALITY.task:
        section = config_slice(MODALITY.task)
        settings[MODALITY.task] = {key: value for key, value in section.items()
                                   if not (training_only and key in MODALITY.task_evaluation_keys)}
    return settings


def reference_settings():
    """What the reference evaluations read: the LM question / answer words and the threshold, the task settings."""
    words = {key: config["lora"]["train"][key] for key in ("question", "positive_word", "negative_word")}
    return {"objective": MODALITY.reference_objective, "train": words,
            "head": {"threshold": config["head"]["threshold"]}, **task_settings()}


def arm_inputs(wildcards):
    """An arm's inputs beyond model and data: the pre-trained head (frozen-head objectives), ΔW (svd init), the
    general text."""
    inputs = {}
    if wildcards.objective in FROZEN_HEAD_OBJECTIVES:
        inputs["head"] = "results/head/head.safetensors"
    if wildcards.init == "svd":
        inputs["delta"] = "results/delta"
    return inputs | general_text_input()


def general_text_input():
    """The general-text file every evaluation is also scored on (eval.general_text), when there is one."""
    return {"general_text": config["eval"]["general_text"]} if config["eval"]["general_text"] else {}


def experiment_hash():
    """Hash of everything in the config that can change a result (execution resources excluded)."""
    experiment = {key: value for key, value in config.items() if key != "resources"}
    return hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()[:16]


def rule_resources(rule_name):
    """The rule's entry of `resources`, on top of `resources.default`; `threads` becomes `torch_threads`, the
    configured count the job's script runs torch with (its `threads` claim is scaled by CORES_PER_CPU)."""
    merged = {**config["resources"]["default"], **config["resources"].get(rule_name, {})}
    return {"torch_threads" if key == "threads" else key: value for key, value in merged.items()}


def rule_threads(rule_name):
    """The rule's `threads` from the config, scaled by CORES_PER_CPU."""
    threads = config["resources"].get(rule_name, {}).get("threads", config["resources"]["default"]["threads"])
    return math.ceil(threads * CORES_PER_CPU)


def log_path(rule_name, wildcards=""):
    return f"results/logs/{rule_name}{wildcards}.log"


def benchmark_path(rule_name, wildcards=""):
    return f"results/benchmarks/{rule_name}{wildcards}.tsv"


def tiny_model_dir():
    return f"data/models/{MODALITY.tiny or 'tiny'}"


def model_dir():
    """The base checkpoint directory: the built tiny model or the configured local checkpoint."""
    return tiny_model_dir() if config["model"]["source"] == "tiny" else config["model"]["source"]


def model_checkpoint_input(wildcards):
    """The tiny model's directory (built by the workflow), or a local checkpoint's config.json and weight files:
    replacing the weights reruns everything computed from them."""
    if config["model"]["source"] == "tiny":
        return model_dir()
    return [f"{model_dir()}/config.json", *sorted(glob.glob(f"{model_dir()}/*.safetensors"))]


def synthetic_dir():
    return f"data/{MODALITY.synthetic or 'synthetic'}"


def annotation_input(wildcards):
    """The synthetic dataset (generated by the workflow), or the configured source's annotation files."""
    if config["dataset"]["source"] == "synthetic":
        return synthetic_dir()
    if not MODALITY.split_files:  # a directory of scenes
        return config["dataset"]["source"]
    return [f"{config['dataset']['source']}/{name}" for name in config["dataset"]["splits"].values()]


def report_inputs(wildcards):
    inputs = {"model": "results/model/model.json", "manifest": "results/dataset/manifest.json",
              "teacher": "results/teacher/model", "delta": "results/delta"}
    inputs |= {f"lora_{name}": f"results/reports/{file}" for name, file in
               (("table", "ablation.csv"), ("references", "references.csv"), ("history", "ablation_history.csv"),
                ("module_distance", "module_distance.csv"))}
    inputs["evaluations"] = [*(f"results/eval/{arm_path(arm)}/metrics.json" for arm in ARMS),
                             *(f"results/eval/references/{reference}.json" for reference in REFERENCES)]
    if VISION:
        inputs |= {f"stats_{split}": f"results/features/{split}_stats.json" for split in SPLITS}
        inputs |= {f"head_{name}": f"results/head/{file}"
                   for name, file in (("metrics", "metrics.json"), ("history", "history.csv"),
                                      ("heatmaps", "heatmaps.png"))}
        for arch in ARCHS:
            inputs |= {f"lowrank_{name}_{arch}": f"results/lowrank/{arch}/{file}"
                       for name, file in (("comparison", "comparison.json"), ("spatial", "comparison.png"),
                                          ("history", "history.json"), ("curve", "loss_curve.png"))}
    return inputs


def check_config_before_any_job():
    """Everything the config decides (lowrank_core.preflight), once, in the process that schedules the jobs."""
    from lowrank_core.preflight import check_workflow

    arms = {ARM.format(**arm): arm for arm in ARMS}.values()
    exit_on_bad_input(check_workflow, config, [(arm, arm_settings(SimpleNamespace(**arm))) for arm in arms])


if workflow.is_main_process:
    check_config_before_any_job()

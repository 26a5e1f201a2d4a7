"""Helpers shared by the rules: config slices, resources and the wildcard constraints."""

import hashlib
import json


SPLITS = ("train", "val", "test")
VISION = config["model"]["modality"] == "vision_language"


wildcard_constraints:
    split="|".join(SPLITS),


def config_slice(*keys):
    """The config entry at `keys` in canonical form (sorted keys, plain types): a rule's `params`."""
    value = config
    for key in keys:
        value = value[key]
    return json.loads(json.dumps(value, sort_keys=True))


def experiment_hash():
    """Hash of everything in the config that can change a result (execution resources excluded)."""
    experiment = {key: value for key, value in config.items() if key != "resources"}
    return hashlib.sha256(json.dumps(experiment, sort_keys=True).encode()).hexdigest()[:16]


def rule_resources(rule_name):
    """The rule's entry of `resources`, on top of `resources.default`."""
    merged = {**config["resources"]["default"], **config["resources"].get(rule_name, {})}
    return {key: value for key, value in merged.items() if key != "threads"}


def rule_threads(rule_name):
    return config["resources"].get(rule_name, {}).get("threads", config["resources"]["default"]["threads"])


def log_path(rule_name, wildcards=""):
    return f"results/logs/{rule_name}{wildcards}.log"


def benchmark_path(rule_name, wildcards=""):
    return f"results/benchmarks/{rule_name}{wildcards}.tsv"


def model_checkpoint_input(wildcards):
    if config["model"]["source"] == "tiny":
        return "data/models/tiny"
    return f"{config['model']['source']}/config.json"


def annotation_input(wildcards):
    if config["dataset"]["source"] == "synthetic":
        return "data/synthetic"
    return [f"{config['dataset']['source']}/{name}" for name in config["dataset"]["splits"].values()]


def report_inputs(wildcards):
    inputs = {"model": "results/model/model.json", "manifest": "results/dataset/manifest.json"}
    if VISION:
        inputs |= {f"stats_{split}": f"results/features/{split}_stats.json" for split in SPLITS}
    return inputs

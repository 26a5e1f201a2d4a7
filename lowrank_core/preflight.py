"""Everything the config decides, checked when the workflow starts, before any job runs.

`check_workflow` parses every section into the dataclass its jobs parse it into (every range check of the library
runs), checks that the model and dataset sources exist, and resolves every arm against the base model's module
tree, built on the meta device from its config alone (no weights are read). A preset's module kind or a strategy's
layer range that matches nothing, an svd rank that ΔW is not exported at, an init the targets or the modality cannot
take, a batch (or an init's preprocessing) larger than the training split, a `delta.include` that matches no module:
each fails here with one line naming the key, instead of in a job after the teacher has trained. The records
themselves (images, masks, labels) are checked by the dataset job, which runs first.
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from .data import DatasetConfig
from .delta import DeltaConfig
from .errors import ConfigError
from .features import FeatureConfig
from .head import HeadConfig
from .inits import check_init
from .lora import ArmConfig, PresetConfig, arm_targets
from .lowrank import LowrankConfig, allocator_steps, check_allocator_budget
from .modalities import get_modality
from .modeling import ModelConfig
from .targets import StrategyConfig
from .training import TrainConfig


def check_workflow(config: dict, arms: list[tuple[dict, dict]]) -> None:
    """Check the (schema-validated) `config` and its `arms`: (the grid entry, the settings its job reads) pairs.

    Raises the LowrankError the first bad value would raise in a job, naming its key or file.
    """
    model = ModelConfig.from_dict(config["model"])
    dataset = DatasetConfig.from_dict(config["dataset"])
    features = FeatureConfig.from_dict(config["features"])
    HeadConfig.from_dict(config["head"])
    lowrank = LowrankConfig.from_dict(config["lowrank"])
    delta = DeltaConfig.from_dict(config["delta"])
    teacher = TrainConfig.from_dict(config["teacher"])
    modality = get_modality(model.modality)
    _check_model_source(model)
    modality.check_source(dataset)
    train_records = modality.train_records(dataset)
    gpus = {rule: config["resources"].get(rule, {}).get("gpu", config["resources"]["default"]["gpu"])
            for rule in ("train_teacher", "train_lora")}
    _check_batch(teacher.batch_size, "teacher.batch_size", train_records, gpus["train_teacher"])
    if modality.info.reference_objective == "lm":
        _check_same_question(teacher, TrainConfig.from_dict(config["lora"]["train"], "lora.train"))

    skeleton = modality.skeleton(model)
    if modality.info.vision_features:
        _check_vision_sizes(skeleton.config, features, lowrank)
        if "AdaLoRA" in lowrank.archs:
            check_allocator_budget(lowrank, allocator_steps(lowrank, train_records))
    _check_delta_include(skeleton, delta)
    _check_general_text(config["eval"]["general_text"], modality)
    for entry, settings in arms:
        preset_key, strategy_key = f"lora.presets.{entry['preset']}", f"lora.strategies.{entry['strategy']}"
        PresetConfig.from_dict(settings["preset"], preset_key)
        StrategyConfig.from_dict(settings["strategy"], strategy_key)
        arm = ArmConfig.from_dict(settings)
        overridden = "batch_size" in config["lora"]["train_by_objective"].get(arm.objective, {})
        _check_batch(arm.train.batch_size, f"lora.train_by_objective.{arm.objective}.batch_size" if overridden
                     else "lora.train.batch_size", train_records, gpus["train_lora"])
        if arm.init == "svd" and arm.preset.r > max(delta.ranks):
            raise ConfigError(f"delta.ranks: init svd with preset {entry['preset']} needs ΔW factors of rank "
                              f"{arm.preset.r} ({preset_key}.r), but the largest of delta.ranks is {max(delta.ranks)}")
        check_init(skeleton, arm_targets(skeleton, arm, modality, model.backend, strategy_key, preset_key), arm,
                   modality, train_records)


def _check_same_question(teacher: TrainConfig, arms: TrainConfig) -> None:
    """The teacher answers the question the arms and the references are scored on, with the same words."""
    for name in ("question", "positive_word", "negative_word"):
        if getattr(teacher, name) != getattr(arms, name):
            raise ConfigError(f"teacher.{name}: {getattr(teacher, name)!r} differs from lora.train.{name} "
                              f"{getattr(arms, name)!r}; the teacher, the arms and the references must answer the "
                              "same question with the same words")


def _check_general_text(path: str | None, modality) -> None:
    if path is None:
        return
    if not modality.info.language:
        raise ConfigError(f"eval.general_text: model.modality {modality.name} has no language model to score text")
    if not Path(path).is_file():
        raise ConfigError(f"eval.general_text: {path} is not a file")


def _check_model_source(model: ModelConfig) -> None:
    if model.source != "tiny" and not Path(model.source).is_dir():
        raise ConfigError(f"model.source: {model.source} is not a directory (a local checkpoint, or 'tiny')")


def _check_batch(batch_size: int, key: str, train_records: int, gpus: int) -> None:
    if batch_size > train_records:
        raise ConfigError(f"{key}: {batch_size} is more than the {train_records} training records")
    if batch_size % max(1, gpus):
        raise ConfigError(f"{key}: {batch_size} must split evenly over the {gpus} data-parallel processes "
                          "(its rule's resources gpu)")


def _check_vision_sizes(config, features: FeatureConfig, lowrank: LowrankConfig) -> None:
    """Whole merged vision tokens per image, and a low-rank target rank the feature matrices can have."""
    vision = config.vision_config
    cell = vision.patch_size * vision.spatial_merge_size
    if features.image_size % cell:
        raise ConfigError(f"features.image_size: {features.image_size} is not a multiple of {cell}, the model's "
                          "patch size x merge size (one merged vision token)")
    tokens = (features.image_size // cell) ** 2
    channels = getattr(vision, "out_hidden_size", None) or config.text_config.hidden_size
    if lowrank.rank > min(tokens, channels):
        raise ConfigError(f"lowrank.rank: {lowrank.rank} exceeds min(tokens, channels) = min({tokens}, {channels}) "
                          f"of the features at features.image_size {features.image_size}")


def _check_delta_include(skeleton: nn.Module, delta: DeltaConfig) -> None:
    include = re.compile(delta.include)
    if not any(isinstance(module, (nn.Linear, nn.Conv2d)) and include.search(name)
               for name, module in skeleton.named_modules()):
        raise ConfigError(f"delta.include: {delta.include!r} matches no linear module of the model")

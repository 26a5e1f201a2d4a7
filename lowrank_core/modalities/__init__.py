"""Modalities: the one place that knows a kind of data and model (see DESIGN.md).

Each modality is a module here with a `MODALITY` object (a `base.Modality`): how its records are read and
validated, how its model is loaded and where adapters can go, how a batch is built, its losses and its metrics.
The stages call through it; nothing else tests a modality's name.

What the Snakefile needs at parse time (which objectives and stages a modality has, its built-in strategies, the
score its report judges arms by) is in `ModalityInfo`, kept free of torch imports.
"""

from __future__ import annotations

import dataclasses
import importlib

from ..grid import DEPTH_STRATEGIES, OBJECTIVES, STRATEGIES


@dataclasses.dataclass(frozen=True)
class Score:
    """The test metric the report judges arms by: its column, direction and chance level (None: no chance level)."""

    column: str
    label: str
    higher_is_better: bool
    chance: float | None


@dataclasses.dataclass(frozen=True)
class ModalityInfo:
    """A modality's facts that need no torch.

    Its objectives and the one its teacher and reference models train / are evaluated with; whether the
    vision-feature stages (features, detection head, low-rank projections) apply; the score the report judges arms
    by; the built-in strategies (A / B / C) per model backend; the config keys of its tiny model
    (`model.<tiny>`) and synthetic dataset (`dataset.<synthetic>`), None where it has none; whether a dataset
    source holds the annotation files `dataset.splits` names (or is read as a whole); the config section its
    objectives read beyond training (`task`), with the keys of it only evaluation reads (`task_evaluation_keys`: an
    edit there must not retrain the teacher); the keys of `dataset` it reads; the LoRA inits its batches cannot
    drive, each with the reason; whether the dataset job checks the records against the model (its tokenizer); and
    whether its evaluations write per-sample predictions (`predictions.csv`); whether it has a language model
    (to score general text with, `eval.general_text`); and whether its records may carry images (resized to
    `features.image_size`).
    """

    name: str
    objectives: tuple[str, ...]
    reference_objective: str
    vision_features: bool
    score: Score
    strategies: dict[str, dict]
    tiny: str | None
    synthetic: str | None
    split_files: bool = True
    task: str | None = None
    task_evaluation_keys: tuple[str, ...] = ()
    dataset_keys: tuple[str, ...] = ("source", "splits", "synthetic")
    unsupported_inits: dict[str, str] = dataclasses.field(default_factory=dict)
    dataset_reads_model: bool = False
    predictions: bool = False
    language: bool = True
    image_inputs: bool = False


CLASSIFICATION = Score("roc_auc", "ROC-AUC", higher_is_better=True, chance=0.5)
INFO = {
    "vision_language": ModalityInfo("vision_language", OBJECTIVES[:5], "lm", True, CLASSIFICATION,
                                    {"transformers": STRATEGIES}, tiny="tiny", synthetic="synthetic",
                                    predictions=True, image_inputs=True),
    "text": ModalityInfo("text", ("lm",), "lm", False, CLASSIFICATION, {"transformers": STRATEGIES},
                         tiny=None, synthetic=None, predictions=True),
    "instruct": ModalityInfo("instruct", ("sft",), "sft", False, Score("exact_match", "exact match", True, None),
                             {"transformers": STRATEGIES}, tiny="tiny_text", synthetic="synthetic_instructions",
                             task="sft", task_evaluation_keys=("max_new_tokens", "numeric_tolerance"),
                             dataset_keys=("source", "splits", "synthetic_instructions"), dataset_reads_model=True,
                             predictions=True, image_inputs=True),
    "depth": ModalityInfo("depth", ("depth",), "depth", False, Score("abs_rel", "AbsRel", False, None),
                          DEPTH_STRATEGIES, tiny="tiny_depth", synthetic="synthetic_scenes", split_files=False,
                          task="depth", task_evaluation_keys=("alignment",),
                          dataset_keys=("source", "eth3d", "synthetic_scenes"),
                          unsupported_inits={"corda": "PEFT's covariance hook reads one record's layer inputs as a "
                                             "[tokens, channels] matrix, and a depth record is a window of frames"},
                          language=False),
}
_MODULES = {"vision_language": "vision_language", "text": "text", "instruct": "instruct.modality",
            "depth": "depth.modality"}


def get_modality(name: str):
    """The modality object of `model.modality` `name` (imports its module, and with it torch)."""
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").MODALITY

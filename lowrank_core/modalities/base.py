"""The interface every modality implements: the stages (dataset, teacher, LoRA arms, evaluation, collect) call it."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data import DatasetConfig
from ..errors import ConfigError
from ..targets import Family
from . import INFO, ModalityInfo


class Modality(abc.ABC):
    """One kind of data and model. A *student* is the model (PEFT-wrapped for an arm, plain for the teacher and the
    references) plus the parts its objective adds; `student(batch)` returns the objective's loss."""

    name: str

    @property
    def info(self) -> ModalityInfo:
        return INFO[self.name]

    # ------------------------------------------------------------ data

    @abc.abstractmethod
    def check_source(self, dataset: DatasetConfig) -> None:
        """The configured source exists and gives this modality's records (errors name the key)."""

    @abc.abstractmethod
    def train_records(self, dataset: DatasetConfig) -> int:
        """How many training samples the configured source gives, from the config and annotation files alone."""

    @abc.abstractmethod
    def prepare_dataset(self, dataset: DatasetConfig, synthetic_dir: str | Path | None,
                        out_manifest: str | Path) -> dict:
        """Validate every record and write the manifest: `{"splits": {split: {"count", "records"}}, ...}`.
        A modality whose `info.dataset_reads_model` also takes `model_info_json` and the `task` settings."""

    def generate_synthetic(self, out_dir: str | Path, spec: dict) -> None:
        """Write the synthetic dataset of `dataset.<info.synthetic>` `spec` (modalities that have one)."""
        raise ConfigError(f"dataset.source: model.modality {self.name} has no synthetic dataset")

    @abc.abstractmethod
    def record_id(self, record: dict) -> str:
        """What names a record (a training run's identity lists its records by it)."""

    # ------------------------------------------------------------ model

    def build_tiny(self, out_dir: str | Path, spec: dict) -> None:
        """Build the tiny model of `model.<info.tiny>` `spec` into `out_dir` (modalities that have one)."""
        raise ConfigError(f"model.source: model.modality {self.name} has no tiny model")

    @abc.abstractmethod
    def family(self, backend: str) -> Family:
        """The towers adapters can go in, for the model `backend` loads."""

    @abc.abstractmethod
    def active_towers(self, objective: str) -> set[str]:
        """The towers `objective`'s forward pass runs through (adapters elsewhere would not train)."""

    @abc.abstractmethod
    def check_checkpoint(self, config: dict, config_file: Path) -> None:
        """CheckpointError naming `config_file` when its `config` is not a model of this modality."""

    @abc.abstractmethod
    def load(self, info: dict) -> tuple[nn.Module, Any]:
        """The model and its processor, from a `model.json` description (`modeling.prepare_model`)."""

    @abc.abstractmethod
    def skeleton(self, cfg) -> nn.Module:
        """The base model's module tree on the meta device from its config alone (start-up checks)."""

    # ------------------------------------------------------------ training and evaluation

    @abc.abstractmethod
    def student(self, model: nn.Module, arm, processor, head_path: str | Path | None = None,
                arm_dir: str | Path | None = None) -> nn.Module:
        """`model` with the parts `arm`'s objective adds: fresh ones, or with `arm_dir` those an arm trained."""

    def save_parts(self, student: nn.Module, out_dir: Path) -> None:
        """Write the trained parts the objective adds beside the adapter (none by default)."""

    @abc.abstractmethod
    def batcher(self, processor, arm) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Collate records into a training / evaluation batch for `arm`'s objective."""

    @abc.abstractmethod
    def test_metrics(self, student: nn.Module, records: list[dict], batcher, batch_size: int, arm) -> dict:
        """The test metrics of `student` (in eval mode) on `records`."""

    @abc.abstractmethod
    def table_row(self, metrics: dict) -> dict:
        """The metric columns of one evaluation in `ablation.csv` / `references.csv`."""

    @abc.abstractmethod
    def dataset_section(self, manifest: dict):
        """The report's `<section id="dataset">` for the prepared `manifest`."""

    def result_sections(self, inputs: dict) -> list:
        """The modality's own report sections after the shared ones, from the report's `inputs` (none by default)."""
        return []

    def train_counters(self, student: nn.Module) -> dict:
        """Counts the training recorded beyond the history (e.g. skipped batches); none by default."""
        return {}

"""Evaluation of trained LoRA arms and of the reference models (untrained base, full fine-tune teacher) on the
test split (`tables` collects the results into the ablation tables).

A modality's per-sample predictions are written beside each evaluation: `predictions.csv` in an arm's
seed directory, `<reference>_predictions.csv` beside a reference's JSON. With a general-text file (`eval.general_text`)
every evaluation also measures the loss on it; the tables' `forgetting` is that loss minus the base's.

The test metrics are the modality's (`modalities`). Convergence figures come from the training history: the first
training loss, the last as a 5-step running mean, and the first step whose running mean reaches the objective's
target loss. For targeted modules the teacher changed, the student's update is compared with the teacher's:
‖ΔW_student − ΔW_teacher‖_F / ‖ΔW_teacher‖_F pooled over those modules (ΔW_student from PEFT's `merge_and_unload`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pandas as pd
import torch

from .delta import Checkpoint, module_group
from .generation import read_texts, text_loss, write_predictions
from .io import load_tensors, read_json, write_json
from .lora import ArmConfig, load_student
from .modalities import get_modality
from .tables import COST_KEYS, TRAIN_KEYS

log = logging.getLogger(__name__)

SMOOTHING_STEPS = 5


def convergence(history_csv: str | Path, target_loss: float) -> dict:
    """The first training loss, the final one (the running mean over the last `SMOOTHING_STEPS` steps: one batch's is
    noise), the final val loss and the first step the running-mean loss reaches the target."""
    history = pd.read_csv(history_csv)
    smoothed = history["loss"].rolling(SMOOTHING_STEPS, min_periods=1).mean()
    reached = history.loc[smoothed <= target_loss, "step"]
    val = history["val_loss"].dropna()
    return {"initial_loss": float(history["loss"].iloc[0]), "final_loss": float(smoothed.iloc[-1]),
            "final_val_loss": float(val.iloc[-1]) if len(val) else None, "target_loss": target_loss,
            "steps_to_target": int(reached.iloc[0]) if len(reached) else None}


@torch.no_grad()
def delta_distance(student: torch.nn.Module, targets: list[str], base_dir: str | Path,
                   teacher_dir: str | Path) -> dict | None:
    """‖ΔW_student − ΔW_teacher‖_F / ‖ΔW_teacher‖_F pooled over the targeted modules the teacher changed (merges
    the adapters into the student's weights), in all and per module group (tower, kind, layer). None when the
    teacher changed none of them."""
    base, teacher = Checkpoint(base_dir), Checkpoint(teacher_dir)
    merged = student.model.merge_and_unload()
    groups: dict[tuple, list[float]] = {}  # (tower, kind, layer) -> [squared error, squared teacher]
    modules = 0
    for name in targets:
        key = f"{name}.weight"
        if key not in base.keys or key not in teacher.keys:
            continue
        base_weight = base.tensor(key).float()
        teacher_delta = teacher.tensor(key).float() - base_weight
        if not teacher_delta.any():
            continue
        student_delta = merged.get_submodule(name).weight.float() - base_weight
        group = module_group(name)
        sums = groups.setdefault((group["tower"], group["kind"], group["layer"]), [0.0, 0.0])
        sums[0] += float((student_delta - teacher_delta).square().sum())
        sums[1] += float(teacher_delta.square().sum())
        modules += 1
    if not modules:
        return None
    squared_error, squared_teacher = (sum(sums[i] for sums in groups.values()) for i in (0, 1))
    return {"relative_distance": math.sqrt(squared_error / squared_teacher), "modules": modules,
            "groups": [{"tower": tower, "kind": kind, "layer": layer, "relative_distance": math.sqrt(error / norm)}
                       for (tower, kind, layer), (error, norm) in groups.items()]}


def evaluate_arm(model_info_json: str | Path, manifest_json: str | Path, arm: ArmConfig, arm_dir: str | Path,
                 teacher_dir: str | Path, out_json: str | Path, target_loss: float, batch_size: int = 8,
                 head_path: str | Path | None = None, general_text: str | Path | None = None) -> dict:
    """Test-split metrics, convergence, ΔW distance and cost of one trained arm, written to `out_json`; with
    `general_text` (a file of plain texts, one per line) also the arm's loss on it (`generation.text_loss`)."""
    info = read_json(model_info_json)
    records = read_json(manifest_json)["splits"]["test"]["records"]
    modality = get_modality(info["modality"])
    student, targets, processor = load_student(info, arm, arm_dir, head_path)
    metrics = modality.test_metrics(student, records, modality.batcher(processor, arm), batch_size, arm)
    save_predictions(metrics, Path(out_json).with_name("predictions.csv"))
    if general_text is not None:
        metrics["general_text"] = text_loss(student.model, processor, read_texts(general_text), batch_size)
    metrics["convergence"] = convergence(Path(arm_dir) / "history.csv", target_loss)
    metrics["delta"] = delta_distance(student, targets, info["path"], teacher_dir)
    stats = read_json(Path(arm_dir) / "train_stats.json")
    metrics["cost"] = {k: v for k, v in stats.items() if k in COST_KEYS}
    metrics["train"] = {key: stats["train"][key] for key in TRAIN_KEYS}  # what the arm recorded it trained with
    metrics["adapter"] = {"rank": arm.preset.r, "alpha": arm.preset.alpha}
    write_json(out_json, metrics)
    score = modality.info.score.column
    log.info("%s: %s %.4g", arm_dir, score, modality.table_row(metrics)[score] or math.nan)
    return metrics


def evaluate_reference(model_info_json: str | Path, manifest_json: str | Path, arm: ArmConfig,
                       model_dir: str | Path | None, out_json: str | Path, batch_size: int = 8,
                       factors: str | Path | None = None, general_text: str | Path | None = None) -> dict:
    """The same test metrics for a whole model, under the modality's reference objective (the answer through the
    language model, depth): the base when `model_dir` is None, else a full fine-tune (whose `train_summary.json`
    and weights give its cost). With `factors` (a `factors_r{r}.safetensors` of the ΔW export) the base with the
    teacher's truncated ΔW_r merged, no training: where every svd-init student starts. `general_text` as in
    `evaluate_arm`."""
    info = read_json(model_info_json)
    records = read_json(manifest_json)["splits"]["test"]["records"]
    modality = get_modality(info["modality"])
    model, processor = modality.load({**info, "path": str(model_dir or info["path"])})
    rank = merge_factors(model, factors) if factors is not None else None
    arm = dataclasses.replace(arm, objective=modality.info.reference_objective)
    metrics = modality.test_metrics(modality.student(model, arm, processor), records,
                                    modality.batcher(processor, arm), batch_size, arm)
    save_predictions(metrics, Path(out_json).with_name(f"{Path(out_json).stem}_predictions.csv"))
    if general_text is not None:
        metrics["general_text"] = text_loss(model, processor, read_texts(general_text), batch_size)
    total = sum(p.numel() for p in model.parameters())
    metrics["cost"] = {"trainable_parameters": 0, "total_parameters": total, "trainable_percent": 0.0}
    if model_dir is not None:
        summary = read_json(Path(model_dir) / "train_summary.json")
        history = pd.read_csv(Path(model_dir) / "history.csv")
        metrics["cost"] = {"trainable_parameters": summary["trainable_parameters"], "total_parameters": total,
                           "trainable_percent": 100 * summary["trainable_parameters"] / total,
                           "adapter_bytes": sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")),
                           "peak_memory_mb": summary["peak_memory_mb"], "train_seconds": summary["train_seconds"],
                           "samples_per_s": float(history.loc[history["step"] > 1, "samples_per_s"].mean())}
    if rank is not None:
        metrics |= {"rank": rank, "factors": str(factors)}
        metrics["cost"]["adapter_bytes"] = Path(factors).stat().st_size
    write_json(out_json, metrics)
    return metrics


def save_predictions(metrics: dict, path: Path) -> None:
    """Move the modality's per-sample `predictions`, where it gives them, out of `metrics` into `path` (CSV)."""
    if "predictions" in metrics:
        write_predictions(path, metrics.pop("predictions"))


@torch.no_grad()
def merge_factors(model: torch.nn.Module, factors_file: str | Path) -> int:
    """Add B @ A * scaling (the teacher's ΔW_r) to every module of `model` the factor file holds; returns r."""
    factors, meta = load_tensors(factors_file)
    for key in factors:
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            weight = model.get_submodule(name).weight
            update = factors[f"{name}.lora_B"].float() @ factors[key].float() * meta["scaling"]
            weight.add_(update.reshape(weight.shape).to(weight.dtype))  # a convolution's ΔW is [out, in·k·k]
    return int(meta["rank"])

"""Evaluation of trained LoRA arms and of the reference models (untrained base, full fine-tune teacher) on the
test split, and the collection of every result into the ablation tables.

Classification scores come from the detection head where the objective has one, otherwise from the language
model: p(positive answer) / (p(positive) + p(negative)), the answers' summed token log-probabilities compared.
Arms with an LM objective (and the references) also get the test LM loss (mean cross-entropy per answer token) and
its perplexity; arms with a head get pixel F1 / IoU of its heat maps. Convergence figures come from the training
history: the first and last training loss, and the first step whose 5-step running mean reaches the objective's
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
from tqdm.auto import tqdm

from .delta import Checkpoint, module_group
from .grid import AXES, arm_path
from .io import atomic_path, load_tensors, read_json, write_json
from .lora import ArmConfig, LoraStudent, answer_logprobs, arm_batcher, load_student
from .metrics import classification_metrics, pixel_metrics, read_pixel_mask
from .modeling import load_model, load_processor

log = logging.getLogger(__name__)

SMOOTHING_STEPS = 5
TRAIN_KEYS = ("lr", "max_steps", "batch_size")  # the arm's optimisation settings, as table columns
COST_KEYS = ("trainable_parameters", "total_parameters", "trainable_percent", "adapter_bytes", "peak_memory_mb",
             "train_seconds", "samples_per_s")


@torch.no_grad()
def test_metrics(student: LoraStudent, records: list[dict], batcher, batch_size: int, threshold: float) -> dict:
    """Classification, pixel and LM metrics of `student` (in eval mode) on `records`."""
    student.eval()
    image_scores, heatmaps, lm_scores, nll, tokens = [], [], [], 0.0, 0
    for start in tqdm(range(0, len(records), batch_size), desc="evaluate", unit="batch"):
        chunk = records[start:start + batch_size]
        positive_batch = batcher([{**r, "label": 1} for r in chunk])
        positive = student.outputs(positive_batch)
        if "image_logits" in positive:
            image_scores.append(positive["image_logits"].sigmoid())
            heatmaps.extend(positive["map_logits"].sigmoid())
        if "lm" in positive:
            negative_batch = batcher([{**r, "label": 0} for r in chunk])
            positive_lp, positive_n = answer_logprobs(positive["lm"].logits, positive_batch["labels"])
            negative_lp, negative_n = answer_logprobs(student.outputs(negative_batch)["lm"].logits,
                                                      negative_batch["labels"])
            lm_scores.append(torch.sigmoid(positive_lp - negative_lp))
            labels = torch.tensor([r["label"] for r in chunk], dtype=torch.bool)
            nll -= float(torch.where(labels, positive_lp, negative_lp).sum())
            tokens += int(torch.where(labels, positive_n, negative_n).sum())
    labels = [r["label"] for r in records]
    result = {"classification_source": "head" if image_scores else "lm", "pixel": None, "lm": None,
              "label_blind_loss": None}
    if lm_scores and student.arm.objective == "lm":  # the training loss is the LM loss alone
        result["label_blind_loss"] = label_blind_loss(batcher.chat.answer_ids, labels)
    if image_scores:
        result["classification"] = classification_metrics(torch.cat(image_scores), labels, threshold)
        masks = [read_pixel_mask(r.get("mask_path")) for r in records]
        result["pixel"] = pixel_metrics(heatmaps, masks, threshold)
    if lm_scores:
        lm_classification = classification_metrics(torch.cat(lm_scores), labels, threshold)
        result["lm"] = {"loss": nll / tokens, "perplexity": math.exp(nll / tokens), "classification": lm_classification}
        result.setdefault("classification", lm_classification)
    return result


def label_blind_loss(answer_ids: dict[int, list[int]], labels: list[int]) -> float:
    """The LM loss (mean over answer tokens) of a model that has learned the answer format but not the label: ln 2
    for each record's first answer token, 0 for the tokens the format then decides."""
    return len(labels) * math.log(2) / sum(len(answer_ids[label]) for label in labels)


def convergence(history_csv: str | Path, target_loss: float) -> dict:
    """Initial / final training loss, final val loss and the first step the running-mean loss reaches the target."""
    history = pd.read_csv(history_csv)
    smoothed = history["loss"].rolling(SMOOTHING_STEPS, min_periods=1).mean()
    reached = history.loc[smoothed <= target_loss, "step"]
    val = history["val_loss"].dropna()
    return {"initial_loss": float(history["loss"].iloc[0]), "final_loss": float(history["loss"].iloc[-1]),
            "final_val_loss": float(val.iloc[-1]) if len(val) else None, "target_loss": target_loss,
            "steps_to_target": int(reached.iloc[0]) if len(reached) else None}


@torch.no_grad()
def delta_distance(student: LoraStudent, targets: list[str], base_dir: str | Path,
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
                 head_path: str | Path | None = None) -> dict:
    """Test-split metrics, convergence, ΔW distance and cost of one trained arm, written to `out_json`."""
    info = read_json(model_info_json)
    records = read_json(manifest_json)["splits"]["test"]["records"]
    trust = info.get("trust_remote_code", False)
    processor = load_processor(info["path"], trust)
    student, targets = load_student(info["path"], arm, arm_dir, processor, trust, info["dtype"], head_path)
    metrics = test_metrics(student, records, arm_batcher(processor, arm), batch_size, arm.head.threshold)
    metrics["convergence"] = convergence(Path(arm_dir) / "history.csv", target_loss)
    metrics["delta"] = delta_distance(student, targets, info["path"], teacher_dir)
    stats = read_json(Path(arm_dir) / "train_stats.json")
    metrics["cost"] = {k: v for k, v in stats.items() if k in COST_KEYS}
    metrics["train"] = {key: stats["train"][key] for key in TRAIN_KEYS}  # what the arm recorded it trained with
    write_json(out_json, metrics)
    log.info("%s: %s %.4g", arm_dir, metrics["classification_source"], metrics["classification"]["roc_auc"] or math.nan)
    return metrics


def evaluate_reference(model_info_json: str | Path, manifest_json: str | Path, arm: ArmConfig,
                       model_dir: str | Path | None, out_json: str | Path, batch_size: int = 8,
                       factors: str | Path | None = None) -> dict:
    """The same test metrics for a whole model answering through its language model: the base when `model_dir`
    is None, else a full fine-tune (whose `train_summary.json` and weights give its cost). With `factors` (a
    `factors_r{r}.safetensors` of the ΔW export) the base with the teacher's truncated ΔW_r merged, no training:
    where every svd-init student starts."""
    info = read_json(model_info_json)
    records = read_json(manifest_json)["splits"]["test"]["records"]
    trust = info.get("trust_remote_code", False)
    path = model_dir or info["path"]
    processor = load_processor(path, trust)
    model = load_model(path, info["dtype"], trust)
    rank = merge_factors(model, factors) if factors is not None else None
    arm = dataclasses.replace(arm, objective="lm")
    metrics = test_metrics(LoraStudent(model, arm), records, arm_batcher(processor, arm), batch_size,
                           arm.head.threshold)
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


@torch.no_grad()
def merge_factors(model: torch.nn.Module, factors_file: str | Path) -> int:
    """Add B @ A * scaling (the teacher's ΔW_r) to every module of `model` the factor file holds; returns r."""
    factors, meta = load_tensors(factors_file)
    for key in factors:
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            weight = model.get_submodule(name).weight
            update = factors[f"{name}.lora_B"].float() @ factors[key].float() * meta["scaling"]
            weight.add_(update.to(weight.dtype))
    return int(meta["rank"])


def flat_row(metrics: dict) -> dict:
    """One table row of an evaluation: classification, pixel, LM, convergence, ΔW distance and cost columns."""
    row = {"source": metrics["classification_source"]}
    row |= {k: metrics["classification"].get(k) for k in ("accuracy", "f1", "roc_auc", "average_precision",
                                                            "positive_rate")}
    row["label_blind_loss"] = metrics.get("label_blind_loss")
    pixel = metrics.get("pixel") or {}
    row |= {k: pixel.get(k) for k in ("pixel_f1", "pixel_iou")}
    lm = metrics.get("lm") or {}
    row |= {"lm_loss": lm.get("loss"), "perplexity": lm.get("perplexity"),
            "lm_roc_auc": (lm.get("classification") or {}).get("roc_auc")}
    row |= metrics.get("convergence") or {}
    row["delta_distance"] = (metrics.get("delta") or {}).get("relative_distance")
    row |= {k: (metrics.get("train") or {}).get(k) for k in TRAIN_KEYS}
    return row | {k: metrics["cost"].get(k) for k in COST_KEYS}


def collect(arms: list[dict], eval_jsons: list[str | Path], histories: list[str | Path],
            references: dict[str, str | Path], out_csv: str | Path, references_csv: str | Path,
            history_csv: str | Path, module_distance_csv: str | Path) -> pd.DataFrame:
    """Write one row per trained arm × seed (`objective, preset, init, strategy, seed` + metrics), the reference
    rows (with the `rank` of the ΔW_r ones), every arm's training history in long form, and the ΔW distance of every
    arm × seed per module group (tower, kind, layer) in long form. Returns the arm table."""
    evaluations = [read_json(path) for path in eval_jsons]
    keys = [{a: arm[a] for a in (*AXES, "seed")} for arm in arms]
    table = pd.DataFrame([{**key, **flat_row(metrics)} for key, metrics in zip(keys, evaluations)])
    reference_evaluations = {name: read_json(path) for name, path in references.items()}
    reference_table = pd.DataFrame([{"model": name, "rank": metrics.get("rank"), **flat_row(metrics)}
                                    for name, metrics in reference_evaluations.items()])
    distance = pd.DataFrame([{**key, **group} for key, metrics in zip(keys, evaluations)
                             for group in (metrics.get("delta") or {}).get("groups", [])],
                            columns=[*AXES, "seed", "tower", "kind", "layer", "relative_distance"])
    curves = pd.concat([pd.read_csv(path).assign(arm=arm_path(arm), **{a: arm[a] for a in (*AXES, "seed")})
                        for arm, path in zip(arms, histories)], ignore_index=True)
    for frame, path in ((table, out_csv), (reference_table, references_csv), (curves, history_csv),
                        (distance, module_distance_csv)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    log.info("%d arms collected into %s", len(table), out_csv)
    return table

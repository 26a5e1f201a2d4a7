"""The teacher: full-parameter supervised fine-tuning of the base model, the target LoRA runs are measured against."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from . import __version__
from .io import atomic_path, read_json, write_json
from .lora import ArmConfig
from .modalities import get_modality
from .training import Batches, TrainConfig, train_loop, write_history

log = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"  # transformers 5 writes one file up to 50GB; shards keep large teachers easy to move


def train_teacher(model_info_json: str | Path, manifest_json: str | Path, cfg: TrainConfig, task: ArmConfig,
                  out_dir: str | Path, state_dir: str | Path, log_dir: str | Path) -> dict:
    """Fine-tune every parameter of the base model for the modality's reference objective (answer `cfg.question`
    with the label's word; depth), with the objective settings of `task` (image size, depth loss).

    Writes `out_dir` atomically: the model and processor (`save_pretrained`, safetensors in 5 GB shards),
    `history.csv` and `train_summary.json`; TensorBoard events go to `log_dir`, resumable checkpoints to `state_dir`.
    Returns the summary.
    """
    info = read_json(model_info_json)
    splits = read_json(manifest_json)["splits"]
    modality = get_modality(info["modality"])
    model, processor = modality.load(info)
    settings = {key: value for key, value in task.to_dict().items() if key not in ("objective", "train", "seed")}
    task = dataclasses.replace(task, objective=modality.info.reference_objective, train=cfg)
    batcher = modality.batcher(processor, task)
    train = Batches(splits["train"]["records"], cfg.batch_size, batcher, seed=cfg.seed, drop_last=True)
    val = Batches(splits["val"]["records"], cfg.batch_size, batcher)
    identity = {"model": info["path"], "dtype": info["dtype"], "task": settings,
                "train_records": [modality.record_id(r) for r in train.items]}

    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:  # the plain model trains (FSDP wraps its layers)
        return modality.student(model, task, processor)(batch)

    result = train_loop(model, loss, train, val, cfg, state_dir, log_dir, identity=identity)
    last = result.history[-1]
    val_losses = [row["val_loss"] for row in result.history if row["val_loss"] is not None]
    summary = {
        "model": info["path"], "dtype": info["dtype"], "image_size": task.image_size,
        "steps": last["step"], "final_loss": last["loss"], "final_val_loss": last["val_loss"],
        "best_val_loss": min(val_losses), "resumed_from_step": result.resumed_from_step,
        "train_seconds": result.seconds, "device": result.device, "mixed_precision": result.mixed_precision,
        "trainable_parameters": result.trainable_parameters, "peak_memory_mb": result.peak_memory_mb,
        "processes": result.processes, "parallelism": result.parallelism, "config": cfg.to_dict(),
        "lowrank_core_version": __version__,
    }
    if not result.main_process:
        return summary
    with atomic_path(out_dir) as tmp:
        weights = result.full_weights  # FSDP under mixed precision trains fp32 copies: save the model's dtype
        if weights is not None:
            weights = {name: value.to(getattr(torch, info["dtype"])) for name, value in weights.items()}
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE, state_dict=weights)
        if processor is not None:
            processor.save_pretrained(tmp)
        write_history(result.history, tmp / "history.csv")
        write_json(tmp / "train_summary.json", summary)
    log.info("teacher: %d steps, loss %.4f, val loss %.4f -> %s", summary["steps"], summary["final_loss"],
             summary["final_val_loss"], out_dir)
    return summary

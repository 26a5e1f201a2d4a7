"""The shared training loop: AdamW, warm-up + cosine schedule, gradient accumulation, mixed precision, resumable.

`train_loop` is model-agnostic: it trains whatever parameters of `model` require grad (all of them for the
teacher's full fine-tune, the adapters for LoRA) on the batches of a `Batches` source, minimising
`loss_fn(model, batch)`. Resumable state lives in `state_dir/checkpoint/step-N` as safetensors + JSON (no pickle,
checksummed, the last two kept): the trainable weights, the AdamW moments, the RNG states, the schedule, the step
and the history. The weights and moments are saved whole (gathered from the processes of a sharded run), so a
checkpoint resumes under any number of processes.
Batches are reshuffled per epoch from `seed + epoch`, so a resumed run sees exactly the batches an
uninterrupted one would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from unittest import mock
from typing import Any, Callable, Iterator, Literal, Sequence

import pandas as pd
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .config import Section, require
from .errors import CheckpointError, ConfigError, LowrankError
from .io import atomic_path, load_tensors, read_json, save_tensors, write_json
from .runtime import peak_rss_mb

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("step", "loss", "lr", "samples_per_s", "val_loss", "val_batch_losses", "elapsed_s")
CHECKPOINT_TENSORS = ("weights.safetensors", "optimizer.safetensors")
CHECKPOINT_FORMAT = 2  # 2: optimizer moments keyed by parameter name
# Checkpoints hold whole (unsharded) tensors of the trainable parameters, on the main process only
FULL_TRAINABLE_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
KEEP_CHECKPOINTS = 2
# How long processes wait at a collective: the others wait while the main process writes a checkpoint (tens of GB
# for a 7B teacher), longer than NCCL's default 10 minutes on a slow filesystem
COLLECTIVE_TIMEOUT = timedelta(hours=1)
Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """Optimisation settings of a fine-tuning run, and the question / answer words of its LM supervision."""

    key = "teacher"
    max_steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 3
    max_grad_norm: float = 1.0
    eval_every: int = 10
    checkpoint_every: int = 10
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    sharding: Literal["none", "fsdp"] = "none"
    positive_word: str = "tampered"
    negative_word: str = "real"
    question: str = "Is this image real or tampered? Answer with one word."

    def check(self, key: str) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, key, name, "must be at least 1")
        require(self.lr > 0, key, "lr", "must be positive")
        require(self.weight_decay >= 0, key, "weight_decay", "must not be negative")
        require(0 <= self.warmup_steps <= self.max_steps, key, "warmup_steps", "must be in [0, max_steps]")
        require(self.max_grad_norm >= 0, key, "max_grad_norm", "must not be negative (0 turns clipping off)")
        for name in ("positive_word", "negative_word", "question"):
            require(getattr(self, name).strip() != "", key, name, "must not be empty")
        require(self.positive_word != self.negative_word, key, "negative_word", "must differ from positive_word")


@dataclasses.dataclass(frozen=True)
class Batches:
    """`items` cut into batches by `collate`; shuffled per epoch from `seed + epoch`, in order when seed is None.

    `drop_last` leaves out a last, smaller batch (training batches, so that every batch splits evenly over the
    processes of a data-parallel run). `collate` returns a dict whose first tensor has the batch dimension first
    (it sets the samples/s count).
    """

    items: Sequence
    batch_size: int
    collate: Callable[[list], Batch]
    seed: int | None = None
    drop_last: bool = False

    def __len__(self) -> int:
        return len(self.items) // self.batch_size if self.drop_last else math.ceil(len(self.items) / self.batch_size)

    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> Batch:
        """Batch `index` of `epoch`; of `world` data-parallel processes, process `rank` gets every world-th item."""
        if self.seed is None:
            order = range(len(self.items))
        else:
            order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        picked = order[index * self.batch_size:(index + 1) * self.batch_size][rank::world]
        return self.collate([self.items[i] for i in picked])

    def __iter__(self) -> Iterator[Batch]:
        return (self.batch(0, i) for i in range(len(self)))


@dataclasses.dataclass
class TrainResult:
    """What a finished `train_loop` reports; the model passed in holds the trained weights."""

    history: list[dict]
    resumed_from_step: int
    seconds: float
    device: str
    mixed_precision: str
    trainable_parameters: int
    peak_memory_mb: float
    processes: int
    parallelism: str
    main_process: bool
    full_weights: dict[str, torch.Tensor] | None = None


def train_loop(model: torch.nn.Module, loss_fn: LossFn, train_batches: Batches, val_batches: Batches,
               cfg: TrainConfig, state_dir: str | Path, log_dir: str | Path,
               identity: dict | None = None, config_key: str = TrainConfig.key) -> TrainResult:
    """Train `model` in place for `cfg.max_steps` optimiser steps, resuming from `state_dir` when it holds a
    checkpoint of the same run (same `cfg` and `identity`, any JSON describing the model and data). Errors in
    `cfg` name it as `config_key`.

    Each step averages `cfg.grad_accum` micro-batches; the validation loss is computed every `cfg.eval_every`
    steps and after the last. A non-finite training loss raises LowrankError. TensorBoard events go to `log_dir`.
    Under a data-parallel launch (`lowrank_core.distributed.launch`) each process trains on its share of every
    batch, losses are averaged over the processes, and only the main process writes checkpoints and events.
    With `cfg.sharding` fsdp the model stays sharded afterwards: its trained weights, gathered, are in the result's
    `full_weights` on the main process (empty on the others).
    """
    set_seed(cfg.seed)
    accelerator = _accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if cfg.sharding != "none" and world == 1:
        log.warning("%s.sharding: %s needs more than one process (a gpu resource above 1): training unsharded",
                    config_key, cfg.sharding)
    require(cfg.batch_size % world == 0, config_key, "batch_size",
            f"must split evenly over the {world} data-parallel processes")
    if len(train_batches) == 0:
        raise ConfigError(f"{config_key}.batch_size: {train_batches.batch_size} is more than the "
                          f"{len(train_batches.items)} training records")
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{config_key}.gradient_checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # names only: FSDP frees the unsharded parameters once nothing but the model holds them
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("model has no trainable parameters")
    trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model, optimizer = accelerator.prepare(model, _adamw(model, cfg))
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    # checkpoints hold whole tensors, so a run may change its sharding and still resume
    run = {"config": {k: v for k, v in cfg.to_dict().items() if k != "sharding"}, "identity": identity or {},
           "format": CHECKPOINT_FORMAT}
    checkpoint = Path(state_dir) / "checkpoint"
    history, step = _load_checkpoint(checkpoint, run, model, trainable, optimizer, scheduler, accelerator)
    resumed_from = step
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    main = accelerator.is_main_process
    writer = SummaryWriter(str(log_dir), purge_step=step + 1 if step else None) if main else None
    started = time.perf_counter()
    before = (history[-1].get("elapsed_s") or 0.0) if history else 0.0  # training time before this run resumed
    progress = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not main)
    try:
        while step < cfg.max_steps:
            model.train()
            step_started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            losses, samples = [], 0
            for micro in range(cfg.grad_accum):
                epoch, index = divmod(step * cfg.grad_accum + micro, len(train_batches))
                batch = _to_device(train_batches.batch(epoch, index, rank, world), accelerator.device)
                sync = micro == cfg.grad_accum - 1 or sharded  # FSDP keeps unsynced gradients whole
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss = loss_fn(model, batch)
                    if not torch.isfinite(loss):
                        raise LowrankError(f"training loss is {loss.item()} at step {step + 1} (lr {lr:.3g}); "
                                           "lower the learning rate (lr) or check the inputs")
                    accelerator.backward(loss / cfg.grad_accum)
                losses.append(loss.detach())
                samples += _batch_size(batch)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            mean_loss = accelerator.reduce(torch.stack(losses).mean().float(), "mean").item()
            samples = accelerator.reduce(torch.tensor(samples, device=accelerator.device), "sum").item()
            row = {"step": step, "loss": mean_loss, "lr": lr,
                   "samples_per_s": samples / (time.perf_counter() - step_started), "val_loss": None,
                   "val_batch_losses": None}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                batch_losses = evaluate(model, loss_fn, val_batches, accelerator)
                row["val_loss"] = sum(batch_losses) / len(batch_losses)
                row["val_batch_losses"] = " ".join(f"{loss:.6g}" for loss in batch_losses)
            row["elapsed_s"] = before + time.perf_counter() - started
            history.append(row)
            if main:
                _log_row(writer, row)
            progress.update()
            progress.set_postfix(loss=f"{row['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                weights, moments = get_state_dict(model, optimizer, options=FULL_TRAINABLE_STATE)
                if main:  # a tied parameter once, under its named_parameters name
                    weights = {name: weights[name] for name in trainable}
                    _save_checkpoint(checkpoint, run, step, history, weights, moments, scheduler, accelerator)
                accelerator.wait_for_everyone()
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    return TrainResult(
        history=history, resumed_from_step=resumed_from, seconds=before + time.perf_counter() - started,
        device=str(accelerator.device), mixed_precision=accelerator.mixed_precision,
        trainable_parameters=trainable_parameters,
        peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb(),
        processes=world, parallelism="fsdp" if sharded else "ddp" if world > 1 else "none",
        main_process=main, full_weights=accelerator.get_state_dict(model) if sharded else None,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn: LossFn, batches: Batches, accelerator: Accelerator) -> list[float]:
    """`loss_fn` of each of `batches`, in order, in eval mode (the model is left in eval mode): the same batches at
    every evaluation, so two evaluations compare batch by batch. The batches are shared out over the data-parallel
    processes and every process gets all the losses. A sharded model's forwards gather its weights from every
    process, so there each process goes through all the batches."""
    model = accelerator.unwrap_model(model)  # plain forwards: DDP's would wait for processes with fewer batches
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.distributed_type == DistributedType.FSDP:
        rank, world = 0, 1
    losses = torch.zeros(2, len(batches), device=accelerator.device)  # the losses, and how many processes ran each
    for i in range(rank, len(batches), world):
        losses[0, i] = loss_fn(model, _to_device(batches.batch(0, i), accelerator.device)).float()
        losses[1, i] = 1.0
    total, count = accelerator.reduce(losses, "sum")
    return (total / count).tolist()


def write_history(history: list[dict], path: str | Path) -> None:
    """Write the per-step history as CSV (columns `HISTORY_COLUMNS`; val_loss, the mean of the validation batches'
    losses, and val_batch_losses, those losses space-separated, empty where not evaluated)."""
    with atomic_path(path) as tmp:
        pd.DataFrame(history, columns=list(HISTORY_COLUMNS)).to_csv(tmp, index=False)


def _accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator; with `cfg.sharding` fsdp, accelerate's FSDP2 plugin (weights, gradients and AdamW
    moments sharded over the processes, one FSDP unit per decoder layer / vision block). accelerate picks FSDP
    for GPU processes only; for CPU (gloo) processes it is selected here, as torch's FSDP2 runs on them too."""
    plugin = None
    if cfg.sharding == "fsdp":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                reshard_after_forward=True)
    with mock.patch.dict(os.environ):  # a plugin sets ACCELERATE_USE_FSDP, which later Accelerators would read
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_mixed_precision(cfg),
                                  fsdp_plugin=plugin,
                                  kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)


def _mixed_precision(cfg: TrainConfig) -> str:
    """bf16 / fp16 on GPU as configured (`auto`: bf16 where supported, else fp16); always fp32 on CPU."""
    if not torch.cuda.is_available():
        if cfg.mixed_precision in ("bf16", "fp16"):
            log.info("no GPU: training in fp32 instead of %s", cfg.mixed_precision)
        return "no"
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return cfg.mixed_precision


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_size(batch: Batch) -> int:
    return len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))


def _log_row(writer: SummaryWriter, row: dict) -> None:
    for name in ("loss", "lr", "samples_per_s"):
        writer.add_scalar(f"train/{name}", row[name], row["step"])
    if row["val_loss"] is not None:
        writer.add_scalar("val/loss", row["val_loss"], row["step"])


# ---------------------------------------------------------------- checkpoints (safetensors + JSON)


def _save_checkpoint(root: Path, run: dict, step: int, history: list[dict], weights: dict, optimizer_state: dict,
                     scheduler, accelerator: Accelerator) -> None:
    """Write `root/step-N` atomically (tensor files, then `trainer_state.json` with their checksums) and keep the
    last `KEEP_CHECKPOINTS` of them: a killed save or a corrupted file leaves an older checkpoint to resume from."""
    moments = {f"state.{name}.{moment}": value
               for name, entries in optimizer_state["state"].items() for moment, value in entries.items()}
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    with atomic_path(root / f"step-{step:08d}") as tmp:
        tmp.mkdir()
        save_tensors(tmp / "weights.safetensors", weights)
        save_tensors(tmp / "optimizer.safetensors", moments | rng, {"param_groups": optimizer_state["param_groups"]})
        write_json(tmp / "trainer_state.json", {
            **run, "step": step, "history": history, "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "sha256": {name: sha256(tmp / name) for name in CHECKPOINT_TENSORS},
        })
    for old in _checkpoints(root)[KEEP_CHECKPOINTS:]:
        shutil.rmtree(old)
    log.info("checkpoint at step %d in %s", step, root)


def _load_checkpoint(root: Path, run: dict, model: torch.nn.Module, names: list[str], optimizer, scheduler,
                     accelerator: Accelerator) -> tuple[list[dict], int]:
    """Restore the newest intact checkpoint of this run from `root`; (history, step), or ([], 0) when there is none.

    A checkpoint whose files are missing, unreadable or fail their checksum is skipped with a warning, so training
    goes on from the one before it, or from scratch.
    """
    for path in _checkpoints(root):
        try:
            meta, weights, tensors, opt_meta = _read_checkpoint(path)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            log.warning("%s is damaged (%s): skipping it", path, err)
            continue
        if {k: meta.get(k) for k in run} != json.loads(json.dumps(run)):
            log.warning("%s belongs to a different run (config or inputs changed): starting over", path)
            return [], 0
        if set(weights) != set(names):
            raise CheckpointError(f"{path / 'weights.safetensors'}: parameter names do not match the model")
        moments: dict[str, dict] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                name, moment = key.removeprefix("state.").rsplit(".", 1)
                moments.setdefault(name, {})[moment] = value
        set_state_dict(model, optimizer, model_state_dict=weights,
                       optim_state_dict={"state": moments, "param_groups": opt_meta["param_groups"]},
                       options=dataclasses.replace(FULL_TRAINABLE_STATE, strict=False))
        scheduler.load_state_dict(meta["scheduler"])
        if accelerator.scaler is not None and meta["scaler"] is not None:
            accelerator.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(tensors["rng.cpu"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                                          if f"rng.cuda.{i}" in tensors])
        log.info("resuming from step %d (%s)", meta["step"], path)
        return meta["history"], meta["step"]
    if root.is_dir() and any(root.iterdir()):
        log.warning("%s holds no intact checkpoint: starting from scratch", root)
    return [], 0


def _read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """A checkpoint's state JSON and tensors, after checking every tensor file against its recorded checksum."""
    meta = read_json(path / "trainer_state.json")
    for name in CHECKPOINT_TENSORS:
        if sha256(path / name) != meta["sha256"][name]:
            raise ValueError(f"{name} fails its checksum")
    weights, _ = load_tensors(path / "weights.safetensors")
    tensors, opt_meta = load_tensors(path / "optimizer.safetensors")
    return meta, weights, tensors, opt_meta


def _checkpoints(root: Path) -> list[Path]:
    """The `step-N` checkpoint directories under `root`, newest first."""
    return sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

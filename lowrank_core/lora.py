"""One arm of the LoRA ablation: a PEFT LoRA student on the base model, trained for one objective.

- A **preset** says which module kinds get adapters and with what r / alpha / dropout (PEFT `LoraConfig`);
- a **strategy** says where: a selection per part of the model (`targets`), limited to the parts the objective
  runs and resolved to full module names;
- the **init** is PEFT's (`random` = its default: Kaiming A, zero B; `gaussian`; `pissa`; `olora`; `orthogonal`; the
  data-driven `eva`, `corda`, `lora_ga`, see `inits`) or `svd`: the teacher's ΔW factors, so that the student starts
  at W_base + ΔW_r on every targeted module the teacher changed.
  Factors exported with scaling s_Δ (B_Δ A_Δ s_Δ = ΔW_r) are rescaled by sqrt(s_Δ / s) to the student's own scaling
  s = alpha / r (alpha / sqrt(r) with rsLoRA), so any alpha convention gives the same starting weight.
- the **objective** is the modality's (`modalities`): what the student adds to the model and what it minimises.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora import LoraLayer
from torch import nn

from . import __version__
from .config import Section, require
from .errors import CheckpointError, ConfigError
from .grid import DATA_INITS, FROZEN_HEAD_OBJECTIVES, INITS, OBJECTIVES
from .head import HeadConfig
from .inits import (MUTATING_INITS, CordaSettings, EvaSettings, LoraGASettings, attach, check_init, eva_state_dict,
                    init_records, peft_init_options, preprocess, process_state, seed_dependent, teacher_cost)
from .io import atomic_path, load_tensors, read_json, write_json
from .modalities import get_modality
from .modalities.base import Modality
from .modalities.depth.task import DepthTaskConfig
from .modalities.instruct.task import SftTaskConfig
from .targets import StrategyConfig, resolve_targets
from .training import Batches, TrainConfig, sha256, train_loop, write_history

log = logging.getLogger(__name__)
# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning per adapter that a user can do
# nothing about
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclasses.dataclass(frozen=True)
class PresetConfig(Section):
    """LoRA hyper-parameters: rank, alpha, dropout, the module kinds that get adapters, rsLoRA and DoRA."""

    key = "lora.presets"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    use_rslora: bool = False
    use_dora: bool = False

    def check(self, key: str) -> None:
        require(self.r >= 1, key, "r", "must be at least 1")
        require(self.alpha > 0, key, "alpha", "must be positive")
        require(0 <= self.dropout < 1, key, "dropout", "must be in [0, 1)")
        require(len(self.target_modules) > 0, key, "target_modules", "must name at least one module kind")


@dataclasses.dataclass(frozen=True)
class ArmConfig(Section):
    """Everything one arm's training reads: its four axes, seed, optimisation and objective settings."""

    key = "lora"
    objective: Literal[OBJECTIVES] = "head"
    preset: PresetConfig = PresetConfig()
    init: Literal[INITS] = "random"
    strategy: StrategyConfig = StrategyConfig()
    seed: int = 0
    train: TrainConfig = TrainConfig()
    head: HeadConfig = HeadConfig()
    fusion_tokens: int = 2
    lm_weight: float = 1.0
    pissa_niter: int = 16
    eva: EvaSettings = EvaSettings()
    corda: CordaSettings = CordaSettings()
    lora_ga: LoraGASettings = LoraGASettings()
    image_size: int | None = None
    depth: DepthTaskConfig = DepthTaskConfig()
    sft: SftTaskConfig = SftTaskConfig()

    def check(self, key: str) -> None:
        require(self.fusion_tokens >= 1, key, "fusion_tokens", "must be at least 1")
        require(self.lm_weight >= 0, key, "lm_weight", "must not be negative")
        require(self.pissa_niter >= 0, key, "pissa_niter", "must not be negative (0: exact SVD)")
        require(not (self.init == "svd" and self.preset.use_dora), key, "grid.inits",
                "svd sets W_base + ΔW_r through plain LoRA factors; it cannot start a preset with use_dora")
        require(not (self.init in MUTATING_INITS and self.preset.use_dora), key, "grid.inits",
                f"{self.init} takes its start out of the base weights, and PEFT's conversion of the trained adapter to "
                "plain LoRA on the untouched base leaves DoRA's magnitude out; it cannot start a preset with use_dora")
        require(self.init != "orthogonal" or self.preset.r % 2 == 0, key, "grid.inits",
                f"orthogonal splits one r×r rotation in halves; it needs an even r (the preset's is {self.preset.r})")
        require(self.train.sharding == "none", f"{key}.train", "sharding",
                "fsdp is for the teacher's full fine-tune; LoRA arms run data-parallel (resources.train_lora.gpu)")


def arm_targets(model: nn.Module, arm: ArmConfig, modality: Modality, backend: str = "transformers",
                strategy_key: str = "lora.strategies", preset_key: str = "lora.presets") -> list[str]:
    """The arm's target modules on `model` (`resolve_targets` over the towers its objective runs), without an
    lm_head tied to the input embeddings; ConfigError if the objective is not the modality's or no module is left."""
    if arm.objective not in modality.info.objectives:
        raise ConfigError(f"lora.grid.objectives: {arm.objective} is not an objective of model.modality "
                          f"{modality.name} ({', '.join(modality.info.objectives)})")
    active = modality.active_towers(arm.objective)
    targets = resolve_targets(model, arm.preset, arm.strategy, active, strategy_key, preset_key,
                              modality.family(backend))
    if "lm_head" in targets and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        log.warning("lm_head shares its weight with the input embeddings: it gets no adapter, since merging one (or "
                    "a PiSSA / OLoRA init) would change the embeddings too")
        targets.remove("lm_head")
    if not targets:
        raise ConfigError(f"{strategy_key}: the strategy puts no adapter where objective {arm.objective} runs "
                          f"({', '.join(sorted(active))}) for target_modules {list(arm.preset.target_modules)}")
    return targets


# ---------------------------------------------------------------- the student


def student_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch)


def build_student(info: dict, arm: ArmConfig, head_path: str | Path | None = None,
                  delta_dir: str | Path | None = None, train_records: list | None = None,
                  init_dir: str | Path | None = None) -> tuple[nn.Module, list[str], object]:
    """Load the base model (`info`: its model.json) and start the arm's student on it (`start_student`). Returns the
    student, the resolved target-module names and the processor."""
    model, processor = get_modality(info["modality"]).load(info)
    student, targets, _ = start_student(info, model, processor, arm, head_path, delta_dir, train_records, init_dir)
    return student, targets, processor


def start_student(info: dict, model: nn.Module, processor, arm: ArmConfig, head_path: str | Path | None = None,
                  delta_dir: str | Path | None = None, train_records: list | None = None,
                  init_dir: str | Path | None = None) -> tuple[nn.Module, list[str], dict]:
    """Put the arm's adapters on the loaded base `model`, started by the arm's init, and add the objective's parts
    (the modality's student; its fresh parts are drawn first, from the arm's seed).

    The data-driven inits first preprocess the first `train_records` (`inits.preprocess`), cached in `init_dir` when
    given: one file serves every seed of the arm, unless the student's fresh parts make it the seed's own. Returns the
    student, the resolved target-module names and what the start cost: `init_seconds` (the adapters' initialisation
    plus the preprocessing, as measured when it was computed; for svd plus the teacher's fine-tune and the ΔW export),
    `init_peak_memory_mb` (the preprocessing's, the teacher's for svd, None for inits without either) and
    `init_preprocessing` (`shared` by the arm's seeds, `per seed`, `teacher` or None) and `init_factors` (svd: the
    ΔW factor file it started from).
    """
    modality = get_modality(info["modality"])
    targets = arm_targets(model, arm, modality, info.get("backend", "transformers"))
    if arm.init in DATA_INITS and train_records is None:
        raise CheckpointError(f"init {arm.init}: no training records given to preprocess")
    check_init(model, targets, arm, modality, len(train_records or ()))
    log.info("%d target modules: %s", len(targets), ", ".join(targets))
    started, spent, upstream, preprocessing, factors = time.perf_counter(), 0.0, None, None, None
    torch.manual_seed(arm.seed)
    student = modality.student(model, arm, processor, head_path)
    config = LoraConfig(r=arm.preset.r, lora_alpha=arm.preset.alpha, lora_dropout=arm.preset.dropout,
                        target_modules=targets, use_rslora=arm.preset.use_rslora, use_dora=arm.preset.use_dora,
                        **peft_init_options(arm))
    if arm.init in DATA_INITS:
        shared = not seed_dependent(student)
        preprocessing = "shared" if shared else "per seed"
        cache = Path(init_dir) / f"{arm.init}{'' if shared else f'-seed{arm.seed}'}.safetensors" if init_dir else None
        records = train_records[:init_records(arm)]
        identity = {"model": info["path"], "targets": targets, "records": [modality.record_id(r) for r in records],
                    "arm": {k: v for k, v in arm.to_dict().items() if k != "seed" or not shared}}
        spent = time.perf_counter()
        tensors, upstream = preprocess(student, config, arm, modality.batcher(processor, arm), records, cache, identity)
        spent = time.perf_counter() - spent
        attach(model, arm.init, tensors)
    student.model = get_peft_model(model, config, low_cpu_mem_usage=arm.init == "eva")
    if arm.init == "eva":
        initialize_lora_eva_weights(student.model, eva_state_dict=eva_state_dict(tensors), show_progress_bar=False)
        log.info("eva ranks (r %d unless listed): %s", arm.preset.r, student.model.peft_config["default"].rank_pattern)
    if arm.init == "svd":
        factors = _init_from_delta(student.model, delta_dir)
        upstream, preprocessing = teacher_cost(delta_dir), "teacher"
    seconds = time.perf_counter() - started - spent + (upstream["seconds"] if upstream else 0.0)
    return student, targets, {"init_seconds": seconds, "init_peak_memory_mb": upstream and upstream["peak_memory_mb"],
                              "init_preprocessing": preprocessing, "init_factors": factors}


def _init_from_delta(peft_model: PeftModel, delta_dir: str | Path | None) -> str:
    """Overwrite the adapters with the teacher's ΔW factors, rescaled to each layer's scaling (module docstring), from
    the factor file of the smallest exported rank >= the adapters' (its name returned)."""
    if delta_dir is None:
        raise CheckpointError("init svd: no ΔW export (results/delta) given")
    layers = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
              if isinstance(module, LoraLayer)}
    rank = next(iter(layers.values())).r["default"]
    files = sorted((int(p.stem.removeprefix("factors_r")), p) for p in Path(delta_dir).glob("factors_r*.safetensors"))
    usable = [(r, p) for r, p in files if r >= rank]
    if not usable:
        raise ConfigError(f"delta.ranks: init svd needs factors of rank >= {rank}; {delta_dir} has ranks "
                          f"{[r for r, _ in files] or 'none'}")
    factors, meta = load_tensors(usable[0][1])
    initialised = 0
    with torch.no_grad():
        for name, layer in layers.items():
            if f"{name}.lora_A" not in factors:
                continue
            ratio = math.sqrt(meta["scaling"] / layer.scaling["default"])
            lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # conv: [r, in, k, k]
            lora_a.copy_((factors[f"{name}.lora_A"][:rank] * ratio).reshape(lora_a.shape))
            lora_b.copy_((factors[f"{name}.lora_B"][:, :rank] * ratio).reshape(lora_b.shape))
            initialised += 1
    log.info("svd init: %d of %d adapted modules start at W_base + ΔW_%d (from %s)", initialised, len(layers),
             rank, usable[0][1].name)
    if not initialised:
        raise ConfigError(f"init svd: the teacher changed none of the targeted modules ({usable[0][1]})")
    return usable[0][1].name


# ---------------------------------------------------------------- training one arm


def train_lora(model_info_json: str | Path, manifest_json: str | Path, arm: ArmConfig, out_dir: str | Path,
               state_dir: str | Path, log_dir: str | Path, head_path: str | Path | None = None,
               delta_dir: str | Path | None = None, init_dir: str | Path | None = None) -> dict:
    """Train one arm for `arm.train.max_steps` steps and write it to `out_dir` atomically.

    `out_dir` holds `adapter/` (PEFT format, plain LoRA: adapters of inits that change the base weights, PiSSA /
    OLoRA / CorDA / LoRA-GA, are converted), the parts the objective trains beside it (a head, a fusion projection),
    `target_modules.json`, `history.csv` and `train_stats.json` (with the start's cost, see `start_student`).
    Checkpoints go to `state_dir`, a data-driven init's preprocessing to `init_dir` (the arm's seeds share it; by
    default `state_dir/init`), TensorBoard events to `log_dir`. Returns the stats.
    """
    info = read_json(model_info_json)
    splits = read_json(manifest_json)["splits"]
    modality = get_modality(info["modality"])
    model, processor = modality.load(info)
    student, targets, init_cost = start_student(info, model, processor, arm, head_path, delta_dir,
                                                splits["train"]["records"], init_dir or Path(state_dir) / "init")
    batcher = modality.batcher(processor, arm)
    cfg = dataclasses.replace(arm.train, seed=arm.seed)
    train = Batches(splits["train"]["records"], cfg.batch_size, batcher, seed=cfg.seed, drop_last=True)
    val = Batches(splits["val"]["records"], cfg.batch_size, batcher)
    state_dir = Path(state_dir)
    initial_adapter = state_dir / "initial_adapter"
    if arm.init in MUTATING_INITS:  # the starting point PEFT converts the trained adapter against
        state = process_state()
        if state.is_main_process:
            student.model.save_pretrained(initial_adapter, save_embedding_layers=False)
        state.wait_for_everyone()
    identity = {"model": info["path"], "arm": arm.to_dict(), "targets": targets,
                "train_records": [modality.record_id(r) for r in train.items],
                "inputs": {str(p): sha256(p) for p in _input_files(arm, head_path, delta_dir)}}
    result = train_loop(student, student_loss, train, val, cfg, state_dir, log_dir, identity=identity,
                        config_key="lora.train")
    total = sum(p.numel() for p in student.parameters())
    stats = {
        "objective": arm.objective, "init": arm.init, "seed": arm.seed, "train": cfg.to_dict(),
        "target_modules": len(targets),
        "trainable_parameters": result.trainable_parameters, "total_parameters": total,
        "trainable_percent": 100 * result.trainable_parameters / total,
        "peak_memory_mb": result.peak_memory_mb, "peak_memory_kind": "cuda_max_allocated" if
        result.device.startswith("cuda") else "process_peak_rss", "train_seconds": result.seconds,
        "samples_per_s": _mean(row["samples_per_s"] for row in result.history if row["step"] > 1),
        "steps": result.history[-1]["step"], "resumed_from_step": result.resumed_from_step,
        "device": result.device, "mixed_precision": result.mixed_precision, "processes": result.processes,
        "parallelism": result.parallelism, **init_cost, **modality.train_counters(student),
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft")}
        | {"lowrank_core": __version__},
    }
    if not result.main_process:
        return stats
    with atomic_path(out_dir) as tmp:
        convert = {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter.exists() else {}
        student.model.save_pretrained(tmp / "adapter", save_embedding_layers=False, **convert)
        modality.save_parts(student, tmp)
        write_json(tmp / "target_modules.json", targets)
        write_history(result.history, tmp / "history.csv")
        stats["adapter_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*.safetensors"))
        write_json(tmp / "train_stats.json", stats)
    log.info("arm %s/%s: %d steps, loss %.4f -> %.4f, %d trainable parameters (%.2f%%) -> %s", arm.objective,
             arm.init, stats["steps"], result.history[0]["loss"], result.history[-1]["loss"],
             stats["trainable_parameters"], stats["trainable_percent"], out_dir)
    return stats


def load_student(info: dict, arm: ArmConfig, arm_dir: str | Path,
                 head_path: str | Path | None = None) -> tuple[nn.Module, list[str], object]:
    """A trained arm back from `arm_dir` in eval mode: plain `PeftModel.from_pretrained` on a fresh base, plus the
    parts its objective trained; with its target-module names and the processor."""
    arm_dir = Path(arm_dir)
    modality = get_modality(info["modality"])
    model, processor = modality.load(info)
    model = PeftModel.from_pretrained(model, arm_dir / "adapter")
    student = modality.student(model, arm, processor, head_path, arm_dir)
    return student.eval(), read_json(arm_dir / "target_modules.json"), processor


def _input_files(arm: ArmConfig, head_path, delta_dir) -> list[Path]:
    files = [Path(head_path)] if head_path and arm.objective in FROZEN_HEAD_OBJECTIVES else []
    if arm.init == "svd" and delta_dir:
        files += sorted(Path(delta_dir).glob("factors_r*.safetensors"))
    return files


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None

"""One arm of the LoRA ablation: a PEFT LoRA student on the base model, trained for one objective.

- A **preset** says which module kinds get adapters and with what r / alpha / dropout (PEFT `LoraConfig`);
- a **strategy** says where: vision blocks, merger, language-model layers, `lm_head`, each as `all`, `none`, a
  fraction range of the depth (`0.5:1` = the later half), an inclusive index range (`12-23`) or a list of indices.
  Their intersection, limited to the parts the objective runs, is resolved to full module names (so a language
  `gate_proj` never catches the vision tower's `mlp.gate_proj` by accident). In the vision tower the fused
  `attn.qkv` stands for q/k/v_proj, `attn.proj` for o_proj and Qwen3-VL's `linear_fc1` / `linear_fc2` for
  up_proj / down_proj.
- the **init** is PEFT's (`random` = its default: Kaiming A, zero B; `gaussian`; `pissa`; `olora`) or `svd`: the
  teacher's ΔW factors, so that the student starts at W_base + ΔW_r on every targeted module the teacher changed.
  Factors exported with scaling s_Δ (B_Δ A_Δ s_Δ = ΔW_r) are rescaled by sqrt(s_Δ / s) to the student's own scaling
  s = alpha / r (alpha / sqrt(r) with rsLoRA), so any alpha convention gives the same starting weight.
- the **objective**: `head` (vision LoRA + a fresh detection head, trained jointly), `head_frozen` (the pre-trained
  head, frozen), `lm` (answer words supervised through the language model), `hybrid` (fusion tokens projected from
  the vision tokens and the head's pooled features, written after the image in the language model's input;
  head loss + lm_weight × LM loss), `hybrid_frozen` (the same with the pre-trained head frozen).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from . import __version__
from .config import Section, require
from .errors import CheckpointError, ConfigError
from .features import token_masks
from .grid import FROZEN_HEAD_OBJECTIVES, INITS, OBJECTIVES, VISION_OBJECTIVES
from .head import DetectionHead, HeadConfig, head_losses, load_head, save_head
from .io import atomic_path, load_tensors, read_json, save_tensors, write_json
from .lm_data import IGNORE_INDEX, ChatBatcher
from .modeling import load_model, load_processor
from .training import Batches, TrainConfig, sha256, train_loop, write_history

log = logging.getLogger(__name__)
# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning per adapter that a user can do
# nothing about
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

Layers = str | list[int]
TOWERS = ("vision", "merger", "language", "lm_head")
_TOWER_PATTERNS = {
    "vision": re.compile(r"^model\.visual\.blocks\.(\d+)\.(.+)$"),
    "merger": re.compile(r"^model\.visual\.(?:merger|deepstack_merger_list\.\d+)\.(.+)$"),
    "language": re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.(.+)$"),
    "lm_head": re.compile(r"^lm_head$"),
}
# Vision-tower module leaf names and the preset target names they stand for.
_VISION_ALIASES = {"qkv": {"q_proj", "k_proj", "v_proj"}, "proj": {"o_proj"},
                   "linear_fc1": {"up_proj"}, "linear_fc2": {"down_proj"}}
_LAYER_RANGE = re.compile(r"^(\d+)-(\d+)$")
_FRACTION_RANGE = re.compile(r"^(\d*\.?\d+):(\d*\.?\d+)$")
BATCH_EXTRAS = ("image_labels", "token_masks", "has_mask", "fusion_mask")  # not model inputs


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
class StrategyConfig(Section):
    """Where adapters go: layer selections of the vision tower and the language model, merger and lm_head."""

    key = "lora.strategies"
    vision: Layers = "none"
    merger: bool = False
    language: Layers = "none"
    lm_head: bool = False

    def check(self, key: str) -> None:
        for tower in ("vision", "language"):
            selection = getattr(self, tower)
            if isinstance(selection, str):
                fraction = _FRACTION_RANGE.match(selection)
                span = _LAYER_RANGE.match(selection)
                require(selection in ("all", "none") or bool(span and int(span[1]) <= int(span[2]))
                        or bool(fraction and float(fraction[1]) < float(fraction[2]) <= 1), key, tower,
                        f"{selection!r} is not all, none, a fraction range like 0.5:1, or an ascending index range "
                        "like 12-23")


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
    image_size: int | None = None

    def check(self, key: str) -> None:
        require(self.fusion_tokens >= 1, key, "fusion_tokens", "must be at least 1")
        require(self.lm_weight >= 0, key, "lm_weight", "must not be negative")
        require(self.pissa_niter >= 0, key, "pissa_niter", "must not be negative (0: exact SVD)")
        require(not (self.init == "svd" and self.preset.use_dora), key, "grid.inits",
                "svd sets W_base + ΔW_r through plain LoRA factors; it cannot start a preset with use_dora")
        require(self.train.sharding == "none", f"{key}.train", "sharding",
                "fsdp is for the teacher's full fine-tune; LoRA arms run data-parallel (resources.train_lora.gpu)")

    @property
    def has_head(self) -> bool:
        return self.objective in VISION_OBJECTIVES

    @property
    def has_lm(self) -> bool:
        return self.objective in ("lm", "hybrid", "hybrid_frozen")

    def towers(self) -> set[str]:
        """The parts of the network the objective's forward pass runs through."""
        return {"vision", "merger"} | ({"language", "lm_head"} if self.has_lm else set())


# ---------------------------------------------------------------- where the adapters go


def select_layers(selection: Layers, depth: int, key: str) -> set[int]:
    """The block indices `selection` picks out of `depth` blocks (see the module docstring for the forms)."""
    if isinstance(selection, (list, tuple)):
        picked = set(selection)
    elif selection == "all":
        picked = set(range(depth))
    elif selection == "none":
        picked = set()
    elif match := _LAYER_RANGE.match(selection):
        picked = set(range(int(match[1]), int(match[2]) + 1))
    else:
        start, stop = map(float, _FRACTION_RANGE.match(selection).groups())
        picked = set(range(round(start * depth), round(stop * depth)))
    outside = sorted(i for i in picked if not 0 <= i < depth)
    if outside:
        raise ConfigError(f"{key}: layer {outside[0]} is outside this model's {depth} blocks (0-{depth - 1})")
    return picked


def resolve_targets(model: nn.Module, preset: PresetConfig, strategy: StrategyConfig, towers: set[str],
                    key: str = "lora.strategies", preset_key: str = "lora.presets") -> list[str]:
    """Full names of the linear modules that get adapters: the strategy's places (within `towers`) ∩ the preset's
    module kinds; the merger and lm_head take every linear module they have.

    Raises ConfigError (naming `key` or `preset_key`) for a layer outside the model, or for a module kind that
    matches no module in the blocks the strategy selects (a typo would otherwise train on the rest).
    """
    kinds = set(preset.target_modules)
    found: dict[str, list[tuple[int, str, str]]] = {tower: [] for tower in TOWERS}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for tower, pattern in _TOWER_PATTERNS.items():
            if match := pattern.match(name):
                layer = int(match[1]) if tower in ("vision", "language") else 0
                found[tower].append((layer, name, name.rsplit(".", 1)[-1]))
                break
    targets, covered, selects_blocks = [], set(), False
    for tower in ("vision", "language"):
        if not found[tower]:
            continue
        depth = max(layer for layer, _, _ in found[tower]) + 1
        layers = select_layers(getattr(strategy, tower), depth, f"{key}.{tower}")
        selected = [(name, leaf) for layer, name, leaf in found[tower] if layer in layers]
        selects_blocks |= bool(selected)
        covered |= {kind for _, leaf in selected for kind in {leaf} | _VISION_ALIASES.get(leaf, set())}
        if tower in towers:
            targets += [name for name, leaf in selected if leaf in kinds or kinds & _VISION_ALIASES.get(leaf, set())]
    unmatched = sorted(kinds - covered)
    if selects_blocks and unmatched:
        raise ConfigError(f"{preset_key}.target_modules: {unmatched[0]!r} matches no module in the blocks {key} "
                          f"selects (their kinds: {', '.join(sorted(covered))})")
    for tower in ("merger", "lm_head"):
        if tower in towers and getattr(strategy, tower):
            targets += [name for _, name, _ in found[tower]]
    return targets


def arm_targets(model: nn.Module, arm: ArmConfig, is_vision: bool, strategy_key: str = "lora.strategies",
                preset_key: str = "lora.presets") -> list[str]:
    """The arm's target modules on `model` (`resolve_targets` over the parts its objective runs), without an
    lm_head tied to the input embeddings; ConfigError if that leaves none."""
    if arm.has_head and not is_vision:
        raise ConfigError(f"lora.grid.objectives: {arm.objective} needs a vision-language model")
    towers = arm.towers() if is_vision else {"language", "lm_head"}
    targets = resolve_targets(model, arm.preset, arm.strategy, towers, strategy_key, preset_key)
    if "lm_head" in targets and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        log.warning("lm_head shares its weight with the input embeddings: it gets no adapter, since merging one (or "
                    "a PiSSA / OLoRA init) would change the embeddings too")
        targets.remove("lm_head")
    if not targets:
        raise ConfigError(f"{strategy_key}: the strategy puts no adapter where objective {arm.objective} runs "
                          f"({', '.join(sorted(towers))}) for target_modules {list(arm.preset.target_modules)}")
    return targets


# ---------------------------------------------------------------- the student


class LoraStudent(nn.Module):
    """The (PEFT-wrapped) model plus what the objective adds: a detection head and a fusion projection.

    `forward(batch)` returns the objective's loss; `outputs(batch)` its raw outputs for evaluation.
    A frozen head stays in eval mode while the rest trains.
    """

    def __init__(self, model: nn.Module, arm: ArmConfig, head: DetectionHead | None = None,
                 fusion: nn.Linear | None = None, merge_size: int = 2):
        super().__init__()
        self.model, self.arm, self.head, self.fusion, self.merge_size = model, arm, head, fusion, merge_size
        self.frozen_head = arm.objective in FROZEN_HEAD_OBJECTIVES
        if self.frozen_head and head is not None:
            head.requires_grad_(False)

    def train(self, mode: bool = True) -> LoraStudent:
        super().train(mode)
        if self.frozen_head and self.head is not None:
            self.head.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.outputs(batch)
        loss = torch.zeros((), device=batch["input_ids"].device)
        if "image_logits" in out:
            classification, localisation = head_losses(out["image_logits"], out["map_logits"], batch["image_labels"],
                                                       batch["token_masks"], batch["has_mask"], self.arm.head.loc_loss)
            loss = loss + classification + self.arm.head.loc_weight * localisation
        if "lm" in out:
            loss = loss + (self.arm.lm_weight if self.head is not None else 1.0) * out["lm"].loss
        return loss

    def outputs(self, batch: dict[str, torch.Tensor]) -> dict:
        """`image_logits` / `map_logits` where there is a head, `lm` (the model output) where there is an LM loss."""
        out, lm_kwargs = {}, {}
        model_inputs = {k: v for k, v in batch.items() if k not in BATCH_EXTRAS}
        if self.head is not None:
            grid_thw = batch["image_grid_thw"]
            features = self._base().get_image_features(batch["pixel_values"], grid_thw, return_dict=True)
            tokens = torch.stack(list(features.pooler_output))
            grid_h, grid_w = (int(v) // self.merge_size for v in grid_thw[0, 1:])
            out["image_logits"], out["map_logits"], pooled = self.head.outputs(tokens, grid_h, grid_w)
            if self.fusion is not None:
                model_inputs.pop("pixel_values")
                fused = self.fusion(torch.cat([tokens.mean(dim=1), pooled.to(tokens.dtype)], dim=-1))
                embeds = self._base().get_input_embeddings()(batch["input_ids"])
                fused = fused.to(embeds.dtype).reshape(-1, embeds.shape[-1])
                lm_kwargs = {"inputs_embeds": embeds.masked_scatter(batch["fusion_mask"].bool()[..., None], fused),
                             "mm_encoder_outputs": {"image": features}}
        if self.arm.has_lm:
            out["lm"] = self.model(**model_inputs, **lm_kwargs, use_cache=False)
        return out

    def _base(self) -> nn.Module:
        """The transformers model under the PEFT wrapper (its modules carry the adapters)."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model


def student_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch)


@dataclasses.dataclass
class ArmBatcher:
    """Chat batches (see `ChatBatcher`) plus the image-level labels and token masks a detection head needs."""

    chat: ChatBatcher
    grid: tuple[int, int] | None = None

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.chat(records)
        batch["image_labels"] = torch.tensor([r["label"] for r in records])
        if self.grid is not None:
            batch["token_masks"], batch["has_mask"] = token_masks(records, self.chat.image_size, *self.grid)
        return batch


def build_student(model_path: str, arm: ArmConfig, processor, trust_remote_code: bool = False,
                  dtype: str = "float32", head_path: str | Path | None = None,
                  delta_dir: str | Path | None = None) -> tuple[LoraStudent, list[str]]:
    """Load the base model, put the arm's adapters on it with the arm's init, and add the objective's parts.

    Returns the student and the resolved target-module names.
    """
    model = load_model(model_path, dtype, trust_remote_code)
    is_vision = hasattr(processor, "image_processor")
    targets = arm_targets(model, arm, is_vision)
    log.info("%d target modules: %s", len(targets), ", ".join(targets))
    torch.manual_seed(arm.seed)
    peft_model = get_peft_model(model, LoraConfig(
        r=arm.preset.r, lora_alpha=arm.preset.alpha, lora_dropout=arm.preset.dropout, target_modules=targets,
        use_rslora=arm.preset.use_rslora, use_dora=arm.preset.use_dora, init_lora_weights=_peft_init(arm)))
    if arm.init == "svd":
        _init_from_delta(peft_model, delta_dir)
    head = fusion = None
    if arm.has_head:
        in_dim = peft_model.get_base_model().get_input_embeddings().embedding_dim
        if arm.objective in FROZEN_HEAD_OBJECTIVES:
            head = load_head(head_path) if head_path else None
            if head is None:
                raise CheckpointError(f"objective {arm.objective}: no pre-trained head checkpoint given")
            if head.init_args["in_dim"] != in_dim:
                raise CheckpointError(f"{head_path}: head takes {head.init_args['in_dim']} channels, the model's "
                                      f"vision tokens have {in_dim}")
        else:
            head = DetectionHead(in_dim, arm.head.hidden, arm.head.dropout)
        if arm.objective.startswith("hybrid"):
            fusion = nn.Linear(in_dim + 2 * head.init_args["hidden"], arm.fusion_tokens * in_dim)
    merge_size = getattr(getattr(processor, "image_processor", None), "merge_size", 2)
    return LoraStudent(peft_model, arm, head, fusion, merge_size), targets


def _peft_init(arm: ArmConfig) -> bool | str:
    if arm.init == "pissa":
        return f"pissa_niter_{arm.pissa_niter}" if arm.pissa_niter else "pissa"
    return {"random": True, "svd": True, "gaussian": "gaussian", "olora": "olora"}[arm.init]


def _init_from_delta(peft_model: PeftModel, delta_dir: str | Path | None) -> None:
    """Overwrite the adapters with the teacher's ΔW factors, rescaled to each layer's scaling (module docstring)."""
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
            layer.lora_A["default"].weight.copy_(factors[f"{name}.lora_A"][:rank] * ratio)
            layer.lora_B["default"].weight.copy_(factors[f"{name}.lora_B"][:, :rank] * ratio)
            initialised += 1
    log.info("svd init: %d of %d adapted modules start at W_base + ΔW_%d (from %s)", initialised, len(layers),
             rank, usable[0][1].name)
    if not initialised:
        raise ConfigError(f"init svd: the teacher changed none of the targeted modules ({usable[0][1]})")


# ---------------------------------------------------------------- training one arm


def train_lora(model_info_json: str | Path, manifest_json: str | Path, arm: ArmConfig, out_dir: str | Path,
               state_dir: str | Path, log_dir: str | Path, head_path: str | Path | None = None,
               delta_dir: str | Path | None = None) -> dict:
    """Train one arm for `arm.train.max_steps` steps and write it to `out_dir` atomically.

    `out_dir` holds `adapter/` (PEFT format, plain LoRA: PiSSA / OLoRA adapters are converted), `head.safetensors`
    + `head.json` and `fusion.safetensors` where the objective trains them, `target_modules.json`, `history.csv`
    and `train_stats.json`. Checkpoints go to `state_dir`, TensorBoard events to `log_dir`. Returns the stats.
    """
    info = read_json(model_info_json)
    splits = read_json(manifest_json)["splits"]
    processor = load_processor(info["path"], info.get("trust_remote_code", False))
    student, targets = build_student(info["path"], arm, processor, info.get("trust_remote_code", False),
                                     info["dtype"], head_path, delta_dir)
    batcher = arm_batcher(processor, arm)
    cfg = dataclasses.replace(arm.train, seed=arm.seed)
    train = Batches(splits["train"]["records"], cfg.batch_size, batcher, seed=cfg.seed, drop_last=True)
    val = Batches(splits["val"]["records"], cfg.batch_size, batcher)
    state_dir = Path(state_dir)
    initial_adapter = state_dir / "initial_adapter"
    if arm.init in ("pissa", "olora"):  # the starting point PEFT converts the trained adapter against
        state = PartialState()
        if state.is_main_process:
            student.model.save_pretrained(initial_adapter, save_embedding_layers=False)
        state.wait_for_everyone()
    identity = {"model": info["path"], "arm": arm.to_dict(), "targets": targets,
                "train_records": [r.get("image_path", r.get("text")) for r in train.items],
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
        "parallelism": result.parallelism,
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft")}
        | {"lowrank_core": __version__},
    }
    if not result.main_process:
        return stats
    with atomic_path(out_dir) as tmp:
        convert = {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter.exists() else {}
        student.model.save_pretrained(tmp / "adapter", save_embedding_layers=False, **convert)
        if student.head is not None and not student.frozen_head:
            save_head(student.head, tmp / "head.safetensors", {"objective": arm.objective})
        if student.fusion is not None:
            save_tensors(tmp / "fusion.safetensors", {k: v.detach().cpu() for k, v in student.fusion.state_dict().items()})
        write_json(tmp / "target_modules.json", targets)
        write_history(result.history, tmp / "history.csv")
        stats["adapter_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*.safetensors"))
        write_json(tmp / "train_stats.json", stats)
    log.info("arm %s/%s: %d steps, loss %.4f -> %.4f, %d trainable parameters (%.2f%%) -> %s", arm.objective,
             arm.init, stats["steps"], result.history[0]["loss"], result.history[-1]["loss"],
             stats["trainable_parameters"], stats["trainable_percent"], out_dir)
    return stats


def arm_batcher(processor, arm: ArmConfig) -> ArmBatcher:
    """The arm's batches: chat prompts with the answer word, image inputs, and head targets where needed."""
    is_vision = hasattr(processor, "image_processor")
    if is_vision and arm.image_size is None:
        raise ConfigError("lora.image_size: a vision-language model needs the image size (features.image_size)")
    chat = ChatBatcher(processor, arm.train.question, arm.train.positive_word, arm.train.negative_word,
                       arm.image_size if is_vision else None,
                       fusion_tokens=arm.fusion_tokens if arm.objective.startswith("hybrid") else 0)
    grid = None
    if is_vision:
        image_processor = processor.image_processor
        side = arm.image_size // (image_processor.patch_size * image_processor.merge_size)
        grid = (side, side)
    return ArmBatcher(chat, grid)


def load_student(model_path: str, arm: ArmConfig, arm_dir: str | Path, processor, trust_remote_code: bool = False,
                 dtype: str = "float32", head_path: str | Path | None = None) -> tuple[LoraStudent, list[str]]:
    """A trained arm back from `arm_dir`: plain `PeftModel.from_pretrained` on a fresh base, plus its head/fusion."""
    arm_dir = Path(arm_dir)
    targets = read_json(arm_dir / "target_modules.json")
    model = PeftModel.from_pretrained(load_model(model_path, dtype, trust_remote_code), arm_dir / "adapter")
    head = fusion = None
    if arm.has_head:
        head = load_head(head_path if arm.objective in FROZEN_HEAD_OBJECTIVES else arm_dir / "head.safetensors")
    if arm.objective.startswith("hybrid"):
        weights, _ = load_tensors(arm_dir / "fusion.safetensors")
        fusion = nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
        fusion.load_state_dict(weights)
    merge_size = getattr(getattr(processor, "image_processor", None), "merge_size", 2)
    return LoraStudent(model, arm, head, fusion, merge_size).eval(), targets


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the summed log-probability of the labelled (answer) tokens, and how many there are."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (picked * keep).sum(dim=1), keep.sum(dim=1)


def _input_files(arm: ArmConfig, head_path, delta_dir) -> list[Path]:
    files = [Path(head_path)] if head_path and arm.objective in FROZEN_HEAD_OBJECTIVES else []
    if arm.init == "svd" and delta_dir:
        files += sorted(Path(delta_dir).glob("factors_r*.safetensors"))
    return files


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None

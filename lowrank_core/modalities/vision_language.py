"""The vision-language modality: a Qwen-VL model reads an image and answers whether it is real or tampered.

Records are images with labels and tamper masks (`data.py`). Objectives: `head` (vision LoRA + a fresh detection
head, trained jointly), `head_frozen` (the pre-trained head, frozen), `lm` (answer words supervised through the
language model), `hybrid` (fusion tokens projected from the vision tokens and the head's pooled features, written
after the image in the language model's input; head loss + lm_weight × LM loss), `hybrid_frozen` (the same with the
pre-trained head frozen). The teacher and the reference models answer through the language model (`lm`).

Classification scores come from the detection head where the objective has one, otherwise from the language model:
p(positive answer) / (p(positive) + p(negative)), the answers' summed token log-probabilities compared. Arms with
an LM objective (and the references) also get the test LM loss (mean cross-entropy per answer token) and its
perplexity; arms with a head get pixel F1 / IoU of its heat maps.

Every evaluation also gives its per-sample answers (`predictions`, written as `predictions.csv`): where a head
decides, its word at the threshold; otherwise the whole model's: the words its language model generates greedily for
the prompt, scored against the label's word by exact match after normalisation (`generated_accuracy`: a model that
answers anything but one of the two words is wrong, however its log-probabilities rank them).

transformers, PEFT and accelerate are imported where a model is built, loaded or batched: the dataset and table
jobs load this module too, and would spend seconds importing them.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data
from ..data import DatasetConfig, load_image
from ..errors import CheckpointError, ConfigError
from ..generation import greedy_generate, prediction_metrics, score_predictions
from ..grid import FROZEN_HEAD_OBJECTIVES, VISION_OBJECTIVES
from ..head import DetectionHead, head_losses, load_head, save_head
from ..io import load_tensors, save_tensors
from ..lm_data import IGNORE_INDEX, ChatBatcher
from ..metrics import classification_metrics, pixel_metrics, read_pixel_mask
from ..targets import QWEN, Family
from .base import Modality

BATCH_EXTRAS = ("image_labels", "token_masks", "has_mask", "fusion_mask")  # not model inputs
CLASSIFICATION_COLUMNS = ("accuracy", "f1", "roc_auc", "roc_auc_low", "roc_auc_high", "average_precision",
                          "positive_rate")


class LoraStudent(nn.Module):
    """The (PEFT-wrapped) model plus what the objective adds: a detection head and a fusion projection.

    `forward(batch)` returns the objective's loss; `outputs(batch)` its raw outputs for evaluation.
    A frozen head stays in eval mode while the rest trains.
    """

    def __init__(self, model: nn.Module, arm, head: DetectionHead | None = None, fusion: nn.Linear | None = None,
                 merge_size: int = 2):
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
        out = {}
        model_inputs = {k: v for k, v in batch.items() if k not in BATCH_EXTRAS}
        if self.head is not None:
            grid_thw = batch["image_grid_thw"]
            features = _base(self.model).get_image_features(batch["pixel_values"], grid_thw, return_dict=True)
            tokens = torch.stack(list(features.pooler_output))
            grid_h, grid_w = (int(v) // self.merge_size for v in grid_thw[0, 1:])
            out["image_logits"], out["map_logits"], pooled = self.head.outputs(tokens, grid_h, grid_w)
            if self.fusion is not None:
                fused = self.fusion(torch.cat([tokens.mean(dim=1), pooled.to(tokens.dtype)], dim=-1))
                model_inputs = fusion_inputs(_base(self.model), model_inputs, fused, batch["fusion_mask"], features)
        if self.arm.objective not in ("head", "head_frozen"):
            out["lm"] = self.model(**model_inputs, use_cache=False)
        return out


@dataclasses.dataclass
class ArmBatcher:
    """Chat batches (see `ChatBatcher`) plus the image-level labels and token masks a detection head needs."""

    chat: ChatBatcher
    grid: tuple[int, int] | None = None

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.chat(records)
        batch["image_labels"] = torch.tensor([r["label"] for r in records])
        if self.grid is not None:
            from ..features import token_masks

            batch["token_masks"], batch["has_mask"] = token_masks(records, self.chat.image_size, *self.grid)
        return batch


class VisionLanguage(Modality):
    name = "vision_language"

    def check_source(self, dataset: DatasetConfig) -> None:
        data.check_source(dataset, self.name)

    def train_records(self, dataset: DatasetConfig) -> int:
        if dataset.source == "synthetic":
            return dataset.synthetic.train
        return len(data.read_records(Path(dataset.source) / dataset.splits["train"]))

    def prepare_dataset(self, dataset: DatasetConfig, synthetic_dir, out_manifest) -> dict:
        return data.prepare_dataset(dataset, synthetic_dir, out_manifest, self.name)

    def generate_synthetic(self, out_dir, spec: dict) -> None:
        data.generate_synthetic(out_dir, data.SyntheticSpec.from_dict(spec))

    def record_id(self, record: dict) -> str:
        return record["image_path"]

    def build_tiny(self, out_dir, spec: dict) -> None:
        from .. import modeling

        modeling.build_tiny_model(out_dir, modeling.TinyModelSpec.from_dict(spec))

    def family(self, backend: str) -> Family:
        return QWEN

    def active_towers(self, objective: str) -> set[str]:
        return {"vision", "merger"} | (set() if objective in ("head", "head_frozen") else {"language", "lm_head"})

    def check_checkpoint(self, config: dict, config_file: Path) -> None:
        if "vision_config" not in config:
            raise CheckpointError(f"{config_file}: no vision_config, but model.modality is vision_language")

    def load(self, info: dict) -> tuple[nn.Module, object]:
        from .. import modeling

        trust = info.get("trust_remote_code", False)
        return (modeling.load_model(info["path"], info["dtype"], trust),
                modeling.load_processor(info["path"], trust))

    def skeleton(self, cfg) -> nn.Module:
        from .. import modeling

        return modeling.model_skeleton(cfg)

    def student(self, model: nn.Module, arm, processor, head_path=None, arm_dir=None) -> LoraStudent:
        head = fusion = None
        if arm.objective in VISION_OBJECTIVES:
            in_dim = _base(model).get_input_embeddings().embedding_dim
            if arm.objective in FROZEN_HEAD_OBJECTIVES:
                head = load_head(head_path) if head_path else None
                if head is None:
                    raise CheckpointError(f"objective {arm.objective}: no pre-trained head checkpoint given")
                if head.init_args["in_dim"] != in_dim:
                    raise CheckpointError(f"{head_path}: head takes {head.init_args['in_dim']} channels, the "
                                          f"model's vision tokens have {in_dim}")
            elif arm_dir is not None:
                head = load_head(Path(arm_dir) / "head.safetensors")
            else:
                head = DetectionHead(in_dim, arm.head.hidden, arm.head.dropout)
        if arm.objective.startswith("hybrid"):
            fusion = nn.Linear(in_dim + 2 * head.init_args["hidden"], arm.fusion_tokens * in_dim)
            if arm_dir is not None:
                fusion.load_state_dict(load_tensors(Path(arm_dir) / "fusion.safetensors")[0])
        merge_size = getattr(getattr(processor, "image_processor", None), "merge_size", 2)
        return LoraStudent(model, arm, head, fusion, merge_size)

    def save_parts(self, student: LoraStudent, out_dir: Path) -> None:
        if student.head is not None and not student.frozen_head:
            save_head(student.head, out_dir / "head.safetensors", {"objective": student.arm.objective})
        if student.fusion is not None:
            save_tensors(out_dir / "fusion.safetensors",
                         {k: v.detach().cpu() for k, v in student.fusion.state_dict().items()})

    def batcher(self, processor, arm) -> ArmBatcher:
        if arm.image_size is None:
            raise ConfigError("lora.image_size: a vision-language model needs the image size (features.image_size)")
        chat = ChatBatcher(processor, arm.train.question, arm.train.positive_word, arm.train.negative_word,
                           arm.image_size, fusion_tokens=arm.fusion_tokens if arm.objective.startswith("hybrid") else 0)
        image_processor = processor.image_processor
        side = arm.image_size // (image_processor.patch_size * image_processor.merge_size)
        return ArmBatcher(chat, (side, side))

    @torch.no_grad()
    def test_metrics(self, student: LoraStudent, records: list[dict], batcher, batch_size: int, arm) -> dict:
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
        threshold = arm.head.threshold
        result = {"classification_source": "head" if image_scores else "lm", "pixel": None, "lm": None,
                  "label_blind_loss": None}
        if lm_scores and arm.objective == "lm":  # the training loss is the LM loss alone
            result["label_blind_loss"] = label_blind_loss(batcher.chat.answer_ids, labels)
        if image_scores:
            result["classification"] = classification_metrics(torch.cat(image_scores), labels, threshold)
            masks = [read_pixel_mask(r.get("mask_path")) for r in records]
            result["pixel"] = pixel_metrics(heatmaps, masks, threshold)
        if lm_scores:
            lm_classification = classification_metrics(torch.cat(lm_scores), labels, threshold)
            result["lm"] = {"loss": nll / tokens, "perplexity": math.exp(nll / tokens),
                            "classification": lm_classification}
            result.setdefault("classification", lm_classification)
        if image_scores:  # the detection head decides
            answers = [int(score >= threshold) for score in torch.cat(image_scores).tolist()]
            result["predictions"] = self.predictions(records, batcher, arm, answers=answers)
        else:  # the whole model answers: greedily generated words, parsed
            result["predictions"] = self.predictions(records, batcher, arm, student=student, batch_size=batch_size)
            result["generation"] = prediction_metrics(result["predictions"])
        return result

    def predictions(self, records: list[dict], batcher: ArmBatcher, arm, answers: list[int] | None = None,
                    student: LoraStudent | None = None, batch_size: int = 8):
        """Per test record (`generation.PREDICTION_COLUMNS`) its answer word: the detection head's decision
        (`answers`, no prompt), or what `student`'s language model generates greedily for the record's prompt; scored
        against the label's word by exact match after normalisation."""
        words = {1: arm.train.positive_word, 0: arm.train.negative_word}
        chat = batcher.chat
        if answers is not None:
            prompts, generated = [""] * len(records), [words[answer] for answer in answers]
        else:
            prompts = [chat.prompt(record) for record in records]
            images = kwargs = None
            if chat.image_size is not None:
                images = [[load_image(record["image_path"], chat.image_size)] for record in records]
                pixels = chat.image_size * chat.image_size
                kwargs = {"images_kwargs": {"size": {"shortest_edge": pixels, "longest_edge": pixels}}}
            answer_tokens = max(len(ids) for ids in chat.answer_ids.values())
            generated = greedy_generate(student.model, chat.processor, prompts, answer_tokens, batch_size, images,
                                        kwargs)
        examples = [{"id": self.record_id(record), "prompt": prompt, "reference": words[record["label"]]}
                    for record, prompt in zip(records, prompts)]
        return score_predictions(examples, generated)

    def dataset_section(self, manifest: dict):
        from ..report import dataset_section

        return dataset_section(manifest)

    def table_row(self, metrics: dict) -> dict:
        row = {"source": metrics["classification_source"]}
        row |= {k: metrics["classification"].get(k) for k in CLASSIFICATION_COLUMNS}
        row["label_blind_loss"] = metrics.get("label_blind_loss")
        pixel = metrics.get("pixel") or {}
        row |= {k: pixel.get(k) for k in ("pixel_f1", "pixel_iou")}
        lm = metrics.get("lm") or {}
        return row | {"lm_loss": lm.get("loss"), "perplexity": lm.get("perplexity"),
                      "lm_roc_auc": (lm.get("classification") or {}).get("roc_auc"),
                      "generated_accuracy": (metrics.get("generation") or {}).get("exact_match")}


def fusion_inputs(model: nn.Module, inputs: dict[str, torch.Tensor], fused: torch.Tensor, fusion_mask: torch.Tensor,
                  image_features) -> dict[str, torch.Tensor]:
    """The LM inputs with the `fused` embeddings written at `fusion_mask` (`model`: the transformers model).

    The model gets `inputs_embeds` in place of `input_ids` (Qwen3-VL takes exactly one of them) and the image's encoder
    outputs in place of its pixels: it finds the image tokens by their embedding and writes the vision tokens there
    (with DeepStack mergers, also adding their features at those positions in the first layers). The multimodal RoPE
    positions, which it computes only from ids, are computed here from the ids and `mm_token_type_ids`.
    """
    inputs = dict(inputs)
    input_ids = inputs.pop("input_ids")
    inputs.pop("pixel_values")
    embeds = model.get_input_embeddings()(input_ids)
    inputs["position_ids"] = model.model.compute_3d_position_ids(
        input_ids=input_ids, inputs_embeds=embeds, image_grid_thw=inputs["image_grid_thw"], video_grid_thw=None,
        attention_mask=inputs.get("attention_mask"), past_key_values=None,
        mm_token_type_ids=inputs.get("mm_token_type_ids"))
    fused = fused.to(embeds.dtype).reshape(-1, embeds.shape[-1])
    inputs["inputs_embeds"] = embeds.masked_scatter(fusion_mask.bool()[..., None], fused)
    inputs["mm_encoder_outputs"] = {"image": image_features}
    return inputs


def answer_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the summed log-probability of the labelled (answer) tokens, and how many there are."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logprobs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (picked * keep).sum(dim=1), keep.sum(dim=1)


def label_blind_loss(answer_ids: dict[int, list[int]], labels: list[int]) -> float:
    """The LM loss (mean over answer tokens) of a model that has learned the answer format but not the label: ln 2
    for each record's first answer token, 0 for the tokens the format then decides."""
    return len(labels) * math.log(2) / sum(len(answer_ids[label]) for label in labels)


def _base(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (its modules carry the adapters)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


MODALITY = VisionLanguage()

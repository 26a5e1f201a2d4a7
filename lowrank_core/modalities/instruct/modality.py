"""The instruct modality: a causal LM or a vision-language model fine-tuned on instruction / response records
(objective `sft`).

Records are chats, Alpaca or prompt / completion records (`instructions.py`), rendered with the model's chat template;
the loss is on assistant tokens only. For a vision-language model a user turn may carry images (resized to
`features.image_size`); its vision adapters train on the records that have them. The dataset job checks every record
against the model's tokenizer too (length against `sft.max_length`, per `sft.overflow`). Evaluation is
generation-based (`generation.py`): each test prompt is answered greedily (`sft.max_new_tokens`), scored by exact match
after normalisation and by the last number, next to the test loss and perplexity over response tokens; every
evaluation returns its per-sample predictions, which the evaluation stage writes as `predictions.csv`.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from ... import generation, instructions, modeling
from ...data import SPLITS, DatasetConfig, load_image, read_records
from ...errors import CheckpointError, DataError
from ...io import read_json, write_json
from ..vision_language import VisionLanguage
from .synthetic import SyntheticInstructionSpec, generate_synthetic_instructions
from .task import SftTaskConfig

log = logging.getLogger(__name__)


class Instruct(VisionLanguage):
    """Text-only: the vision-language modality's LM student and model loading, with instruction batches."""

    name = "instruct"

    def train_records(self, dataset: DatasetConfig) -> int:
        if dataset.source == "synthetic":
            return dataset.synthetic_instructions.train
        return len(read_records(dataset.annotation_files("")["train"]))  # their form is the dataset job's check

    def prepare_dataset(self, dataset: DatasetConfig, synthetic_dir, out_manifest, model_info_json=None,
                        task: dict | None = None) -> dict:
        """Read and check every record (structure, then against the model's tokenizer: rendering and length); ids
        are unique across splits."""
        self.check_source(dataset)
        settings = SftTaskConfig.from_dict((task or {}).get("sft", {}))
        processor = self.load_tokenizer(read_json(model_info_json))
        batcher = instructions.InstructionBatcher(processor, settings.max_length, settings.overflow,
                                                  _image_size(processor, (task or {}).get("image_size")))
        splits, owner = {}, {}
        for split, path in dataset.annotation_files(synthetic_dir or "").items():
            records = instructions.read_instructions(path)
            for record in records:
                if record["id"] in owner:
                    raise DataError(f"{path}: id {record['id']!r} is also in the {owner[record['id']]} split")
                owner[record["id"]] = split
            truncated = batcher.check(records, path)
            splits[split] = {"count": len(records), "truncated": truncated, "records": records}
            log.info("%s: %d records (%d truncated)", split, len(records), len(truncated))
        manifest = {"splits": splits, "source": dataset.source, "modality": self.name}
        write_json(out_manifest, manifest)
        return manifest

    def generate_synthetic(self, out_dir, spec: dict) -> None:
        generate_synthetic_instructions(out_dir, SyntheticInstructionSpec.from_dict(spec))

    def record_id(self, record: dict) -> str:
        return record["id"]

    def build_tiny(self, out_dir, spec: dict) -> None:
        from .tiny import TinyTextSpec, build_tiny_text_model

        build_tiny_text_model(out_dir, TinyTextSpec.from_dict(spec))

    def active_towers(self, objective: str) -> set[str]:
        return {"vision", "merger", "language", "lm_head"}  # a causal LM has only the last two

    def skeleton(self, cfg) -> nn.Module:
        if cfg.source != "tiny":
            return modeling.model_skeleton(cfg)
        from .tiny import tiny_text_skeleton

        return tiny_text_skeleton(cfg.tiny_text)

    def check_checkpoint(self, config: dict, config_file: Path) -> None:
        """Any causal LM or vision-language model: what the records need is checked by the dataset job."""

    def load_tokenizer(self, info: dict):
        """The checkpoint's tokenizer (a vision-language model's processor); CheckpointError when it has no chat
        template to render records with."""
        tokenizer = modeling.load_processor(info["path"], info.get("trust_remote_code", False))
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(f"{info['path']}: its tokenizer has no chat template to render the records with")
        return tokenizer

    def batcher(self, processor, arm) -> instructions.InstructionBatcher:
        return instructions.InstructionBatcher(processor, arm.sft.max_length, arm.sft.overflow,
                                               _image_size(processor, arm.image_size))

    def test_metrics(self, student: nn.Module, records: list[dict], batcher, batch_size: int, arm) -> dict:
        """Test loss and perplexity over response tokens, and the greedy answers' scores (`predictions`: their
        `generation.score_predictions` frame, one row per record)."""
        student.eval()
        chunks = [records[start:start + batch_size] for start in range(0, len(records), batch_size)]
        lm = generation.response_loss(student.model, (batcher(chunk) for chunk in tqdm(chunks, desc="test loss")))
        examples = batcher.examples(records)
        images = kwargs = None
        if batcher.image_size is not None:
            images = [[load_image(path, batcher.image_size) for path in example["images"]] for example in examples]
            pixels = batcher.image_size ** 2
            kwargs = {"images_kwargs": {"size": {"shortest_edge": pixels, "longest_edge": pixels}}}
        generated = generation.greedy_generate(student.model, batcher.processor, [e["prompt"] for e in examples],
                                               arm.sft.max_new_tokens, batch_size, images, kwargs)
        frame = generation.score_predictions(examples, generated, arm.sft.numeric_tolerance)
        return {"generation": generation.prediction_metrics(frame), "lm": lm, "predictions": frame}

    def table_row(self, metrics: dict) -> dict:
        scores, lm = metrics["generation"], metrics["lm"]
        return {"source": "generation", "exact_match": scores["exact_match"],
                "numeric_accuracy": scores["numeric_accuracy"], "lm_loss": lm["loss"], "perplexity": lm["perplexity"]}

    def dataset_section(self, manifest: dict):
        from ...report import ReportSection, table

        rows = [{"split": split, "records": manifest["splits"][split]["count"],
                 "truncated": len(manifest["splits"][split]["truncated"])} for split in SPLITS]
        examples = [{"id": record["id"], "turns": len(record["messages"]),
                     "prompt": _short(record["messages"][-2]["content"] if len(record["messages"]) > 1 else ""),
                     "answer": _short(instructions.reference(record))}
                    for record in manifest["splits"]["train"]["records"][:4]]
        body = (f"<p>Source: <code>{html.escape(str(manifest['source']))}</code>. Instruction records rendered with "
                "the model's chat template; the loss is on assistant tokens only.</p>" + table(rows) + table(examples))
        return ReportSection("Dataset", body, "dataset")

    def result_sections(self, inputs: dict) -> list:
        from .report import examples_section

        section = examples_section(inputs["manifest"], inputs["lora_references"]) if "lora_references" in inputs \
            else None
        return [section] if section else []


def _image_size(processor, image_size: int | None) -> int | None:
    """The side records' images are resized to: `image_size` for a vision-language processor, None for a tokenizer."""
    return image_size if hasattr(processor, "image_processor") else None


def _short(content, limit: int = 120) -> str:
    text = instructions.text_of(content)
    return text if len(text) <= limit else text[:limit - 3] + "..."


MODALITY = Instruct()

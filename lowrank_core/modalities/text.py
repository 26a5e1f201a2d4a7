"""The text modality: a causal LM reads a passage and answers with one of two words (records `{"text", "label"}`).

Everything but the records and where adapters can go is the vision-language modality's `lm` objective: the same
chat batches (without an image), LM loss and answer-word scores.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..lm_data import ChatBatcher
from .vision_language import ArmBatcher, VisionLanguage


class Text(VisionLanguage):
    name = "text"

    def record_id(self, record: dict) -> str:
        return record["text"]

    def active_towers(self, objective: str) -> set[str]:
        return {"language", "lm_head"}

    def check_checkpoint(self, config: dict, config_file: Path) -> None:
        if "vision_config" in config:
            raise CheckpointError(f"{config_file}: has a vision_config, but model.modality is text")

    def batcher(self, processor, arm) -> ArmBatcher:
        return ArmBatcher(ChatBatcher(processor, arm.train.question, arm.train.positive_word,
                                      arm.train.negative_word))


MODALITY = Text()

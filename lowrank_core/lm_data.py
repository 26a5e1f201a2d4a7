"""Language-model supervision in the model's chat format: image or text plus question in, one answer word out.

Each record becomes the chat ``user: [image] question`` / ``assistant: answer`` for a vision-language model, or
``user: text\n\nquestion`` / ``assistant: answer`` for a text-only causal LM (records ``{"text", "label"}``),
where the answer is the positive word for label 1 (tampered) and the negative word for label 0 (real). Only the
answer tokens (the word and the template's end-of-turn token) carry labels; everything else, padding included,
is -100.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .data import load_image
from .errors import CheckpointError, DataError

IGNORE_INDEX = -100


class _EncodingCache(dict):
    """Encoded records kept for the process until they fill `limit_bytes` (then later ones are encoded each time):
    a job's seeds and splits encode each record once. The tiny default's take ~60 MB."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__()
        self.free_bytes = limit_bytes

    def keep(self, key: tuple, encoded: dict[str, torch.Tensor]) -> None:
        size = sum(value.nbytes for value in encoded.values())
        if size <= self.free_bytes:
            self[key] = encoded
            self.free_bytes -= size


_encoded = _EncodingCache(limit_bytes=512 * 2**20)


@dataclasses.dataclass
class ChatBatcher:
    """Collate manifest records into right-padded chat batches with answer-only labels.

    `processor` is a vision-language processor (then `image_size` is the square side images are resized to)
    or a tokenizer with a chat template (then `image_size` is None and the records' text comes before the
    question); a record's `image` (a PIL image), where it has one, is used instead of loading its `image_path`.
    The answer ids are located once, after a question-only prompt: the template closes the user turn
    before the assistant's, so they do not depend on what the prompt holds. `fusion_tokens` placeholder tokens (the
    pad token) go right after the image; batches then carry `fusion_mask`, true at those positions, where a hybrid
    student writes its fusion embeddings.
    """

    processor: Any
    question: str
    positive_word: str
    negative_word: str
    image_size: int | None = None
    fusion_tokens: int = 0

    def __post_init__(self) -> None:
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.fusion_text = self.tokenizer.convert_ids_to_tokens(self.pad_id) * self.fusion_tokens
        self.answer_ids = {label: self._answer_ids(word)
                           for label, word in ((1, self.positive_word), (0, self.negative_word))}

    def _messages(self, record: dict | None = None, answer: str | None = None) -> list[dict]:
        """The chat for `record` (None: the question alone), ending with the assistant's `answer` if given."""
        if self.image_size is None:
            text = self.question if record is None else f"{_text(record)}\n\n{self.question}"
            user = {"role": "user", "content": text}
        else:
            user = {"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": self.fusion_text + self.question}]}
        if answer is None:
            return [user]
        return [user, {"role": "assistant", "content": answer if self.image_size is None
                       else [{"type": "text", "text": answer}]}]

    def prompt(self, record: dict | None = None) -> str:
        """The chat up to and including the assistant's generation prompt."""
        return self.processor.apply_chat_template(self._messages(record), add_generation_prompt=True, tokenize=False)

    def _answer_ids(self, word: str) -> list[int]:
        """Token ids of the assistant turn the chat template writes for `word` (trailing whitespace dropped)."""
        prompt = self.prompt()
        full = self.processor.apply_chat_template(self._messages(answer=word), tokenize=False)
        if not full.startswith(prompt):
            raise CheckpointError("the chat template does not extend the generation prompt with the answer; "
                                  "answer-only labels cannot be located")
        return self.tokenizer(full[len(prompt):].rstrip(), add_special_tokens=False)["input_ids"]

    def encode(self, record: dict) -> dict[str, torch.Tensor]:
        """One record as unpadded tensors: the prompt (with image inputs) followed by its answer. The tensors may be
        kept for later calls: do not modify them in place."""
        if "image" in record or not self.tokenizer.name_or_path:  # an in-memory image or processor: no key
            return self._encode(record)
        image = record.get("image_path") if self.image_size else None
        try:
            modified = image and os.stat(image).st_mtime_ns
        except OSError:  # reading it fails, with the file's name
            return self._encode(record)
        key = (self.tokenizer.name_or_path, self.question, self.positive_word, self.negative_word, self.image_size,
               self.fusion_tokens, image, modified, record.get("text"), record["label"])
        encoded = _encoded.get(key)
        if encoded is None:
            encoded = self._encode(record)
            _encoded.keep(key, encoded)
        return encoded

    def _encode(self, record: dict) -> dict[str, torch.Tensor]:
        prompt = self.prompt(record)
        if self.image_size is None:
            inputs = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        else:
            pixels = self.image_size * self.image_size
            image = record["image"] if "image" in record else load_image(record["image_path"], self.image_size)
            inputs = self.processor(text=[prompt], images=[image],
                                    images_kwargs={"size": {"shortest_edge": pixels, "longest_edge": pixels}},
                                    add_special_tokens=False, return_tensors="pt")
        prompt_length = inputs["input_ids"].shape[1]
        answer = torch.tensor(self.answer_ids[record["label"]])
        encoded = {}
        for key, value in inputs.items():
            if value.shape == (1, prompt_length):  # per-token inputs: extend over the answer
                filler = answer if key == "input_ids" else torch.full_like(answer, int(key == "attention_mask"))
                encoded[key] = torch.cat([value[0], filler.to(value.dtype)])
            else:  # image inputs (pixel_values, image_grid_thw)
                encoded[key] = value
        encoded["labels"] = torch.cat([torch.full((prompt_length,), IGNORE_INDEX), answer])
        if self.fusion_tokens:
            encoded["fusion_mask"] = (encoded["input_ids"] == self.pad_id).long()
        return encoded

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """A batch: per-token tensors right-padded (pad id, attention 0, label -100), image inputs concatenated."""
        encoded = [self.encode(record) for record in records]
        length = max(len(e["input_ids"]) for e in encoded)
        pad_values = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}
        batch = {}
        for key in encoded[0]:
            values = [e[key] for e in encoded]
            if values[0].ndim == 1:
                batch[key] = torch.stack([torch.nn.functional.pad(v, (0, length - len(v)), value=pad_values.get(key, 0))
                                          for v in values])
            else:
                batch[key] = torch.cat(values)
        return batch


def _text(record: dict) -> str:
    if "text" not in record:
        raise DataError("a text-only model needs text records {\"text\": ..., \"label\": 0|1}; this record has "
                        f"{sorted(record)} (is model.modality text, and the dataset prepared for it?)")
    return record["text"]


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own causal-LM loss: mean cross-entropy over the labelled (answer) tokens."""
    return model(**batch, use_cache=False).loss

"""Chat batches with answer-only labels: image + question in (vision-language), or text + question (text-only)."""

from __future__ import annotations

import pytest
import torch

from lowrank_core import lm_data
from lowrank_core.data import SyntheticSpec, generate_synthetic, load_image, validate_dataset
from lowrank_core.errors import DataError
from lowrank_core.lm_data import IGNORE_INDEX, ChatBatcher
from lowrank_core.modeling import load_processor

IMAGE_SIZE = 32
QUESTION = "Is this passage real or tampered?"
TEXT_RECORDS = [
    {"text": "The minutes were signed on 3 May.", "label": 0},
    {"text": "The minutes were signed on 31 February,\nby everyone present.", "label": 1},
    {"text": "Totals: 12 + 30 = 42.", "label": 0},
]


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def text_batcher(processor):
    return ChatBatcher(processor.tokenizer, QUESTION, "tampered", "real")


def assert_answer_only_labels(batch, records, tokenizer):
    """Each row: labels -100 but on one contiguous answer span (the word and end-of-turn), then only padding."""
    for row, record in enumerate(records):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        answer = labels != IGNORE_INDEX
        word = "tampered" if record["label"] == 1 else "real"
        assert tokenizer.decode(labels[answer]) == f"{word}<|im_end|>"
        assert torch.equal(labels[answer], ids[answer])
        positions = answer.nonzero().flatten()
        assert torch.equal(positions, torch.arange(positions[0], positions[-1] + 1))  # one contiguous answer span
        assert batch["attention_mask"][row, positions[-1] + 1:].sum() == 0  # only padding after the answer
        assert batch["attention_mask"][row, :positions[-1] + 1].all()


def test_image_batches_label_the_answer_only(processor, tmp_path):
    files = generate_synthetic(tmp_path / "data", SyntheticSpec(image_size=IMAGE_SIZE, train=2, val=2, test=2))
    records = validate_dataset(files)["splits"]["train"]["records"]
    batch = ChatBatcher(processor, "Is this image real or tampered?", "tampered", "real", IMAGE_SIZE)(records)
    assert_answer_only_labels(batch, records, processor.tokenizer)
    image_tokens = batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"].bool(), image_tokens)
    assert (batch["labels"][image_tokens] == IGNORE_INDEX).all()
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(1).sum())


def test_text_batches_label_the_answer_only(text_batcher, processor):
    batch = text_batcher(TEXT_RECORDS)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert_answer_only_labels(batch, TEXT_RECORDS, processor.tokenizer)


def test_text_prompt_holds_the_text_then_the_question(text_batcher, processor):
    batch = text_batcher(TEXT_RECORDS)
    prompts = [processor.tokenizer.decode(ids[(labels == IGNORE_INDEX) & mask.bool()])
               for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
    assert len(set(prompts)) == len(TEXT_RECORDS)
    for prompt, record in zip(prompts, TEXT_RECORDS):
        assert f"<|im_start|>user\n{record['text']}\n\n{QUESTION}<|im_end|>" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        assert "<|image_pad|>" not in prompt


def test_answer_ids_are_what_the_template_writes_after_any_prompt(text_batcher, processor):
    """The answer ids, located once after the question alone, equal the template's own answer after each record."""
    tokenizer = processor.tokenizer
    for record in TEXT_RECORDS:
        encoded = text_batcher.encode(record)
        word = "tampered" if record["label"] == 1 else "real"
        messages = [{"role": "user", "content": f"{record['text']}\n\n{QUESTION}"},
                    {"role": "assistant", "content": word}]
        full = tokenizer.apply_chat_template(messages, tokenize=False).rstrip()
        assert encoded["input_ids"].tolist() == tokenizer(full, add_special_tokens=False)["input_ids"]
        assert encoded["labels"][encoded["labels"] != IGNORE_INDEX].tolist() == text_batcher.answer_ids[record["label"]]


def test_image_records_are_refused_by_a_text_only_batcher(text_batcher):
    with pytest.raises(DataError, match=r"a text-only model needs text records .*this record has "
                                        r"\['image_path', 'label', 'mask_path'\]"):
        text_batcher([{"image_path": "/data/a.png", "label": 1, "mask_path": None}])


class CountingProcessor:
    """A processor that counts its calls (what encoding a record costs)."""

    def __init__(self, processor):
        self.processor, self.calls = processor, 0

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.processor(*args, **kwargs)


def test_a_record_is_encoded_once_per_process_and_question(processor, tmp_path, monkeypatch):
    files = generate_synthetic(tmp_path / "data", SyntheticSpec(image_size=IMAGE_SIZE, train=2, val=2, test=2))
    records = validate_dataset(files)["splits"]["train"]["records"]
    counting = CountingProcessor(processor)
    batcher = ChatBatcher(counting, "Is this image real or tampered?", "tampered", "real", IMAGE_SIZE)
    first = batcher(records)
    again = ChatBatcher(counting, "Is this image real or tampered?", "tampered", "real", IMAGE_SIZE)(records)
    assert counting.calls == len(records)  # the second batcher found them
    assert all(torch.equal(first[key], again[key]) for key in first)
    other = ChatBatcher(counting, "Is this image edited?", "tampered", "real", IMAGE_SIZE)(records)
    assert counting.calls == 2 * len(records) and not torch.equal(other["input_ids"], first["input_ids"])
    in_memory = [{"image": load_image(r["image_path"], IMAGE_SIZE), "label": r["label"]} for r in records]
    batcher(in_memory), batcher(in_memory)
    assert counting.calls == 4 * len(records)  # no file to key them by: encoded each time

    monkeypatch.setattr(lm_data, "_encoded", lm_data._EncodingCache(limit_bytes=0))
    batcher(records), batcher(records)
    assert counting.calls == 6 * len(records)  # over the budget: encoded each time

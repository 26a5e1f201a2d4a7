"""Generation-based evaluation: normalisation, exact and numeric scores, predictions.csv, greedy generation, and the
response-token loss."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import transformers
from PIL import Image

from lowrank_core.errors import DataError
from lowrank_core.generation import (
    exact_match,
    greedy_generate,
    last_number,
    normalise,
    numeric_score,
    prediction_metrics,
    read_texts,
    response_loss,
    score_predictions,
    text_loss,
    write_predictions,
)
from lowrank_core.instructions import InstructionBatcher
from lowrank_core.lm_data import IGNORE_INDEX, lm_loss
from lowrank_core.modeling import (
    CHAT_TEMPLATES,
    TinyModelSpec,
    _train_tokenizer,
    image_only_processor_class,
    tiny_config,
)

QUESTIONS = ("Hi", "Tom has 3 apples and buys 4 more. How many apples does he have?", "What is 2 + 2?",
             "Anna has 9 pens and gives 2 of them away. How many pens does Anna have left now?")


@pytest.mark.parametrize("text, expected", [
    ("  Paris  ", "paris"),
    ("Hello   World\n\tagain", "hello world again"),
    ("Yes.", "yes"),
    ("Yes!?!", "yes"),
    ('"Paris."', "paris"),
    ("'yes'.", "yes"),
    ('" quoted " ', "quoted"),
    ("\u201cCurly\u201d", "curly"),
    ("`code`", "code"),
    ('"unbalanced', '"unbalanced'),
    ("3.50", "3.50"),
    ("e.g. this", "e.g. this"),
    ("...", ""),
    ("", ""),
])
def test_normalise(text, expected):
    assert normalise(text) == expected


def test_exact_match_after_normalisation():
    assert exact_match(" The answer is 7. ", "the answer is 7")
    assert exact_match('"SEVEN"', "seven")
    assert not exact_match("7 apples", "7")
    assert not exact_match("3.50", "3.5")


@pytest.mark.parametrize("text, expected", [
    ("The answer is 7.", 7.0),
    ("3 + 4 = 7", 7.0),
    ("-5", -5.0),
    ("x = -12 degrees", -12.0),
    ("\u22123", -3.0),
    ("from 3-5", 5.0),
    ("1,234 apples", 1234.0),
    ("total: 1,234,567.25!", 1234567.25),
    ("1,2345", 2345.0),
    ("pi is 3.14159", 3.14159),
    ("answer -0.5", -0.5),
    ("Qwen2 says 4", 4.0),
    ("\u7b54\u6848\u662f7", 7.0),
    ("no number here", None),
    ("", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize("generated, reference, expected", [
    ("It is 7", "7", 1.0),
    ("7 apples, not 8", "7", 0.0),
    ("1,234", "1234", 1.0),
    ("The total is -3.0", "-3", 1.0),
    ("0.1 + 0.2 = 0.30000000000000004", "0.3", 1.0),
    ("0.31", "0.3", 0.0),
    ("no idea", "7", 0.0),
    ("7", "Paris", None),
])
def test_numeric_score(generated, reference, expected):
    assert numeric_score(generated, reference) == expected


def test_numeric_score_tolerance_is_relative_above_one():
    assert numeric_score("1000001", "1000000", tolerance=1e-6) == 1.0
    assert numeric_score("1000002", "1000000", tolerance=1e-6) == 0.0
    assert numeric_score("0.5", "0.4", tolerance=0.2) == 1.0


def test_predictions_csv_and_metrics(tmp_path):
    examples = [{"id": "a", "prompt": "p1\nline", "reference": "7"},
                {"id": "b", "prompt": "p2", "reference": "Paris"},
                {"id": "c", "prompt": "p3", "reference": "3 + 4 = 7"},
                {"id": "d", "prompt": "p4", "reference": "12"}]
    generated = ["7.", "paris", "It is 7", "13"]
    metrics = write_predictions(tmp_path / "predictions.csv", score_predictions(examples, generated))
    frame = pd.read_csv(tmp_path / "predictions.csv", dtype={"id": str})
    assert list(frame.columns) == ["id", "prompt", "reference", "generated", "score", "numeric"]
    assert frame["id"].tolist() == ["a", "b", "c", "d"]
    assert frame["prompt"][0] == "p1\nline"
    assert frame["score"].tolist() == [1, 1, 0, 0]
    assert frame["numeric"].tolist()[:1] + frame["numeric"].tolist()[2:] == [1.0, 1.0, 0.0]
    assert math.isnan(frame["numeric"][1])
    assert metrics == {"n": 4, "exact_match": 0.5, "numeric_n": 3, "numeric_accuracy": pytest.approx(2 / 3)}
    assert prediction_metrics(score_predictions(examples[1:2], ["Rome"]))["numeric_accuracy"] is None
    with pytest.raises(ValueError, match="2 examples but 1 generated"):
        score_predictions(examples[:2], ["7"])


# ---------------------------------------------------------------- generation with a tiny model


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = _train_tokenizer(512)
    tokenizer.chat_template = CHAT_TEMPLATES["qwen2_5_vl"]
    tokenizer.padding_side = "right"  # greedy_generate must pad on the left by itself
    return tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))


def records(answer: str = "seven") -> list[dict]:
    return [{"id": str(i), "messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}]}
            for i, question in enumerate(QUESTIONS)]


def test_greedy_generate_is_deterministic_and_independent_of_the_batch(model, tokenizer):
    prompts = [example["prompt"] for example in InstructionBatcher(tokenizer).examples(records())]
    model.train()
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert model.training  # its mode is restored
    assert len(batched) == len(prompts) and all(isinstance(text, str) for text in batched)
    assert len(set(batched)) > 1  # a random model: the continuations differ by prompt
    assert greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4) == batched
    assert [greedy_generate(model, tokenizer, [prompt], max_new_tokens=6)[0] for prompt in prompts] == batched
    assert greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == batched


def test_greedy_generate_returns_the_new_text_up_to_the_end_of_turn(model, tokenizer):
    """A model taught to answer "seven" generates exactly that: no prompt, no end-of-turn token, nothing after."""
    tuned = copy.deepcopy(model)
    batcher = InstructionBatcher(tokenizer)
    batch = batcher(records())
    optimiser = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        lm_loss(tuned, batch).backward()
        optimiser.step()
    prompts = [example["prompt"] for example in batcher.examples(records())]
    assert greedy_generate(tuned, tokenizer, prompts, max_new_tokens=12, batch_size=2) == ["seven"] * len(prompts)
    first = greedy_generate(tuned, tokenizer, prompts[:1], max_new_tokens=1)[0]
    assert first and "seven".startswith(first) and first != "seven"


def test_greedy_generate_with_images():
    tokenizer = _train_tokenizer(512)
    tokenizer.padding_side = "right"
    image_processor = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = image_only_processor_class(transformers.Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATES["qwen2_5_vl"])
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(tiny_config(TinyModelSpec(), tokenizer))
    batcher = InstructionBatcher(processor, image_size=16)
    images, chats = [], []
    for i, question in enumerate(QUESTIONS[:3]):
        image = Image.new("RGB", (16, 16), (80 * i, 40, 200 - 60 * i))
        images.append([image])
        chats.append({"id": str(i), "messages": [
            {"role": "user", "content": [{"type": "image", "image_path": "x.png"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": "ok"}]})
    prompts = [example["prompt"] for example in batcher.examples(chats)]
    kwargs = {"images_kwargs": {"size": {"shortest_edge": 256, "longest_edge": 256}}}
    batched = greedy_generate(model, processor, prompts, 5, batch_size=3, images=images, processor_kwargs=kwargs)
    assert len(batched) == 3 and all(isinstance(text, str) for text in batched)
    assert [greedy_generate(model, processor, [prompt], 5, images=[image], processor_kwargs=kwargs)[0]
            for prompt, image in zip(prompts, images)] == batched


def test_response_loss_weighs_every_labelled_token_the_same(model, tokenizer):
    batcher = InstructionBatcher(tokenizer)
    chats = records("seven") + records("three plus four is seven")
    batches = [batcher(chats[:3]), batcher(chats[3:])]
    result = response_loss(model, batches)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chat in chats:
            single = batcher([chat])
            count = int((single["labels"] != IGNORE_INDEX).sum())
            total += float(lm_loss(model, single)) * count
            tokens += count
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    unlabelled = {**batches[0], "labels": torch.full_like(batches[0]["labels"], IGNORE_INDEX)}
    empty = response_loss(model, [unlabelled])
    assert empty["tokens"] == 0 and math.isnan(empty["loss"])


def test_the_general_text_loss_is_every_tokens_loss_of_each_text_alone(model, tokenizer, tmp_path):
    path = tmp_path / "general.txt"
    path.write_text("The cat sat on the mat.\n\n  Paris is the capital of France.  \nOne two three four five six.\n")
    texts = read_texts(path)
    assert texts == ["The cat sat on the mat.", "Paris is the capital of France.", "One two three four five six."]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:  # each text alone, unpadded: the oracle
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    result = text_loss(model, tokenizer, texts, batch_size=2)
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match=r"blank.txt: holds no text"):
        read_texts(tmp_path / "blank.txt")

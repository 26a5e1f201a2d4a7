"""Instruction records: the three forms, validation, response-only labels, truncation, the synthetic set."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
import transformers
from PIL import Image

from lowrank_core.errors import CheckpointError, ConfigError, DataError
from lowrank_core.instructions import InstructionBatcher, read_instructions, reference
from lowrank_core.lm_data import IGNORE_INDEX
from lowrank_core.modalities.instruct.synthetic import SyntheticInstructionSpec, generate_synthetic_instructions
from lowrank_core.modeling import CHAT_TEMPLATES, _train_tokenizer, image_only_processor_class

END = "<|im_end|>"
FORMS = {
    "chat": {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many?"},
                          {"role": "assistant", "content": "3 + 4 = 7"}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"},
    "alpaca_without_input": {"instruction": "Add 3 and 4.", "input": "", "output": "seven"},
    "prompt_completion": {"prompt": "What is 12 + 30?", "completion": "It is 42."},
}
USER_TEXT = {"chat": "Tom has 3 apples and buys 4 more. How many?", "alpaca": "Add the numbers.\n\n3 and 4",
             "alpaca_without_input": "Add 3 and 4.", "prompt_completion": "What is 12 + 30?"}
MULTI_TURN = {"id": "talk", "messages": [
    {"role": "system", "content": "You count things."},
    {"role": "user", "content": "Anna has 2 pens. How many?"},
    {"role": "assistant", "content": "2"},
    {"role": "user", "content": [{"type": "text", "text": "And if she buys 5 more?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "2 + 5 = 7"}]},
]}


@pytest.fixture(scope="module")
def base_tokenizer():
    return _train_tokenizer(512)


@pytest.fixture(scope="module", params=sorted(CHAT_TEMPLATES))
def tokenizer(request, base_tokenizer):
    """A text tokenizer with a Qwen-style chat template (with and without a default system turn)."""
    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATES[request.param]
    return tokenizer


@pytest.fixture(scope="module")
def processor(base_tokenizer):
    image_processor = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2)
    return image_only_processor_class(transformers.Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=base_tokenizer, chat_template=CHAT_TEMPLATES["qwen2_5_vl"])


def write_split(path, records):
    path.write_text(json.dumps(records))
    return path


def labelled_runs(labels: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """The contiguous runs of labelled positions' ids, checking labels equal the ids there."""
    mask = labels != IGNORE_INDEX
    assert torch.equal(labels[mask], ids[mask])
    positions = mask.nonzero().flatten().tolist()
    runs, start = [], None
    for i, p in enumerate(positions):
        start = p if start is None else start
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            runs.append(ids[start:p + 1])
            start = None
    return runs


@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_labels_exactly_the_answer_and_its_end_of_turn(tokenizer, tmp_path, form):
    records = read_instructions(write_split(tmp_path / "train.json", [FORMS[form], FORMS["chat"]]))
    batcher = InstructionBatcher(tokenizer)
    batch = batcher(records)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    row = batch["input_ids"][0], batch["labels"][0], batch["attention_mask"][0].bool()
    runs = labelled_runs(row[1], row[0])
    assert [tokenizer.decode(run) for run in runs] == [reference(records[0]) + END]
    prompt_ids = row[0][row[2] & (row[1] == IGNORE_INDEX)]
    assert tokenizer.decode(prompt_ids) == batcher.prompt(records[0])  # everything else is the generation prompt
    assert f"<|im_start|>user\n{USER_TEXT[form]}{END}" in batcher.prompt(records[0])
    assert batcher.prompt(records[0]).endswith("<|im_start|>assistant\n")
    assert (batch["labels"][~batch["attention_mask"].bool()] == IGNORE_INDEX).all()  # padding is never labelled
    assert batch["input_ids"].shape[1] == max(len(batcher.encode(record)["input_ids"]) for record in records)


def test_multi_turn_chat_labels_every_assistant_turn_and_nothing_else(tokenizer, tmp_path):
    records = read_instructions(write_split(tmp_path / "train.json", [MULTI_TURN]))
    assert records[0]["messages"][3]["content"] == "And if she buys 5 more?"  # text parts become a string
    batcher = InstructionBatcher(tokenizer)
    encoded = batcher.encode(records[0])
    runs = labelled_runs(encoded["labels"], encoded["input_ids"])
    assert [tokenizer.decode(run) for run in runs] == ["2" + END, "2 + 5 = 7" + END]
    unlabelled = tokenizer.decode(encoded["input_ids"][encoded["labels"] == IGNORE_INDEX])
    assert unlabelled.count("<|im_start|>assistant\n") == 2  # role headers are prompt
    assert "You count things." in unlabelled and "And if she buys 5 more?" in unlabelled
    [example] = batcher.examples(records)
    assert example["id"] == "talk" and example["reference"] == "2 + 5 = 7" and example["images"] == []
    assert example["prompt"].endswith(f"And if she buys 5 more?{END}\n<|im_start|>assistant\n")
    assert f"assistant\n2{END}" in example["prompt"]


def test_a_user_turn_may_carry_an_image(processor, tokenizer, tmp_path):
    Image.new("RGB", (20, 12), (200, 30, 30)).save(tmp_path / "red.png")
    record = {"id": 7, "messages": [
        {"role": "user", "content": [{"type": "image", "image_path": "red.png"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"}]}
    path = write_split(tmp_path / "test.json", [FORMS["prompt_completion"], record])
    records = read_instructions(path)
    assert records[1]["id"] == "7"
    assert records[1]["messages"][0]["content"][0]["image_path"] == str(tmp_path / "red.png")
    batch = InstructionBatcher(processor, image_size=16)(records)  # a text-only record, then one with an image
    image_tokens = batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_tokens.sum(1).tolist() == [0, 4]  # 16x16 pixels: 4x4 patches of 4, merged 2x2
    assert torch.equal(batch["mm_token_type_ids"].bool(), image_tokens)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert batch["pixel_values"].shape[0] == 16
    for row, answer in enumerate(("It is 42.", "red")):
        runs = labelled_runs(batch["labels"][row], batch["input_ids"][row])
        assert [processor.tokenizer.decode(run) for run in runs] == [answer + END]
    assert InstructionBatcher(processor, image_size=16).examples(records)[1]["images"] == [str(tmp_path / "red.png")]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: record 1 \(id '7'\): has image .*text-only"):
        InstructionBatcher(tokenizer).check(records, path)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Q"}]}, "has no assistant turn"),
    ({"messages": [{"role": "user", "content": " \n"}, {"role": "assistant", "content": "A"}]},
     r"turn 0 \(user\): is empty"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "text", "text": ""}]}]},
     r"turn 1 \(assistant\): is empty"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]},
     "turn 1 has unknown role 'bot'"),
    ({"instruction": "Q", "input": "x", "output": ""}, "'output' must be a non-empty string"),
    ({"prompt": "Q\nmore", "completion": None}, "'completion' must be a non-empty string, got None"),
    (["user", "assistant"], "must be an object, got list"),
    ({"question": "Q", "answer": "A"}, "must be one of the forms .* found none"),
    ({"prompt": "Q", "output": "A"}, "must be one of the forms .* found alpaca and completion"),
    ({"messages": "Q"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}, "turn 0 must be an object with"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                   {"role": "user", "content": "Thanks"}]}, "ends with a user turn"),
    ({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"},
                   {"role": "assistant", "content": "A"}]}, "its first assistant turn has no user turn before it"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}]},
                   {"role": "assistant", "content": "A"}]}, r"turn 0 \(user\): parts must be"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image_path": "missing.png"}]},
                   {"role": "assistant", "content": "A"}]}, r"turn 0 \(user\): image .*missing.png does not exist"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [
        {"type": "image", "image_path": "missing.png"}]}]}, r"turn 1 \(assistant\): has an image; images go in user"),
    ({"id": 1.5, "prompt": "Q", "completion": "A"}, "'id' must be a string or an integer"),
])
def test_a_bad_record_is_one_line_naming_file_and_record(tmp_path, record, message):
    good = {"prompt": "Q", "completion": "A"}
    path = write_split(tmp_path / "val.json", [good, record, good])
    with pytest.raises(DataError) as error:
        read_instructions(path)
    text = str(error.value)
    assert "\n" not in text
    assert re.match(rf"{re.escape(str(path))}: record 1(?: \(id [^)]*\))?: {message}", text), text


def test_errors_name_the_record_id_and_duplicates(tmp_path):
    path = write_split(tmp_path / "val.json", [{"id": "a", "prompt": "Q", "completion": "A"},
                                               {"id": "b", "prompt": "Q", "completion": ""},
                                               {"id": "a", "prompt": "Q", "completion": "A"}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: record 1 \(id 'b'\): 'completion'"):
        read_instructions(path)
    write_split(path, [{"id": "a", "prompt": "Q", "completion": "A"}, {"id": "a", "prompt": "Q", "completion": "A"}])
    with pytest.raises(DataError, match=r"record 1 \(id 'a'\): id 'a' is also record 0's"):
        read_instructions(path)
    with pytest.raises(DataError, match="holds no records"):
        read_instructions(write_split(tmp_path / "empty.json", []))


def test_overflow_error_truncate_and_prompt_too_long(tokenizer, tmp_path, caplog):
    long_answer = "one two three four five six seven eight nine ten " * 3
    records_data = [{"id": "short", "prompt": "Count.", "completion": "one"},
                    {"id": "long", "prompt": "Count slowly from one to ten, one word at a time.",
                     "completion": long_answer}]
    path = write_split(tmp_path / "train.json", records_data)
    records = read_instructions(path)
    full = InstructionBatcher(tokenizer)
    short, long = (len(full.encode(record)["input_ids"]) for record in records)
    prompt_length = len(tokenizer(full.prompt(records[1]), add_special_tokens=False)["input_ids"])
    limit = (short + long) // 2
    assert short <= prompt_length < limit < long

    strict = InstructionBatcher(tokenizer, max_length=limit)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: record 1 \(id 'long'\): is {long} tokens long, "
                                        rf"over max_length {limit}"):
        strict.check(records, path)
    with pytest.raises(DataError, match=r"^record 'long': is"):
        strict(records)

    lenient = InstructionBatcher(tokenizer, max_length=limit, overflow="truncate")
    with caplog.at_level(logging.WARNING, logger="lowrank_core.instructions"):
        assert lenient.check(records, path) == ["long"]
    assert "1 of 2 records truncated to max_length" in caplog.text
    batch = lenient(records)
    assert batch["input_ids"].shape == (2, limit)
    assert torch.equal(batch["input_ids"][0, :short], full.encode(records[0])["input_ids"])  # untouched
    kept = labelled_runs(batch["labels"][1], batch["input_ids"][1])[0]
    assert len(kept) == limit - prompt_length  # the cut falls on the answer, the prompt is whole
    assert long_answer.startswith(tokenizer.decode(kept))

    for overflow in ("error", "truncate"):
        with pytest.raises(DataError, match=rf"record 1 \(id 'long'\): its prompt alone is {prompt_length} tokens"):
            InstructionBatcher(tokenizer, max_length=prompt_length, overflow=overflow).check(records, path)
    assert InstructionBatcher(tokenizer, max_length=long).check(records, path) == []
    with pytest.raises(ConfigError, match="overflow"):
        InstructionBatcher(tokenizer, overflow="drop")


def test_a_template_that_does_not_extend_prefixes_is_an_error(base_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.chat_template = ("{{ messages | length }} turns\n"  # the count changes the first line
                               "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    records = read_instructions(write_split(tmp_path / "train.json", [FORMS["prompt_completion"]]))
    with pytest.raises(CheckpointError, match="does not extend the chat up to turn 1"):
        InstructionBatcher(tokenizer)(records)


# ---------------------------------------------------------------- the synthetic set

SOLVERS = (  # an independent reading of each template: the question's numbers -> the answer
    (r"has (\d+) \w+ and buys (\d+) more", lambda a, b: a + b),
    (r"has (\d+) \w+ and gives (\d+) of them away", lambda a, b: a - b),
    (r"There are (\d+) bags with (\d+) \w+ in each", lambda a, b: a * b),
    (r"had (\d+) \w+, bought (\d+) more and gave (\d+) away", lambda a, b, c: a + b - c),
)


def solve(question: str) -> int:
    [answer] = [solver(*map(int, match.groups())) for pattern, solver in SOLVERS
                if (match := re.search(pattern, question))]
    return answer


def question_of(record: dict) -> str:
    return record["messages"][-2]["content"].split("\n\n")[-1]


def test_synthetic_set_is_deterministic_correct_disjoint_and_mixes_forms(tmp_path):
    spec = SyntheticInstructionSpec(train=40, val=12, test=12)
    files = generate_synthetic_instructions(tmp_path / "a", spec)
    again = generate_synthetic_instructions(tmp_path / "b", spec)
    other = generate_synthetic_instructions(tmp_path / "c", SyntheticInstructionSpec(seed=1, train=40, val=12, test=12))
    assert all(files[s].read_text() == again[s].read_text() != other[s].read_text() for s in files)
    questions = {}
    for split, path in files.items():
        raw = json.loads(path.read_text())
        assert len(raw) == getattr(spec, split)
        assert {"messages", "instruction", "prompt"} <= {key for record in raw for key in record}
        assert any(record.get("input") == "" for record in raw) and any(record.get("input") for record in raw)
        records = read_instructions(path)
        questions[split] = {question_of(record) for record in records}
        assert len(questions[split]) == len(records)
        for record in records:
            answer = solve(question_of(record))
            assert answer >= 0 and reference(record) == str(answer)
    assert not (questions["train"] & questions["val"] or questions["train"] & questions["test"]
                or questions["val"] & questions["test"])
    assert len({solve(q) for q in questions["train"]}) > 5  # the answer depends on the numbers


def test_synthetic_reasoning_keeps_the_number_last_and_sizes_are_checked(tmp_path):
    files = generate_synthetic_instructions(tmp_path / "r", SyntheticInstructionSpec(train=8, val=2, test=2,
                                                                                      reasoning=True))
    for record in read_instructions(files["train"]):
        working, answer = reference(record).split(" = ")
        assert int(answer) == solve(question_of(record)) == eval(working)
    with pytest.raises(ConfigError, match="max_number"):
        SyntheticInstructionSpec.from_dict({"max_number": 1})
    with pytest.raises(ConfigError, match="dataset.synthetic_instructions.train: cannot draw 2000 distinct"):
        generate_synthetic_instructions(tmp_path / "x", SyntheticInstructionSpec(train=2000, max_number=2))

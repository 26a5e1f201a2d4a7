"""Instruction fine-tuning data (objective `sft`): records, their validation, chat rendering with response-only
labels, and the synthetic arithmetic default.

Record forms (a split is a JSON list; the forms may be mixed; an optional ``"id"`` (string or integer) names a record,
else its index does):

* chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}``, several turns allowed.
  A content is a string or a list of parts ``{"type": "text", "text": ...}`` and, in user turns only,
  ``{"type": "image", "image_path": ...}`` (relative to the annotation file; for vision-language models);
* Alpaca: ``{"instruction": ..., "input": ... (optional, may be empty), "output": ...}`` -> user
  ``instruction`` (then a blank line and ``input`` when there is one), assistant ``output``;
* ``{"prompt": ..., "completion": ...}`` -> user ``prompt``, assistant ``completion``.

`read_instructions(path)` checks the structure and normalises every record to ``{"id": str, "messages": [...]}``
(text-only contents become strings; image paths are resolved). `InstructionBatcher.check(records, path)` checks
what needs the model: images against a text-only model, and the length in tokens against `max_length` with the
`overflow` policy: ``error``, or ``truncate`` (tokens dropped from the end of the last assistant turn; the ids of the
records cut are returned and logged, for the caller to record). A record whose prompt alone (everything before the
last assistant turn) fills `max_length` is always an error. Every DataError is one line naming the file and the
record index (and id).

Labels: the chat is rendered with the model's own chat template; each assistant turn's span (its content and the
template's end-of-turn token, not the role header, not what the template writes after the end-of-turn token) is
located by rendering prefixes: the chat up to turn k with the generation prompt must be a prefix of the chat through
turn k, which must be a prefix of the whole chat (else CheckpointError). The text is tokenised piece by piece
(prompts, answers), as a model sees a prompt at generation time and then writes the answer. Assistant tokens carry
their ids as labels, everything else IGNORE_INDEX; what the template writes after the last end-of-turn token (a
newline) is left out.

For generation-based evaluation, `InstructionBatcher.examples(records)` gives each record's prompt (the chat up to the
last assistant turn, with the generation prompt) and reference (the last assistant turn's content).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from .data import load_image, read_records
from .errors import CheckpointError, ConfigError, DataError
from .lm_data import IGNORE_INDEX

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
FORMS = {"messages": ("messages",), "alpaca": ("instruction", "input", "output"),
         "completion": ("prompt", "completion")}
_FORMS_TEXT = '{"messages": [...]}, {"instruction", "input", "output"} or {"prompt", "completion"}'


# ---------------------------------------------------------------- records


def read_instructions(path: str | Path) -> list[dict]:
    """The records of annotation file `path`, structurally checked and normalised to ``{"id", "messages"}``."""
    path = Path(path)
    records, seen = [], {}
    for index, record in enumerate(read_records(path)):
        where = f"{path}: record {index}"
        if isinstance(record, dict) and "id" in record:
            where += f" (id {record['id']!r})"
        normalised = normalise_record(record, where, path.parent)
        if "id" not in normalised:
            normalised = {"id": str(index), **normalised}
        if normalised["id"] in seen:
            raise DataError(f"{where}: id {normalised['id']!r} is also record {seen[normalised['id']]}'s")
        seen[normalised["id"]] = index
        records.append(normalised)
    if not records:
        raise DataError(f"{path}: holds no records")
    return records


def normalise_record(record: Any, where: str, root: Path) -> dict:
    """One record of any form as ``{"id" (if it has one), "messages"}``; DataError(`where`: ...) if malformed.

    Image paths are resolved against `root` and must exist.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be an object, got {type(record).__name__}")
    forms = [form for form, keys in FORMS.items() if any(key in record for key in keys)]
    if len(forms) != 1:
        found = "none" if not forms else " and ".join(forms)
        raise DataError(f"{where}: must be one of the forms {_FORMS_TEXT}; found {found} (keys {sorted(record)})")
    normalised = {}
    if "id" in record:
        if type(record["id"]) not in (str, int):
            raise DataError(f"{where}: 'id' must be a string or an integer, got {type(record['id']).__name__}")
        normalised["id"] = str(record["id"])
    if forms[0] == "messages":
        messages = _chat(record["messages"], where, root)
    elif forms[0] == "alpaca":
        extra = _string(record, "input", where, required=False)
        user = _string(record, "instruction", where) + (f"\n\n{extra}" if extra.strip() else "")
        messages = [{"role": "user", "content": user},
                    {"role": "assistant", "content": _string(record, "output", where)}]
    else:
        messages = [{"role": "user", "content": _string(record, "prompt", where)},
                    {"role": "assistant", "content": _string(record, "completion", where)}]
    return {**normalised, "messages": messages}


def _string(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value.strip()):
        kind = "a non-empty string" if required else "a string"
        raise DataError(f"{where}: '{key}' must be {kind}, got {value!r:.40}")
    return value


def _chat(messages: Any, where: str, root: Path) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: turn {k} must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise DataError(f"{where}: turn {k} has unknown role {role!r} (expected {', '.join(ROLES)})")
        turns.append({"role": role, "content": _content(message["content"], f"{where}: turn {k} ({role})", role, root)})
    roles = [turn["role"] for turn in turns]
    if "assistant" not in roles:
        raise DataError(f"{where}: has no assistant turn")
    if "user" not in roles[:roles.index("assistant")]:
        raise DataError(f"{where}: its first assistant turn has no user turn before it")
    if roles[-1] != "assistant":
        raise DataError(f"{where}: ends with a {roles[-1]} turn; the last turn must be the assistant's (the answer)")
    return turns


def _content(content: Any, where: str, role: str, root: Path) -> str | list[dict]:
    """A turn's content: a string, or (with images) a list of text and image parts."""
    if isinstance(content, str):
        if not content.strip():
            raise DataError(f"{where}: is empty")
        return content
    if not isinstance(content, list):
        raise DataError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image" and isinstance(part.get("image_path"), str):
            if role != "user":
                raise DataError(f"{where}: has an image; images go in user turns")
            image = (root / part["image_path"]).resolve()
            if not image.is_file():
                raise DataError(f"{where}: image {image} does not exist")
            parts.append({"type": "image", "image_path": str(image)})
        else:
            raise DataError(f"{where}: parts must be {{\"type\": \"text\", \"text\": str}} or "
                            f"{{\"type\": \"image\", \"image_path\": str}}, got {part!r:.60}")
    if not any(part["type"] == "image" for part in parts):
        text = "".join(part["text"] for part in parts)
        if not text.strip():
            raise DataError(f"{where}: is empty")
        return text
    return parts


def images_of(message: dict) -> list[str]:
    """The image paths of a turn, in order."""
    content = message["content"]
    return [] if isinstance(content, str) else [part["image_path"] for part in content if part["type"] == "image"]


def text_of(content: str | list[dict]) -> str:
    """The text of a turn's content: its text parts joined by spaces, images left out."""
    return content if isinstance(content, str) else " ".join(part.get("text", "") for part in content)


def reference(record: dict) -> str:
    """The record's reference answer: its last assistant turn's content."""
    return record["messages"][-1]["content"]


# ---------------------------------------------------------------- rendering


@dataclasses.dataclass
class InstructionBatcher:
    """Render normalised records with the model's chat template into right-padded batches with labels on the
    assistant tokens only.

    `processor` is a tokenizer with a chat template (text-only; `image_size` None) or a vision-language processor
    (`image_size`: the square side images are resized to). `max_length` (tokens, image tokens included; None: no
    limit) and `overflow` are as in the module docstring.
    """

    processor: Any
    max_length: int | None = None
    overflow: Literal["error", "truncate"] = "error"
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.overflow not in ("error", "truncate"):
            raise ConfigError(f"overflow: must be 'error' or 'truncate', got {self.overflow!r}")
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt(self, record: dict) -> str:
        """The chat up to the last assistant turn, with the generation prompt: what the model answers."""
        return self.render(record["messages"][:-1], add_generation_prompt=True)

    def examples(self, records: list[dict]) -> list[dict]:
        """For generation-based evaluation: each record's ``{"id", "prompt", "reference", "images"}`` (image paths
        of the prompt, in order)."""
        return [{"id": record["id"], "prompt": self.prompt(record), "reference": reference(record),
                 "images": [path for message in record["messages"][:-1] for path in images_of(message)]}
                for record in records]

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool, list[str]]]:
        """The rendered chat as ``(text, is_assistant_span, image_paths)`` pieces, ending with the last assistant
        span."""
        full = self.render(messages)
        pieces, end, after = [], 0, 0
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True)
            turn = self.render(messages[:k + 1])
            if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= end):
                raise CheckpointError(f"the chat template does not extend the chat up to turn {k} (with the generation "
                                      "prompt) with that assistant turn; assistant tokens cannot be located")
            images = [path for m in messages[after:k] for path in images_of(m)]
            answer_end = len(turn.rstrip())
            pieces += [(full[end:len(prompt)], False, images), (full[len(prompt):answer_end], True, [])]
            end, after = answer_end, k + 1
        return pieces

    def _tokenise(self, text: str, images: list[str]) -> dict[str, torch.Tensor]:
        if self.image_size is None:
            if images:
                raise DataError(f"has image {images[0]}, but the model is text-only (no image_size)")
            return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
        pixels = self.image_size * self.image_size
        return self.processor(text=[text], images=[load_image(p, self.image_size) for p in images] or None,
                              images_kwargs={"size": {"shortest_edge": pixels, "longest_edge": pixels}},
                              add_special_tokens=False, return_tensors="pt")

    def encode_full(self, record: dict) -> tuple[dict[str, torch.Tensor], int]:
        """The record as unpadded tensors (per-token ones 1-D, image inputs as the processor gives them), untruncated,
        and the length of its prompt (the tokens before the last assistant span)."""
        parts = [(self._tokenise(text, images), labelled) for text, labelled, images in self.pieces(record["messages"])
                 if text]
        encoded = {}
        for key in dict.fromkeys(key for inputs, _ in parts for key in inputs):
            present = [inputs for inputs, _ in parts if key in inputs]
            if len(present) == len(parts) and all(inputs[key].shape == inputs["input_ids"].shape for inputs in present):
                encoded[key] = torch.cat([inputs[key][0] for inputs in present])  # per-token
            else:  # image inputs (pixel_values, image_grid_thw) of the pieces with images
                encoded[key] = torch.cat([inputs[key] for inputs in present])
        encoded["labels"] = torch.cat([inputs["input_ids"][0] if labelled
                                       else torch.full_like(inputs["input_ids"][0], IGNORE_INDEX)
                                       for inputs, labelled in parts])
        return encoded, len(encoded["labels"]) - parts[-1][0]["input_ids"].shape[1]

    def fit(self, encoded: dict[str, torch.Tensor], prompt_length: int,
            where: str) -> tuple[dict[str, torch.Tensor], bool]:
        """`encoded` within `max_length` and whether it was truncated; DataError(`where`: ...) per the policy."""
        length = len(encoded["labels"])
        if self.max_length is None or length <= self.max_length:
            return encoded, False
        if prompt_length >= self.max_length:
            raise DataError(f"{where}: its prompt alone is {prompt_length} tokens, max_length is {self.max_length}: "
                            "no answer token would remain")
        if self.overflow == "error":
            raise DataError(f"{where}: is {length} tokens long, over max_length {self.max_length} "
                            "(overflow 'truncate' would cut the end of its last answer)")
        return {key: value[:self.max_length] if value.shape == (length,) else value
                for key, value in encoded.items()}, True

    def encode(self, record: dict) -> dict[str, torch.Tensor]:
        """One record as unpadded tensors, truncated per the overflow policy."""
        encoded, prompt_length = self.encode_full(record)
        return self.fit(encoded, prompt_length, f"record {record['id']!r}")[0]

    def check(self, records: list[dict], path: str | Path) -> list[str]:
        """Render every record of annotation file `path` (as `read_instructions` returned them): DataError naming the
        file and record if one cannot be used; the ids of the records `overflow: truncate` cuts (logged)."""
        truncated = []
        for index, record in enumerate(records):
            where = f"{path}: record {index} (id {record['id']!r})"
            try:
                encoded, prompt_length = self.encode_full(record)
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            if self.fit(encoded, prompt_length, where)[1]:
                truncated.append(record["id"])
        if truncated:
            log.warning("%s: %d of %d records truncated to max_length %d (first: id %r)", path, len(truncated),
                        len(records), self.max_length, truncated[0])
        return truncated

    def __call__(self, records: list[dict]) -> dict[str, torch.Tensor]:
        """A batch: per-token tensors (input_ids, attention_mask, labels, ...) right-padded (pad id, 0, -100), image
        inputs concatenated."""
        encoded = [self.encode(record) for record in records]
        length = max(len(e["input_ids"]) for e in encoded)
        pad_values = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}
        batch = {}
        for key in dict.fromkeys(key for e in encoded for key in e):
            values = [e[key] for e in encoded if key in e]
            if len(values) == len(encoded) and all(v.shape == e["labels"].shape for v, e in zip(values, encoded)):
                batch[key] = torch.stack([torch.nn.functional.pad(v, (0, length - len(v)), value=pad_values.get(key, 0))
                                          for v in values])
            else:  # image inputs of the records with images
                batch[key] = torch.cat(values)
        return batch

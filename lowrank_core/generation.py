"""Generation-based evaluation: greedy generation of test prompts, scoring, `predictions.csv`, the test loss and
perplexity over response tokens, and the loss on general text (forgetting).

Scores of one generated text against its reference:

* ``score`` (exact match): 1 if ``normalise(generated) == normalise(reference)``, else 0;
* ``numeric``: 1.0 if the last number in the generated text equals the reference's last number (within
  `tolerance` x max(1, |reference|)), 0.0 if it differs or the text has no number; empty (NaN) when the reference
  holds no number. A number: not right after an ASCII letter, a digit or a dot, an optional minus sign (``-`` or
  ``−``, not right after one of those either), digits with optional thousands separators (``1,234``; ``1,2345`` is
  two numbers) and an optional decimal part (``3.5``; ``7.`` is 7).

Typical use, with `instructions.InstructionBatcher`::

    examples = batcher.examples(test_records)
    generated = greedy_generate(model, processor, [e["prompt"] for e in examples], max_new_tokens=16)
    frame = score_predictions(examples, generated)
    metrics = write_predictions("predictions.csv", frame) | response_loss(model, test_batches)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import DataError
from .io import atomic_path
from .lm_data import IGNORE_INDEX, lm_loss

PREDICTION_COLUMNS = ("id", "prompt", "reference", "generated", "score", "numeric")
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}
_TRAILING_PUNCTUATION = ".,;:!?"
_NUMBER = re.compile(r"(?:(?<![A-Za-z\d.])[-\u2212])?(?<![A-Za-z\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)")


def normalise(text: str) -> str:
    """`text` lowercased, every whitespace run (leading and trailing ones removed) made one space, then, until
    nothing changes, trailing punctuation (``. , ; : ! ?``) removed and one pair of surrounding quotes (``"..."``,
    ``'...'``, ```...```, ``“...”``, ``‘...’``) unwrapped, with the whitespace this exposes stripped."""
    text = " ".join(text.split()).lower()
    while True:
        before = text
        text = text.rstrip(_TRAILING_PUNCTUATION).strip()
        if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
            text = text[1:-1].strip()
        if text == before:
            return text


def exact_match(generated: str, reference: str) -> bool:
    return normalise(generated) == normalise(reference)


def last_number(text: str) -> float | None:
    """The last number in `text` (see the module docstring), or None."""
    numbers = _NUMBER.findall(text)
    return float(numbers[-1].replace(",", "").replace("\u2212", "-")) if numbers else None


def numeric_score(generated: str, reference: str, tolerance: float = 1e-6) -> float | None:
    """1.0 / 0.0: the last numbers of `generated` and `reference` agree; None when `reference` has no number."""
    expected = last_number(reference)
    if expected is None:
        return None
    found = last_number(generated)
    return float(found is not None and abs(found - expected) <= tolerance * max(1.0, abs(expected)))


def greedy_generate(model: torch.nn.Module, processor: Any, prompts: list[str], max_new_tokens: int = 32,
                    batch_size: int = 8, images: list[list] | None = None,
                    processor_kwargs: dict | None = None) -> list[str]:
    """Greedy (do_sample False) continuations of the rendered `prompts`, only the new text, special tokens skipped.

    Batches are left-padded, so a prompt's continuation does not depend on the others in its batch. `processor` is
    a tokenizer or a vision-language processor; for the latter `images` gives each prompt's images (PIL, in the
    order of their placeholders) and `processor_kwargs` extra arguments of the processor call (e.g. images_kwargs).
    The model runs in eval mode (its mode is restored after).
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generated = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
            kwargs = dict(processor_kwargs or {})
            if images is not None:
                kwargs["images"] = [image for per_prompt in images[start:start + batch_size]
                                    for image in per_prompt] or None
            inputs = processor(text=prompts[start:start + batch_size], padding=True, padding_side="left",
                               add_special_tokens=False, return_tensors="pt", **kwargs).to(device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
            generated += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return generated


def score_predictions(examples: list[dict], generated: list[str], tolerance: float = 1e-6) -> pd.DataFrame:
    """One row per example (``{"id", "prompt", "reference"}``, e.g. `InstructionBatcher.examples`) with its
    generated text and scores, columns `PREDICTION_COLUMNS`."""
    if len(examples) != len(generated):
        raise ValueError(f"{len(examples)} examples but {len(generated)} generated texts")
    rows = [{"id": example["id"], "prompt": example["prompt"], "reference": example["reference"], "generated": text,
             "score": int(exact_match(text, example["reference"])),
             "numeric": numeric_score(text, example["reference"], tolerance)}
            for example, text in zip(examples, generated)]
    return pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS)).astype({"numeric": float})


def prediction_metrics(frame: pd.DataFrame) -> dict:
    """``n``, ``exact_match`` (mean score), ``numeric_n`` (rows whose reference has a number) and
    ``numeric_accuracy`` (their mean numeric score; None when there are none)."""
    numeric = frame["numeric"].dropna()
    return {"n": len(frame), "exact_match": float(frame["score"].mean()) if len(frame) else math.nan,
            "numeric_n": len(numeric), "numeric_accuracy": float(numeric.mean()) if len(numeric) else None}


def write_predictions(path: str | Path, frame: pd.DataFrame) -> dict:
    """Write `score_predictions`' `frame` as CSV at `path` (atomically) and return its `prediction_metrics`."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return prediction_metrics(frame)


def read_texts(path: str | Path) -> list[str]:
    """The texts of a plain-text file, one per non-empty line; DataError naming the file when it has none."""
    try:
        texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({err})") from None
    if not texts:
        raise DataError(f"{path}: holds no text (one text per non-empty line)")
    return texts


def text_loss(model: torch.nn.Module, processor: Any, texts: list[str], batch_size: int = 8,
              max_length: int = 512) -> dict:
    """`response_loss` over every token of `texts` read as plain text (no chat template; each cut to `max_length`
    tokens): the model's general language loss, whose rise over the base's measures forgetting."""
    tokenizer = getattr(processor, "tokenizer", processor)

    def batches():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, padding_side="right", truncation=True,
                              max_length=max_length, return_tensors="pt")
            yield {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)}

    return response_loss(model, batches())


def response_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """``loss`` (mean cross-entropy over all labelled tokens of all `batches`, each token weighing the same),
    ``perplexity`` (its exp) and ``tokens`` (how many); NaN loss and perplexity without labelled tokens."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if count:
                    total += float(lm_loss(model, {key: value.to(device) for key, value in batch.items()})) * count
                    tokens += count
    finally:
        model.train(was_training)
    loss = total / tokens if tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}

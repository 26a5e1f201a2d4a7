"""The synthetic instruction set of the tiny SFT study: arithmetic word problems with checkable numeric answers,
written in all three record forms (`instructions.py`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ...config import Section, require
from ...errors import ConfigError
from ...io import atomic_path

SPLITS = ("train", "val", "test")
NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lucy")
ITEMS = ("apples", "pencils", "marbles", "stickers", "books", "cookies")
SYSTEM_PROMPT = "You solve arithmetic word problems."
INSTRUCTION = "Solve the word problem. Answer with the number."


@dataclasses.dataclass(frozen=True)
class SyntheticInstructionSpec(Section):
    """Sizes and difficulty of the synthetic arithmetic instruction set: operands are 1 .. `max_number` (small, so
    that a tiny model sees every operand pair in training); `reasoning` writes answers as the calculation
    ("3 + 4 = 7") instead of the number alone."""

    key = "dataset.synthetic_instructions"
    seed: int = 0
    train: int = 480
    val: int = 40
    test: int = 40
    max_number: int = 5
    reasoning: bool = False

    def check(self, key: str) -> None:
        for split in SPLITS:
            require(getattr(self, split) >= 1, key, split, "must be at least 1")
        require(2 <= self.max_number <= 99, key, "max_number", "must be in [2, 99]")


def word_problem(rng: np.random.Generator, max_number: int, reasoning: bool) -> tuple[str, str]:
    """A random word problem and its answer (the number last). Four templates: add, take away, groups of, and
    buy-then-give (a + b - c), with operands in 1 .. `max_number` and answers never negative."""
    name, item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
    a, b, c = (int(x) for x in rng.integers(1, max_number + 1, size=3))
    template = int(rng.integers(4))
    if template == 0:
        question = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        working, answer = f"{a} + {b}", a + b
    elif template == 1:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?"
        working, answer = f"{a} - {b}", a - b
    elif template == 2:
        question = f"There are {a} bags with {b} {item} in each bag. How many {item} are there in all?"
        working, answer = f"{a} * {b}", a * b
    else:
        c = min(c, a + b)
        question = f"{name} had {a} {item}, bought {b} more and gave {c} away. How many {item} are left?"
        working, answer = f"{a} + {b} - {c}", a + b - c
    return question, f"{working} = {answer}" if reasoning else str(answer)


def instruction_record(record_id: str, question: str, answer: str, form: int) -> dict:
    """The problem as record form `form` % 4: chat with a system turn, Alpaca with the question as input, Alpaca with
    the question as instruction (empty input), prompt / completion."""
    form %= 4
    if form == 0:
        return {"id": record_id, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}]}
    if form == 1:
        return {"id": record_id, "instruction": INSTRUCTION, "input": question, "output": answer}
    if form == 2:
        return {"id": record_id, "instruction": question, "input": "", "output": answer}
    return {"id": record_id, "prompt": question, "completion": answer}


def generate_synthetic_instructions(out_dir: str | Path, spec: SyntheticInstructionSpec) -> dict[str, Path]:
    """Write deterministic `{train,val,test}.json` arithmetic word problems into `out_dir` (each split seeded by
    `spec.seed` and its index; a question appears once across all splits), record forms cycling through
    `instruction_record`'s four."""
    seen: set[str] = set()
    files = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for split_index, split in enumerate(SPLITS):
            rng = np.random.default_rng([spec.seed, split_index])
            records, count = [], getattr(spec, split)
            for _ in range(100 * count):
                question, answer = word_problem(rng, spec.max_number, spec.reasoning)
                if question not in seen:
                    seen.add(question)
                    records.append(instruction_record(f"{split}_{len(records):05d}", question, answer, len(records)))
                    if len(records) == count:
                        break
            else:
                raise ConfigError(f"{spec.key}.{split}: cannot draw {count} distinct problems "
                                  f"with max_number {spec.max_number}")
            (tmp / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
            files[split] = Path(out_dir) / f"{split}.json"
    return files

"""The instruct modality's report section: the first test questions with the base's and the teacher's answers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...instructions import text_of
from ...io import read_json
from ...report import ReportSection, table

EXAMPLES = 6


def examples_section(manifest_json: str | Path, references_csv: str | Path) -> ReportSection | None:
    """`<section id="answers">`: the first test records' questions and references with the base's and the teacher's
    greedy answers (None without both prediction files)."""
    references = pd.read_csv(references_csv).set_index("model")
    folder = Path(references_csv).parent
    files = {name: folder / references.at[name, "predictions"] for name in ("base", "teacher")
             if name in references.index and isinstance(references.at[name, "predictions"], str)}
    if len(files) < 2:
        return None
    base, teacher = (pd.read_csv(files[name], dtype={"id": str}, keep_default_na=False).head(EXAMPLES)
                     for name in ("base", "teacher"))
    questions = {record["id"]: _last_user_turn(record)
                 for record in read_json(manifest_json)["splits"]["test"]["records"]}
    rows = [{"id": id_, "question": questions.get(id_, ""), "reference": reference, "base": base_answer,
             "teacher": teacher_answer}
            for id_, reference, base_answer, teacher_answer
            in zip(base["id"], base["reference"], base["generated"], teacher["generated"])]
    return ReportSection("Answers of the base and the teacher",
                         f"<p>The first {len(rows)} test records, answered greedily.</p>" + table(rows), "answers")


def _last_user_turn(record: dict) -> str:
    return text_of(next(m["content"] for m in reversed(record["messages"]) if m["role"] == "user"))

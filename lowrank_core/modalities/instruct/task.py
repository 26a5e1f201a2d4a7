"""What an sft arm, the teacher and the references read of the config beyond training: record length and generation."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ...config import Section, require


@dataclasses.dataclass(frozen=True)
class SftTaskConfig(Section):
    """`sft`: the longest record in tokens and what happens to longer ones (`error`, or `truncate` the end of the last
    answer), and the evaluation's generation length and numeric tolerance."""

    key = "sft"
    max_length: int = 256
    overflow: Literal["error", "truncate"] = "error"
    max_new_tokens: int = 16
    numeric_tolerance: float = 1e-6

    def check(self, key: str) -> None:
        require(self.max_length >= 2, key, "max_length", "must be at least 2")
        require(self.max_new_tokens >= 1, key, "max_new_tokens", "must be at least 1")
        require(self.numeric_tolerance >= 0, key, "numeric_tolerance", "must not be negative")

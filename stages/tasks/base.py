"""What every task plugin shares: the last-\\boxed{} extractor, step splitting, grade labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Label = Literal["correct", "incorrect", "no_answer", "timeout", "error"]
LABELS: tuple[str, ...] = ("correct", "incorrect", "no_answer", "timeout", "error")


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed), stripped; None if absent
    or unclosed. Linear in len(text); never evaluates anything."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{") : i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)
    return None


@dataclass(frozen=True)
class Step:
    index: int  # 1-based, over the non-empty lines of the text
    text: str
    start: int  # character offsets in the solution text
    end: int


def split_steps(text: str) -> list[Step]:
    """One step per non-empty line, with its character span."""
    steps, pos = [], 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped:
            lead = len(line) - len(line.lstrip())
            steps.append(Step(len(steps) + 1, stripped, pos + lead, pos + lead + len(stripped)))
        pos += len(line)
    return steps

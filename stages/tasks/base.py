"""What every task plugin shares: the last-\\boxed{} extractor, step splitting, and the
reflection detector."""

from __future__ import annotations

import re
from dataclasses import dataclass

_BRACES = re.compile(r"\\boxed\{|[{}]")


def extract_boxed(text: str) -> str | None:
    """The content of the last closed \\boxed{...} (nested braces allowed), stripped; None if
    there is none. One linear pass over the braces; never evaluates anything."""
    stack: list[int | None] = []  # per open brace: content start if it opens a \boxed, else None
    last: tuple[int, int] | None = None
    for m in _BRACES.finditer(text):
        if m.group() == "}":
            if stack and (start := stack.pop()) is not None and (last is None or start > last[0]):
                last = (start, m.start())
        else:
            stack.append(m.end() if m.group() != "{" else None)
    return text[last[0] : last[1]].strip() if last else None


@dataclass(frozen=True)
class Step:
    index: int  # 1-based, over the non-empty lines of the text
    text: str
    start: int  # character offsets in the solution text
    end: int
    line_end: int  # after the line's terminator (\n, \r\n, \r, U+2028, ...), if any


def split_steps(text: str) -> list[Step]:
    """One step per non-empty line (lines as `str.splitlines` cuts them), with its character
    span. The one step splitter: tasks, locate and construct all cut here."""
    steps, pos = [], 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped:
            lead = len(line) - len(line.lstrip())
            steps.append(Step(len(steps) + 1, stripped, pos + lead, pos + lead + len(stripped),
                              pos + len(line)))
        pos += len(line)
    return steps


REFLECTION_RE = re.compile(r"Wait, step \d+ is wrong|<analysis>")


def reflects(text: str) -> bool:
    """Whether a response reflects: it contains the transition phrase of our trajectories
    ("Wait, step k is wrong") or the construction format's `<analysis>` tag."""
    return REFLECTION_RE.search(text) is not None

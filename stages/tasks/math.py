"""The `math` task: real competition problems with LaTeX answers, graded by math-verify.

Grading is two-tier: `fast_verdict` settles identical answers and integer pairs in microseconds;
everything else goes to `verify_answer` (math-verify), which the grader pool runs in worker
processes under a hard timeout. Model output is parsed, never evaluated.
"""

from __future__ import annotations

import re

from stages.tasks.base import Step, Task, extract_boxed, register, split_steps

__all__ = ["MathTask", "Step", "extract_boxed", "split_steps"]

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_TEMPLATE = "{problem}\n" + INSTRUCTION.replace("{}", "{{}}") + "\n"  # for str.format

_INT_RE = re.compile(r"^[+-]?\d{1,15}$")
_STRIP_RE = re.compile(r"\\left|\\right|\$")
_SPACE_RE = re.compile(r"(?<!,)\s+")  # a space after a comma can matter ("1, 5" vs "1,5")


def chat_messages(problem: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}]


def normalize(answer: str) -> str:
    """`\\left`, `\\right` and `$` removed, whitespace removed except after a comma,
    `\\dfrac`/`\\tfrac` -> `\\frac`, a trailing period dropped: two answers equal after this
    are the same answer to math-verify too (so the fast path never changes a verdict)."""
    out = _SPACE_RE.sub("", _STRIP_RE.sub("", answer).strip())
    return out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def fast_verdict(answer: str, reference: str) -> tuple[str, str] | None:
    """(label, reason) when the answer is settled without math-verify, else None."""
    a, r = normalize(answer), normalize(reference)
    if a and a == r:
        return "correct", "exact match"
    if _INT_RE.match(a) and _INT_RE.match(r):
        return ("correct", "equal integers") if int(a) == int(r) else (
            "incorrect", f"integer {a} != {r}")
    return None


def verify_answer(answer: str, reference: str) -> tuple[str, str]:
    """math-verify on the two boxed answers. No timeout of its own: the caller bounds it."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not gold:
        return "error", f"reference {reference[:60]!r} does not parse"
    if not pred:
        return "incorrect", f"answer {answer[:60]!r} does not parse"
    if verify(gold, pred, timeout_seconds=None):
        return "correct", "math-verify: equivalent"
    return "incorrect", "math-verify: not equivalent"


@register
class MathTask(Task):
    """Competition math: LaTeX answers, math-verify; a chat prompt with `task.chat`."""

    name = "math"

    def prompt(self, problem: str):
        if self.config.chat:
            return chat_messages(problem)
        return PROMPT_TEMPLATE.format(problem=problem)

    def fast_verdict(self, answer: str, reference: str) -> tuple[str, str] | None:
        return fast_verdict(answer, reference)

    def verify(self, answer: str, reference: str) -> tuple[str, str]:
        return verify_answer(answer, reference)

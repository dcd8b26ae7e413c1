"""The task plugin interface (`Task`), its registry, and what every task shares: the
last-\\boxed{} extractor, step splitting, and the reflection detector.

A task is a class that registers itself under its name (`@register`); the stages, the grader
and the flows ask `get_task(cfg.task)` and never branch on a task's name. A task is built from
its config section (`task`: name, chat) and is picklable (the grader's worker processes run its
`verify`). Third-party tasks register the same way once imported; the config accepts the names
of the built-in tasks and of those installed under the `tapo.tasks` entry point (pyproject.toml).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from pipeline.config import REFLECTION_PATTERN, TaskConfig, task_plugins
from pipeline.engines.base import Prompt

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


REFLECTION_RE = re.compile(REFLECTION_PATTERN)


def line_break(prefix: str) -> str:
    """The newline to write after `prefix` before a new line ("" after an empty prefix or one
    that already ends a line)."""
    return "\n" if prefix and not prefix.endswith("\n") else ""


def reflects(text: str) -> bool:
    """Whether a response reflects: it contains the transition phrase of our trajectories
    ("Wait, step k is wrong") or the construction format's `<analysis>` tag."""
    return REFLECTION_RE.search(text) is not None


class Rejection(NamedTuple):
    """Why a row is dropped: `reason` (a short key, counted) and a `detail` for the reader."""

    reason: str
    detail: str


Located = tuple[int, int, str]  # (failure step, prefix chars, detail)
Repair = tuple[str, str, str]  # (prefix, diagnosis, correction)


class Task:
    """A task: how a problem is prompted, how an answer is graded, how a response is cut into
    steps, and (optionally) an exact step checker that locates a failure and builds the repair
    without a model (`has_step_checker`; `locate.method=rule`, `construction.method=rule`).

    Grading is two-tier (pipeline/grader.py): `fast_verdict` runs in the caller's process and
    settles what it can; `verify` runs in the grader's worker processes under a hard timeout.
    """

    name: ClassVar[str]
    has_step_checker: ClassVar[bool] = False
    generated_problems: ClassVar[bool] = False  # the testbed's splits are its problems
    # one correct solution per problem (arith's step format): a correct llm correction is the
    # reference's tail by necessity, so construct's copy check cannot tell copying from solving
    unique_solutions: ClassVar[bool] = False

    def __init__(self, config: TaskConfig | None = None):
        self.config = config or TaskConfig.model_construct(name=self.name, chat=False)

    def prompt(self, problem: str) -> Prompt:
        """The prompt the engine gets for a problem (text, or chat messages)."""
        raise NotImplementedError

    def problem_from_prompt(self, prompt: str) -> str:
        """The problem inside a rendered prompt (OpenRLHF hands us prompts, not problems)."""
        return prompt

    def answer(self, response: str) -> str | None:
        """The final answer of a response (the last \\boxed{}), or None."""
        return extract_boxed(response)

    def fast_verdict(self, answer: str, reference: str) -> tuple[str, str] | None:
        """(label, reason) when settled cheaply, else None (then `verify` decides)."""
        return None

    def verify(self, answer: str, reference: str) -> tuple[str, str]:
        """(label, reason) by the task's full checker; may be slow or hang (the grader bounds
        it). `verify("1", "1")` warms a grader worker up."""
        raise NotImplementedError

    def split_steps(self, text: str) -> list[Step]:
        return split_steps(text)

    def difficulty(self, problem: str) -> int | None:
        """A problem's difficulty level for reports (arith: its number of steps), or None."""
        return None

    def locate_failure(self, problem: str, response: str) -> Located | Rejection:
        """The exact step checker: where a wrong response first fails."""
        raise NotImplementedError(f"the {self.name} task has no exact step checker")

    def step_number(self, problem: str, response: str, line: int) -> int:
        """The number a reflection gives the step on line `line` of `response` (1-based, as
        split_steps numbers them): the line's own number, unless the task numbers its steps
        otherwise (arith: the step of the computation, which a reflection's redone lines
        repeat)."""
        return line

    def error_kind(self, problem: str, response: str) -> str | None:
        """The kind of a wrong response's first error, when the task can tell (arith:
        misread, slip, copy, ...); None otherwise."""
        return None

    def repair(self, problem: str, prefix: str, failed: Step | None,
               full: bool) -> Repair | Rejection:
        """The exact constructor: the diagnosis and correction after a kept `prefix` whose
        failed step is `failed` (None: the response ended early); `full`: a whole solution."""
        raise NotImplementedError(f"the {self.name} task has no exact step checker")


TASKS: dict[str, type[Task]] = {}
BUILTIN = ("stages.tasks.arith", "stages.tasks.math")


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: makes a task available to `get_task` under `cls.name`."""
    TASKS[cls.name] = cls
    return cls


def get_task(config: TaskConfig | str) -> Task:
    """The task named by the config section (or a bare name), built from that section."""
    name = config if isinstance(config, str) else config.name
    if name not in TASKS:
        for module in (*BUILTIN, *task_plugins().values()):
            importlib.import_module(module.partition(":")[0])
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    if isinstance(config, str):  # (the registry knows it: no need for the entry-point check)
        config = TaskConfig.model_construct(name=name, chat=False)
    return TASKS[name](config)


def task_of(config: Any) -> Task:
    """`get_task` of a run config's `task` section."""
    return get_task(config.task)

"""The `arith` task: multi-step left-to-right arithmetic whose every step is exactly checkable.

A problem is a start value and a chain of operations, evaluated left to right:

    Compute left to right: 48 + 17 - 29 * 3

Its reference solution has one step per line and ends in a boxed answer:

    48 + 17 = 65
    65 - 29 = 36
    36 * 3 = 108
    \\boxed{108}

A reflection line ("Wait, step 2 is wrong: ...") may stand between steps; it sends the checker
back to the step it names, so reflective solutions are checked too.

Everything here is pure and deterministic: the generator takes a seed, the checker takes text.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from pipeline.config import ArithConfig
from stages.tasks.base import (
    Rejection,
    Step,
    Task,
    extract_boxed,
    line_break,
    register,
    split_steps,
)

__all__ = ["ArithConfig", "ArithProblem", "ArithTask", "extract_boxed", "split_steps"]

PROMPT_TEMPLATE = "Q: {problem}\nA:\n"
CHAT_TEMPLATE = "What is {expression}? Put the final answer in \\boxed{{}}."  # task.chat
PROBLEM_PREFIX = "Compute left to right: "
REFLECTION_PREFIX = "Wait, step "

_STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_REFLECTION_RE = re.compile(r"^\s*Wait, step (\d+) is wrong\b")
_PROBLEM_TOKEN_RE = re.compile(r"-?\d+|[+\-*]")
_CHAT_PROBLEM_RE = re.compile(r"What is ([-+*\d ]+)\?")
_INTEGER_RE = re.compile(r"-?\d+")
_MAX_ANSWER_DIGITS = 40  # a "number" longer than this is garbage, never int()-ed


@dataclass(frozen=True)
class ArithProblem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand) in order

    @property
    def text(self) -> str:
        return PROBLEM_PREFIX + " ".join([str(self.start)] + [f"{o} {b}" for o, b in self.ops])

    @property
    def key(self) -> str:
        """Canonical identity: two problems are the same iff their keys are equal."""
        return self.text

    @property
    def problem_id(self) -> str:
        return "arith-" + hashlib.sha256(self.key.encode()).hexdigest()[:12]

    def values(self) -> list[int]:
        """The running values: start, then the value after each step."""
        out = [self.start]
        for op, b in self.ops:
            out.append(apply(out[-1], op, b))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def step_line(self, k: int) -> str:
        """The correct line for step k (1-based)."""
        values = self.values()
        op, b = self.ops[k - 1]
        return f"{values[k - 1]} {op} {b} = {values[k]}"

    def solution(self) -> str:
        lines = [self.step_line(k) for k in range(1, len(self.ops) + 1)]
        return "\n".join(lines + [f"\\boxed{{{self.answer}}}"])


def apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def parse_problem(text: str) -> ArithProblem:
    """Inverse of ArithProblem.text. Raises ValueError on anything else."""
    if not text.startswith(PROBLEM_PREFIX):
        raise ValueError(f"not an arith problem: {text[:60]!r}")
    tokens = _PROBLEM_TOKEN_RE.findall(text[len(PROBLEM_PREFIX) :])
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise ValueError(f"malformed arith problem: {text[:60]!r}")
    ops = tuple((tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2))
    return ArithProblem(start=int(tokens[0]), ops=ops)


def problem_from_prompt(prompt: str) -> str:
    """The problem inside a prompt rendered with PROMPT_TEMPLATE or, through a chat template,
    with CHAT_TEMPLATE; else the prompt unchanged."""
    head, tail = PROMPT_TEMPLATE.split("{problem}")
    if prompt.startswith(head) and prompt.endswith(tail):
        return prompt[len(head) : len(prompt) - len(tail)]
    m = _CHAT_PROBLEM_RE.search(prompt)
    return PROBLEM_PREFIX + m.group(1).strip() if m else prompt


def chat_prompt(problem: str) -> str:
    """The user turn of `problem` for an instruct model: a plain question ("What is 15 - 5 + 3?";
    with + and - only, left to right is the usual order)."""
    return CHAT_TEMPLATE.format(expression=problem.removeprefix(PROBLEM_PREFIX))


def unboxed_answer(response: str) -> str | None:
    """The last integer of a response, or None: what an instruct model that ends with
    `15 - 5 = 10.` or "The answer is 10." and leaves out the box answered (the "flexible"
    extraction of GSM8K harnesses)."""
    integers = _INTEGER_RE.findall(response)
    return integers[-1] if integers else None


def generate_problem(rng: random.Random, cfg: ArithConfig) -> ArithProblem:
    """Draw one problem; every intermediate value stays in [0, cfg.value_max]."""
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    value = rng.randint(2, cfg.operand_max)
    start, ops = value, []
    for _ in range(n_steps):
        choices = []
        for op in cfg.ops:
            if op == "+" and value + 1 <= cfg.value_max:
                choices.append((op, rng.randint(1, min(cfg.operand_max, cfg.value_max - value))))
            elif op == "-" and value >= 1:
                choices.append((op, rng.randint(1, min(cfg.operand_max, value))))
            elif op == "*" and 2 <= value <= cfg.value_max // 2:
                top = min(cfg.multiplier_max, cfg.value_max // value)
                choices.append((op, rng.randint(2, top)))
        op, b = rng.choice(choices) if choices else ("+", 0)
        ops.append((op, b))
        value = apply(value, op, b)
    return ArithProblem(start=start, ops=tuple(ops))


def split_of(problem: ArithProblem, heldout_buckets: int = 1, pretrain_buckets: int = 5) -> str:
    """Which split a problem belongs to, from a hash of its key (so splits are disjoint by
    construction, whatever the seeds or sizes): of 10 buckets, `heldout_buckets` are held out,
    the next `pretrain_buckets` are the base model's pretraining corpus, the rest are RL/train."""
    bucket = int(hashlib.sha256(problem.key.encode()).hexdigest()[:8], 16) % 10
    if bucket < heldout_buckets:
        return "heldout"
    if bucket < heldout_buckets + pretrain_buckets:
        return "pretrain"
    return "train"


def generate_split(split: str, n: int, seed: int, cfg: ArithConfig) -> list[ArithProblem]:
    """`n` distinct problems of one split, deterministic in (split, n, seed, cfg)."""
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    out: list[ArithProblem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {split!r} problems with {cfg}")
        p = generate_problem(rng, cfg)
        if p.key in seen or split_of(p) != split:
            continue
        seen.add(p.key)
        out.append(p)
    return out


# --- answers and grading --------------------------------------------------------------------


def grade(text: str, reference: str) -> tuple[str, str]:
    """(label, reason): label in correct / incorrect / no_answer (error: the reference is not
    an integer); exact integer comparison."""
    answer = extract_boxed(text)
    if answer is None:
        return "no_answer", "no \\boxed{} in the response"
    return grade_answer(answer, reference)


def grade_answer(answer: str, reference: str) -> tuple[str, str]:
    """`grade` of an extracted answer."""
    if not re.fullmatch(rf"-?\d{{1,{_MAX_ANSWER_DIGITS}}}", answer):
        return "incorrect", f"boxed answer {answer[:40]!r} is not an integer"
    if not re.fullmatch(rf"\s*-?\d{{1,{_MAX_ANSWER_DIGITS}}}\s*", str(reference)):
        return "error", f"reference {str(reference)[:40]!r} is not an integer"
    if int(answer) == int(reference):
        return "correct", "exact match"
    return "incorrect", f"boxed {answer} != reference {reference}"


# --- steps and the exact step checker -------------------------------------------------------


@dataclass(frozen=True)
class StepError:
    step: Step | None  # the first wrong line; None when the text ends before the solution does
    chain_step: int  # which step of the problem's chain was expected there (len(ops)+1: answer)
    expected: str  # the correct line
    found: str  # what stood there ("" when missing)
    char_start: int  # the prefix to keep is text[:char_start]


def first_wrong_step(problem: ArithProblem, text: str) -> StepError | None:
    """The first line of `text` that departs from a correct solution of `problem`, or None if
    `text` is a correct solution. Any text is accepted (garbage gives an error at line 1).

    A line is correct when it equals the expected next step (whitespace aside) or, after the last
    step, the boxed answer. A reflection line "Wait, step k is wrong..." is skipped and sends the
    expectation back to step k, so a corrected continuation after a reflection is checked as well;
    a wrong line directly followed by such a reflection is forgiven (the error it names), a
    reflection on a step not yet reached (k too large) included.
    """
    n = len(problem.ops)
    expected_k = 1  # next chain step expected; n + 1 means the boxed answer
    pending: StepError | None = None  # a wrong line, forgiven if a reflection follows it
    for step in split_steps(text):
        reflection = _REFLECTION_RE.match(step.text)
        if reflection:
            k = int(reflection.group(1)) if len(reflection.group(1)) < 4 else 0
            if 1 <= k <= expected_k:
                expected_k, pending = k, None
                continue
            if pending is not None:
                return pending
            pending = StepError(step, expected_k, expected_line(problem, expected_k), step.text,
                                step.start)  # a reflection on a step not yet reached: wrong
            continue
        if pending is not None:
            return pending
        want = expected_line(problem, expected_k)
        if expected_k > n + 1 or _normalize(step.text) != _normalize(want):
            pending = StepError(step, expected_k, want, step.text, step.start)
            continue
        expected_k += 1
    if pending is not None:
        return pending
    if expected_k <= n + 1:
        return StepError(None, expected_k, expected_line(problem, expected_k), "", len(text))
    return None


def expected_line(problem: ArithProblem, k: int) -> str:
    """The correct line at chain step k: step k, the boxed answer (k = n + 1), or nothing."""
    n = len(problem.ops)
    if k <= n:
        return problem.step_line(k)
    if k == n + 1:
        return f"\\boxed{{{problem.answer}}}"
    return ""  # nothing may follow the boxed answer


def _normalize(line: str) -> str:
    return re.sub(r"\s+", "", line)


def parse_step(line: str) -> tuple[int, str, int, int] | None:
    """(a, op, b, c) of a step line `a op b = c`, or None."""
    m = _STEP_RE.match(line)
    if not m or any(len(g) > _MAX_ANSWER_DIGITS for g in (m.group(1), m.group(3), m.group(4))):
        return None
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


def precedence_solution(problem: ArithProblem) -> str:
    """The problem misread with the usual operator precedence (each run of `*` first, then `+`
    and `-` left to right), written in the task's step format: the misreading a model with a
    conventional prior makes. Equal to `problem.solution()` when no `*` follows a `+` or `-`."""
    terms = [[problem.start]]  # additive terms, each a product chain: [value, factor, ...]
    signs = []
    for op, b in problem.ops:
        if op == "*":
            terms[-1].append(b)
        else:
            signs.append(op)
            terms.append([b])
    if not signs or all(len(t) == 1 for t in terms[1:]):
        return problem.solution()
    lines, values = [], []
    for chain in terms:
        value = chain[0]
        for factor in chain[1:]:
            lines.append(f"{value} * {factor} = {value * factor}")
            value *= factor
        values.append(value)
    total = values[0]
    for op, value in zip(signs, values[1:]):
        lines.append(f"{total} {op} {value} = {apply(total, op, value)}")
        total = apply(total, op, value)
    return "\n".join(lines + [f"\\boxed{{{total}}}"])


def self_corrected(problem: ArithProblem, wrong: str) -> str:
    """`wrong` kept up to and with its first wrong line, then a reflection on it in the first
    wording (first_reflection_line) and the correct steps from there: a solution that catches its
    own error, as the testbed base's pretraining corpus writes it (docs/testbed.md says why it
    keeps the first wording)."""
    error = first_wrong_step(problem, wrong)
    if error is None or error.step is None:
        return wrong
    prefix, _, correction = ArithTask().repair(problem.text, wrong[:error.step.end], error.step,
                                               full=False)
    reflection = first_reflection_line(error.chain_step, error.found, error.expected)
    return prefix + line_break(prefix) + reflection + "\n" + correction


def wrong_solution(problem: ArithProblem, rng: random.Random, kind: str,
                   caught_first: bool = False) -> str:
    """A solution of `problem` with one error of `kind` (error_kind): `misread` is the
    precedence misreading; `slip` and `copy` go wrong at a random step, and the steps after it
    are computed from the wrong value. `caught_first`: a caught misreading comes first (its
    wrong line and the reflection on it), as a model that reflects writes, and the error falls
    in the steps redone after it."""
    if kind == "misread":
        return precedence_solution(problem)
    head, k0 = [], 1
    misread = precedence_solution(problem)
    if caught_first and misread != problem.solution():
        error = first_wrong_step(problem, misread)
        head = [*misread.split("\n")[: error.step.index],
                reflection_line(problem, error.chain_step, error.found, error.expected)]
        k0 = error.chain_step
    values, n = problem.values(), len(problem.ops)
    j = rng.randint(k0, n)
    lines, value = [problem.step_line(i) for i in range(k0, j)], values[j - 1]
    op, b = problem.ops[j - 1]
    delta = rng.choice([d for d in range(-9, 10) if d])
    if kind == "slip":
        wrong = f"{value} {op} {b} = {apply(value, op, b) + delta}"
    elif kind == "copy" and rng.random() < 0.5 and b + delta >= 1:
        wrong = f"{value} {op} {b + delta} = {apply(value, op, b + delta)}"
    elif kind == "copy":
        a = value + delta if value + delta >= 0 else value - delta
        wrong = f"{a} {op} {b} = {apply(a, op, b)}"
    else:
        raise ValueError(f"unknown error kind {kind!r}")
    value = parse_step(wrong)[3]
    lines.append(wrong)
    for op, b in problem.ops[j:]:
        lines.append(f"{value} {op} {b} = {apply(value, op, b)}")
        value = apply(value, op, b)
    return "\n".join(head + lines + [f"\\boxed{{{value}}}"])


def reads_with_precedence(problem: ArithProblem, text: str) -> bool:
    """Whether `text` departs from the left-to-right solution exactly where, and as, the
    precedence misreading does (its first wrong line is the misreading's line there)."""
    misread = precedence_solution(problem)
    error = first_wrong_step(problem, text)
    if misread == problem.solution() or error is None or error.step is None:
        return False
    lines = misread.split("\n")
    return (error.step.index <= len(lines)
            and _normalize(error.found) == _normalize(lines[error.step.index - 1]))


ERROR_KINDS = ("misread", "slip", "copy", "answer", "other")
_VERB = {"+": "adds", "-": "subtracts", "*": "multiplies by"}


def error_kind(problem: ArithProblem, found: str, expected: str) -> str:
    """What kind of error a wrong line `found` is, where `expected` was due (expected_line):
    `misread` (another of the problem's operations done here: out of left-to-right order),
    `slip` (the right operation, a wrong result), `copy` (the running value or the operand
    copied wrong), `answer` (a wrong boxed answer after the last step), `other` (anything else:
    garbage, a wrong operator)."""
    want, got = parse_step(expected), parse_step(found)
    if want is None:
        return "answer" if expected and extract_boxed(found) is not None else "other"
    if got is None:
        return "other"
    (a, op, b, _), (a2, op2, b2, _) = want, got
    if (op2, b2) == (op, b):
        return "slip" if a2 == a else "copy"
    if op2 == op and a2 == a:
        return "copy"  # the operand miscopied
    if (op2, b2) in problem.ops or a2 in [problem.start] + [x for _, x in problem.ops]:
        return "misread"
    return "other"


def diagnosis(problem: ArithProblem, k: int, found: str, expected: str) -> str:
    """What is wrong with line `found` at chain step k and why, by its error_kind:
    misread "left to right, 48 + 17 comes first, not 29 * 3."; slip "65 - 29 is 36, not 46.";
    copy "step 3 starts from 36, the result so far, not 63." or "the problem subtracts 29
    here, not 92."; answer "the answer is the last result, 108, not 180."; other: the right
    line."""
    kind = error_kind(problem, found, expected)
    if kind == "answer":
        return (f"the answer is the last result, {problem.answer}, "
                f"not {extract_boxed(found)[:20]}.")
    if kind == "other":
        return f"it should be {expected}."
    (a, op, b, c), (a2, op2, b2, c2) = parse_step(expected), parse_step(found)
    if kind == "misread":
        return f"left to right, {a} {op} {b} comes first, not {a2} {op2} {b2}."
    if kind == "slip":
        return f"{a} {op} {b} is {c}, not {c2}."
    if a2 != a:
        source = "the problem's start" if k == 1 else "the result so far"
        return f"step {k} starts from {a}, {source}, not {a2}."
    return f"the problem {_VERB[op]} {b} here, not {b2}."


def first_reflection_line(k: int, found: str, expected: str) -> str:
    """The reflection's first wording, "Wait, step k is wrong: 48 + 17 = 65, not 87.": the
    expected line with the found result; the pretraining corpus's self-corrections use it."""
    got, right = parse_step(found), parse_step(expected)
    if got is not None and right is not None:
        a, op, b, c = right
        return f"{REFLECTION_PREFIX}{k} is wrong: {a} {op} {b} = {c}, not {got[3]}."
    return f"{REFLECTION_PREFIX}{k} is wrong: it should be {expected}."


def reflection_line(problem: ArithProblem, k: int, found: str, expected: str) -> str:
    """The reflection on a wrong line at chain step k: "Wait, step k is wrong: " and its
    diagnosis (the rule constructor's; the cold start's and TAPO's trajectories)."""
    return f"{REFLECTION_PREFIX}{k} is wrong: {diagnosis(problem, k, found, expected)}"


# --- the plugin -----------------------------------------------------------------------------


@register
class ArithTask(Task):
    """The testbed task: plain-text prompts, exact integer grading, an exact step checker.
    With `task.chat` (an instruct model): the question in a user turn (chat_prompt), and a
    response without \\boxed{} is answered by its last integer (unboxed_answer)."""

    name = "arith"
    has_step_checker = True
    generated_problems = True
    unique_solutions = True

    def prompt(self, problem: str):
        if self.config.chat:
            return [{"role": "user", "content": chat_prompt(problem)}]
        return PROMPT_TEMPLATE.format(problem=problem)

    def answer(self, response: str) -> str | None:
        boxed = extract_boxed(response)
        if boxed is None and self.config.chat:
            return unboxed_answer(response)
        return boxed

    def problem_from_prompt(self, prompt: str) -> str:
        return problem_from_prompt(prompt)

    def fast_verdict(self, answer: str, reference: str) -> tuple[str, str]:
        return grade_answer(answer, reference)  # always settled: the pool never starts

    def verify(self, answer: str, reference: str) -> tuple[str, str]:
        return grade_answer(answer, reference)

    def difficulty(self, problem: str) -> int:
        return len(parse_problem(problem).ops)

    def locate_failure(self, problem: str, response: str):
        """(failure_step, prefix_chars, detail) by the step checker, or a Rejection."""
        error = first_wrong_step(parse_problem(problem), response)
        if error is None:
            return Rejection("no_error_found", "the step checker finds every step correct")
        step = error.step.index if error.step is not None else len(split_steps(response)) + 1
        detail = json.dumps({"chain_step": error.chain_step, "expected": error.expected,
                             "found": error.found})
        return step, error.char_start, detail

    def step_number(self, problem: str, response: str, line: int) -> int:
        """The chain step due on line `line` when the lines before it are right (a caught
        error and its redone steps included), as the rule path's reflection names it; else
        the line's number."""
        steps = split_steps(response)
        if not 1 <= line <= len(steps):
            return line
        state = first_wrong_step(parse_problem(problem), response[: steps[line - 1].start])
        return state.chain_step if state is not None and state.step is None else line

    def error_kind(self, problem: str, response: str) -> str | None:
        """The error_kind of the response's first wrong line (None: no error; the text ends
        before the solution does: `other`)."""
        parsed = parse_problem(problem)
        error = first_wrong_step(parsed, response)
        return None if error is None else error_kind(parsed, error.found, error.expected)

    def repair(self, problem: str, prefix: str, failed: Step | None, full: bool):
        """(prefix, diagnosis, correction) built exactly, or a Rejection."""
        parsed = parse_problem(problem)
        if full:
            return "", "", parsed.solution()
        before = prefix[: failed.start] if failed is not None else prefix  # without step k
        state = first_wrong_step(parsed, before)
        if state is None:
            return Rejection("prefix_is_complete", "the kept prefix already solves the problem")
        if state.step is not None:
            return Rejection("prefix_has_error", f"step {state.step.index} of the prefix is wrong")
        k, n = state.chain_step, len(parsed.ops)
        expected = expected_line(parsed, k)
        found = failed.text if failed else ""
        diagnosis = line_break(prefix) + reflection_line(parsed, k, found, expected) + "\n"
        correction = "\n".join(expected_line(parsed, j) for j in range(k, n + 2))
        return prefix, diagnosis, correction

"""The grader: a label with a reason for every (response, reference) pair.

    with Grader("math", workers=2, timeout_s=5) as g:
        verdicts = g.grade(responses, references)

Labels: correct, incorrect, no_answer (no \\boxed{}), timeout (the item ran past `timeout_s`),
error (the checker itself failed). The answer is the last \\boxed{}. The task's fast path runs
in this process; the rest goes to worker processes, each item under a hard timeout: a worker
still busy at its deadline is killed and replaced (sympy can hang inside C code, where no signal
reaches it), so hostile input costs `timeout_s`, never the batch.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from stages.tasks import arith
from stages.tasks import math as math_task
from stages.tasks.base import extract_boxed


@dataclass(frozen=True)
class Verdict:
    label: str
    reason: str
    answer: str | None


def fast_grade(task: str, response: str, reference: str) -> Verdict | None:
    """The verdict when it needs no math-verify, else None (the pool decides)."""
    answer = extract_boxed(response)
    if answer is None:
        return Verdict("no_answer", "no \\boxed{} in the response", None)
    if task == "arith":
        label, reason = arith.grade(response, reference)
        return Verdict(label, reason, answer)
    settled = math_task.fast_verdict(answer, reference)
    return Verdict(*settled, answer) if settled else None


def _serve(conn: Connection) -> None:
    """Worker loop: (index, answer, reference) in, (index, label, reason) out."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            index, answer, reference = conn.recv()
        except EOFError:
            return
        try:
            label, reason = math_task.verify_answer(answer, reference)
        except Exception as e:  # the checker failed on this item: say so, keep serving
            label, reason = "error", f"{type(e).__name__}: {str(e)[:200]}"
        conn.send((index, label, reason))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple[int, float] | None = None  # (item index, deadline)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class Grader:
    """Grades with the task's rules; math-verify items run in `workers` processes."""

    def __init__(self, task: str = "math", workers: int = 2, timeout_s: float = 5.0):
        if task not in ("math", "arith"):
            raise ValueError(f"unknown task {task!r}; tasks: math, arith")
        self.task, self.n_workers, self.timeout_s = task, max(1, workers), timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self.restarts = 0

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def grade(self, responses: list[str], references: list[str]) -> list[Verdict]:
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        verdicts: list[Verdict | None] = []
        slow: deque[tuple[int, str, str]] = deque()
        for i, (response, reference) in enumerate(zip(responses, references)):
            verdict = fast_grade(self.task, response, reference)
            verdicts.append(verdict)
            if verdict is None:
                slow.append((i, extract_boxed(response) or "", reference))
        if slow:
            self._run_pool(slow, verdicts, {i: a for i, a, _ in slow})
        return verdicts  # type: ignore[return-value]

    def _run_pool(self, queue, verdicts, answers) -> None:
        while len(self._workers) < min(self.n_workers, len(queue)):
            self._workers.append(_Worker(self._ctx))
        pending = len(queue)
        while pending:
            for w in self._workers:
                if w.job is None and queue:
                    index, answer, reference = queue.popleft()
                    w.conn.send((index, answer, reference))
                    w.job = (index, time.monotonic() + self.timeout_s)
            busy = [w for w in self._workers if w.job is not None]
            next_deadline = min(w.job[1] for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for w in busy:
                index = w.job[0]
                if w.conn in ready:
                    try:
                        _, label, reason = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. out of memory)
                        label, reason = "error", "grader worker died"
                        self._replace(w)
                    verdicts[index] = Verdict(label, reason, answers[index])
                elif time.monotonic() >= w.job[1]:
                    verdicts[index] = Verdict(
                        "timeout", f"grading took over {self.timeout_s:g} s", answers[index])
                    self._replace(w)
                else:
                    continue
                w.job = None
                pending -= 1

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx)
        self.restarts += 1

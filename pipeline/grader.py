"""The grader: a label with a reason for every (response, reference) pair, by a task's checker.

    with Grader(get_task("math"), workers=2, timeout_s=5) as g:
        verdicts = g.grade(responses, references)

Labels: correct, incorrect, no_answer (the checker finds no answer), timeout (the item ran past
`timeout_s`), error (the checker itself failed). The grader knows no task: the checker (a task
plugin, stages/tasks) extracts the answer and settles what it can in this process
(`fast_verdict`); the rest goes to worker processes (`verify`), each item under a hard timeout:
a worker still busy at its deadline is killed and replaced (sympy can hang inside C code,
where no signal reaches it), so hostile input costs `timeout_s`, never the batch. A worker's
clock starts once it is ready (math-verify imported and warmed up, which can take seconds on a
loaded machine); a worker that cannot start within `STARTUP_S` fails the grading (GraderError),
not the items.

A pool of our own rather than pebble's (which also kills a worker at a per-task time-out): on the
same 5,457 items with 2 workers each, both warm (`python -m bench.grader`, 2 cores), ours grades
1,529-1,541 items/s and pebble 1,253-1,268 (1.22x); it sends items in chunks and reads answers
one by one, where pebble pays a round trip per task.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Protocol

READY = "ready"
STARTUP_S = 120.0  # a worker not ready by then is broken, not slow


class GraderError(RuntimeError):
    """The grader pool cannot grade at all (a worker that cannot start)."""


@dataclass(frozen=True)
class Verdict:
    label: str
    reason: str
    answer: str | None


class Checker(Protocol):
    """What the grader needs of a task (stages.tasks.base.Task has it); picklable, since the
    worker processes run its `verify`."""

    def answer(self, response: str) -> str | None: ...

    def fast_verdict(self, answer: str, reference: str) -> tuple[str, str] | None: ...

    def verify(self, answer: str, reference: str) -> tuple[str, str]: ...


def fast_grade(checker: Checker, response: str, reference: str) -> Verdict | None:
    """The verdict when the checker settles it in this process, else None (the pool decides)."""
    answer = checker.answer(response)
    if answer is None:
        return Verdict("no_answer", "no \\boxed{} in the response", None)
    settled = checker.fast_verdict(answer, reference)
    return Verdict(*settled, answer) if settled else None


def _serve(conn: Connection, checker: Checker) -> None:
    """Worker loop: a chunk of (index, answer, reference) in; one (index, label, reason) out
    per item as soon as it is graded, so a hung item is known by its missing answer."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    checker.verify("1", "1")  # imports and warms the checker (math-verify and sympy)
    conn.send(READY)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        for index, answer, reference in chunk:
            try:
                label, reason = checker.verify(answer, reference)
            except Exception as e:  # the checker failed on this item: say so, keep serving
                label, reason = "error", f"{type(e).__name__}: {str(e)[:200]}"
            conn.send((index, label, reason))


class _Worker:
    def __init__(self, ctx, checker: Checker):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, checker), daemon=True)
        self.proc.start()
        child.close()
        self.chunk: deque[tuple[int, str, str]] = deque()  # sent, not yet answered
        self.ready = False  # READY received: its clock may run
        self.deadline = time.monotonic() + STARTUP_S  # to start; then for the chunk's head item

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()


class Grader:
    """Grades with a task's checker; what its fast path leaves runs in `workers` processes."""

    def __init__(self, checker: Checker, workers: int = 2, timeout_s: float = 5.0):
        if not callable(getattr(checker, "verify", None)):
            raise TypeError(f"the grader needs a task (stages.tasks.get_task), not {checker!r}")
        self.checker, self.n_workers, self.timeout_s = checker, max(1, workers), timeout_s
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
            verdict = fast_grade(self.checker, response, reference)
            verdicts.append(verdict)
            if verdict is None:
                slow.append((i, self.checker.answer(response) or "", reference))
        if slow:
            self._run_pool(slow, verdicts, {i: a for i, a, _ in slow})
        return verdicts  # type: ignore[return-value]

    def _run_pool(self, queue: deque, verdicts: list, answers: dict) -> None:
        """Feeds chunks to idle workers; each answer restarts the clock for the next item of
        its chunk. A worker past its deadline is killed: the item it was on is a timeout, the
        rest of its chunk goes back to the queue."""
        while len(self._workers) < min(self.n_workers, len(queue)):
            self._workers.append(_Worker(self._ctx, self.checker))
        chunk_size = max(1, min(32, len(queue) // (4 * len(self._workers))))
        pending = len(queue)
        while pending:
            for w in self._workers:
                if w.ready and not w.chunk and queue:
                    w.chunk.extend(queue.popleft() for _ in range(min(chunk_size, len(queue))))
                    w.conn.send(list(w.chunk))
                    w.deadline = time.monotonic() + self.timeout_s
            waiting = [w for w in self._workers if w.chunk or not w.ready]
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            ready = wait([w.conn for w in waiting], timeout=timeout)
            for w in waiting:
                if w.conn in ready:
                    try:
                        while w.conn.poll():
                            message = w.conn.recv()
                            if message == READY:
                                w.ready = True
                                continue
                            index, label, reason = message
                            w.chunk.popleft()
                            verdicts[index] = Verdict(label, reason, answers[index])
                            pending -= 1
                            w.deadline = time.monotonic() + self.timeout_s
                    except (EOFError, OSError):  # the worker died (e.g. out of memory)
                        if not w.ready:
                            raise GraderError("a grader worker died while starting (importing "
                                              "math-verify)") from None
                        pending -= self._fail_head(w, "error", "grader worker died", verdicts,
                                                   answers, queue)
                elif time.monotonic() >= w.deadline:
                    if not w.ready:
                        raise GraderError(f"a grader worker did not start in {STARTUP_S:g} s")
                    pending -= self._fail_head(w, "timeout",
                                               f"grading took over {self.timeout_s:g} s",
                                               verdicts, answers, queue)

    def _fail_head(self, w: _Worker, label: str, reason: str, verdicts, answers, queue) -> int:
        """The worker's current item gets `label`; its unanswered rest is re-queued; the
        worker is replaced. Returns the number of items settled (1)."""
        index = w.chunk.popleft()[0]
        verdicts[index] = Verdict(label, reason, answers[index])
        queue.extendleft(reversed(w.chunk))
        w.chunk.clear()
        self._replace(w)
        return 1

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.checker)
        self.restarts += 1

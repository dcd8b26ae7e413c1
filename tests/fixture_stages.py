"""Small real stages used by the runner tests (importable by spawned worker processes)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow as pa

from pipeline.stage import Stage, StageOutput

SCHEMA_IN = pa.schema([("id", pa.int64()), ("x", pa.int64())])


class Square(Stage):
    """Keeps rows with x >= 0 as (id, x, y = x * x); drops negative x as `negative`.
    Raises on x == 13 (a "bad row"). Sleeps `SQUARE_SLEEP` seconds per shard if set."""

    name = "square"
    sections = ("run",)
    input_schema = SCHEMA_IN
    output_schema = pa.schema([("id", pa.int64()), ("x", pa.int64()), ("y", pa.int64())])

    def process(self, rows):
        if os.environ.get("SQUARE_SLEEP"):
            time.sleep(float(os.environ["SQUARE_SLEEP"]))
        out = StageOutput()
        for row in rows:
            if row["x"] == 13:
                raise ValueError(f"unlucky row {row['id']}")
            if row["x"] < 0:
                out.drop(row, "negative", f"x={row['x']}")
            else:
                out.keep({**row, "y": row["x"] * row["x"]})
        return out


class Total(Stage):
    """Whole-input stage: one row with the sum of x over every shard."""

    name = "total"
    whole_input = True
    output_schema = pa.schema([("n", pa.int64()), ("sum", pa.int64())])

    def process(self, rows):
        out = StageOutput()
        out.keep({"n": len(rows), "sum": sum(r["x"] for r in rows)})
        return out


class AddSide(Stage):
    """Adds the sum of x over the whole side input `extra` to each row's x."""

    name = "add_side"
    side_inputs = ("extra",)
    input_schema = SCHEMA_IN
    output_schema = SCHEMA_IN

    def process(self, rows):
        total = sum(r["x"] for r in self.side["extra"])
        out = StageOutput()
        for row in rows:
            out.keep({**row, "x": row["x"] + total})
        return out


class GroupSum(Stage):
    """Rows only make sense together (no row-by-row retry); raises on x == 13."""

    name = "group_sum"
    row_fallback = False
    output_schema = SCHEMA_IN

    def process(self, rows):
        if any(r["x"] == 13 for r in rows):
            raise ValueError("unlucky group")
        out = StageOutput()
        out.keep({"id": rows[0]["id"], "x": sum(r["x"] for r in rows)})
        return out


class NeedsModel(Stage):
    """Loads a "model" from the path in `policy.path` on first use, as a generating stage does:
    when it is missing, every row raises the same error."""

    name = "needs_model"
    sections = ("policy",)
    input_schema = SCHEMA_IN
    output_schema = SCHEMA_IN

    def process(self, rows):
        with open(self.config.policy.path) as f:  # raises for every row alike when missing
            f.read()
        out = StageOutput()
        for row in rows:
            out.keep(row)
        return out


class DiesOnce(Square):
    """Square, but the process running it is SIGKILLed the first time, mid-shard (after reading
    its rows, before writing anything): the flag file `policy.path` records that it happened."""

    name = "dies_once"
    sections = ("run", "policy")

    def process(self, rows):
        flag = Path(self.config.policy.path)
        if not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process(rows)


class AlwaysDies(Square):
    """Square whose process is SIGKILLed every time it starts a shard."""

    name = "always_dies"

    def process(self, rows):
        os.kill(os.getpid(), signal.SIGKILL)


# --- a task plugin of our own (the grader's workers import it from here) ---------------------

from stages.tasks.base import Task, register  # noqa: E402


@register
class ParityTask(Task):
    """A task the project does not ship: the answer is "even" or "odd"; the fast path settles
    "even", everything else goes to the grader's worker processes (`verify`)."""

    name = "parity"

    def prompt(self, problem: str) -> str:
        return f"Is {problem} even or odd?\n"

    def fast_verdict(self, answer, reference):
        return ("correct", "fast") if answer == reference == "even" else None

    def verify(self, answer, reference):
        return ("correct" if answer == reference else "incorrect"), f"worker {os.getpid()}"

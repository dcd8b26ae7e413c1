"""Where the testbed's answers go wrong and when they reflect, from graded eval answers.

    python -m bench.reflection_timing EVAL_DIR [EVAL_DIR ...]

EVAL_DIR is a testbed evaluation (`tapo eval ... --bench testbed`: OUT/testbed; `make compare`:
OUT/eval/<run>) with its graded answers in EVAL_DIR/classify. Prints one markdown row per
directory, over all its answers: the share that misread the problem (`*` first,
`arith.reads_with_precedence`), the accuracy of the others, and the share that reflect
("Wait, step k is wrong"), split by what precedes the first reflection: a wrong step (the
reflection has an error to catch) or right steps only (a false alarm), each with the share of
those answers that end correct.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from bench import markdown_table
from pipeline.io import read_pandas
from stages.tasks import arith


def reflection_timing(graded: pd.DataFrame) -> dict[str, float]:
    """The row of one set of graded answers (columns problem, response, label)."""
    counts = {"misread": 0, "read right": 0, "right when read right": 0, "after a wrong step": 0,
              "correct after a wrong step": 0, "after right steps": 0,
              "correct after right steps": 0}
    for problem, response, label in zip(graded["problem"], graded["response"], graded["label"]):
        parsed = arith.parse_problem(problem)
        correct = label == "correct"
        if arith.reads_with_precedence(parsed, response):
            counts["misread"] += 1
        else:
            counts["read right"] += 1
            counts["right when read right"] += correct
        at = response.find(arith.REFLECTION_PREFIX)
        if at < 0:
            continue
        error = arith.first_wrong_step(parsed, response[:at])
        kind = "after a wrong step" if error is not None and error.step is not None \
            else "after right steps"
        counts[kind] += 1
        counts[f"correct {kind}"] += correct
    n = len(graded)
    return {
        "answers": n,
        "misread": counts["misread"] / n,
        "accuracy when read right": counts["right when read right"] / max(counts["read right"], 1),
        "reflect": (counts["after a wrong step"] + counts["after right steps"]) / n,
        "reflect after a wrong step": counts["after a wrong step"] / n,
        "accuracy of those": counts["correct after a wrong step"]
        / max(counts["after a wrong step"], 1),
        "reflect after right steps": counts["after right steps"] / n,
        "accuracy of these": counts["correct after right steps"]
        / max(counts["after right steps"], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", type=Path, nargs="+")
    args = p.parse_args()
    rows = [{"eval": d.name, **reflection_timing(read_pandas(
        d / "classify", columns=["problem", "response", "label"]))} for d in args.eval_dirs]
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

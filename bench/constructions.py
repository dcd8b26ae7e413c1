"""How many of a run's constructed trajectories are real corrections, by the exact checker.

    python -m bench.constructions RUN_DIR [RUN_DIR ...]

RUN_DIR is an iterate run (`tapo iterate`; in a compare: runs/NAME/<variant>-s<seed>) of the
arith task. Over all its rounds: the candidates located, the trajectories it kept (they
grade correct: the paper's check) and, of those, the ones the task's exact step checker accepts
(stages/construct.py `check_exactly`, what `construction.verify=checker` keeps), with the counts
of the two ways it rejects: `wrong_steps` (a right answer reached through a wrong step) and
`wrong_diagnosis` (the diagnosis is not the checker's). One markdown row per run.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from bench import markdown_table
from pipeline.config import load_config
from pipeline.io import read_pandas
from stages.construct import check_exactly
from stages.tasks.base import task_of

CANDIDATE = ["wrong_rollout_id", "problem", "wrong_response", "failure_step", "prefix_chars"]


def construction_row(run_dir: Path) -> dict:
    """The markdown row of one run: counts summed over its rounds (iter_*/locate and
    iter_*/construct)."""
    cfg = load_config(run_dir / "config.yaml")
    task = task_of(cfg)
    if not task.has_step_checker:
        raise ValueError(f"{run_dir}: task {cfg.task.name!r} has no exact step checker")
    full = cfg.construction.mode == "full_reconstruction"
    counts = Counter()
    for round_dir in sorted(run_dir.glob("iter_*")):
        if not (round_dir / "construct").is_dir():
            continue
        located = read_pandas(round_dir / "locate", columns=CANDIDATE).set_index(
            "wrong_rollout_id")
        built = read_pandas(round_dir / "construct")
        counts["rounds"] += 1
        counts["located"] += len(located)
        counts["kept"] += len(built)
        for t in built.itertuples():
            row = located.loc[t.source_rollout_id].to_dict()
            verdict = check_exactly(task, row, (t.prefix, t.diagnosis, t.correction), full)
            counts["checker accepts" if verdict is None else verdict.reason] += 1
    return {"run": str(run_dir), "constructor": cfg.construction.method,
            **{k: counts[k] for k in ("rounds", "located", "kept", "checker accepts",
                                      "wrong_steps", "wrong_diagnosis")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    args = p.parse_args()
    print(markdown_table([construction_row(r) for r in args.runs]))


if __name__ == "__main__":
    main()

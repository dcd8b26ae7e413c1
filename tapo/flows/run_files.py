"""What a run directory holds, read for people: the viewer (`tapo show`), the report (`tapo
report`) and the trackers read the run only through here.

    rounds(run_dir)                    the rounds whose stages are complete (round.json written)
    step_log(run_dir)                  one row per optimizer step of every trained round
    funnel(run_dir, k)                 round k: problems -> rollouts -> ... -> in the shard
    trajectories(run_dir, k, n)        round k's accepted trajectories, in segments
    rejections(run_dir, k)             round k's dropped rows: stage, reason, detail, text

Nothing here writes; a missing round or file is a FileNotFoundError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.completion import is_done
from pipeline.config import load_config
from pipeline.io import read_pandas
from pipeline.layout import TRAIN_LOG, checkpoint_dir, iter_dir, round_summary
from pipeline.stage import EXCLUDED
from stages.tasks import task_of

# (label, stage directory) of the funnel, in pipeline order; a GRPO round has no augmentation.
FUNNEL = [("problems", "problems"), ("rollouts", "sample"), ("graded", "classify"),
          ("candidates", "select"), ("located", "locate"), ("one repair per problem",
                                                            "pick_repair"),
          ("constructed", "construct"), ("training rows", "assemble")]
REJECTING = ["sample", "classify", "select", "locate", "pick_repair", "construct", "assemble"]
DROP_UNITS = {"select": "problems"}  # what a stage's drops count, where it is not its input rows


def rounds(run_dir: str | Path) -> list[int]:
    """1, 2, ... up to the first round without a round.json."""
    out, k = [], 1
    while round_summary(run_dir, k).exists():
        out.append(k)
        k += 1
    return out


def summary(run_dir: str | Path, k: int) -> dict:
    path = round_summary(run_dir, k)
    if not path.exists():
        have = rounds(run_dir)
        raise FileNotFoundError(f"{path}: round {k} has not run (complete rounds: "
                                f"{', '.join(map(str, have)) or 'none'})")
    return json.loads(path.read_text())


def last_round(run_dir: str | Path) -> int:
    have = rounds(run_dir)
    if not have:
        raise FileNotFoundError(f"{run_dir}: no complete round (no iter_KKKK/round.json)")
    return have[-1]


def step_log(run_dir: str | Path) -> pd.DataFrame:
    """Every optimizer step of the rounds trained so far, in order: `round`, `step` (within the
    round), `global_step` (over the run) and the trainer's log columns (loss, clip_fraction,
    entropy, grad_norm, suppressed_share, loss_tokens, lr, seconds)."""
    rows, total = [], 0
    for k in rounds(run_dir):
        model = checkpoint_dir(run_dir, k)
        if not is_done(model):
            break
        for line in (model / TRAIN_LOG).read_text().splitlines():
            total += 1
            rows.append({"round": k, "global_step": total, **json.loads(line)})
    return pd.DataFrame(rows)


@dataclass
class FunnelStep:
    label: str
    stage: str
    rows_in: int
    rows_out: int
    drops: dict[str, int]  # reason -> rows (or `drop_unit`)
    drop_unit: str = "rows"


def funnel(run_dir: str | Path, k: int) -> list[FunnelStep]:
    """Round k's stages in pipeline order with rows in/out and every drop reason. The last
    step counts the shard's rows (of them `summary['augmented']` trajectories)."""
    stats = summary(run_dir, k)["stats"]
    return [FunnelStep(label, stage, s.get("rows_in", 0), s.get("rows_out", 0),
                       {key[len("dropped_"):]: v for key, v in s.items()
                        if key.startswith("dropped_")}, DROP_UNITS.get(stage, "rows"))
            for label, stage in FUNNEL if (s := stats.get(stage)) is not None]


@dataclass
class Trajectory:
    """An accepted trajectory in its segments: `prefix` (the wrong rollout's kept steps, one
    string per line; `failed_line` indexes the located wrong step among them, None when the
    prefix stops before it), `diagnosis`, `correction`, and the correct sibling it drew on."""

    trajectory_id: str
    problem: str
    answer: str
    failure_step: int
    prefix: list[str]
    failed_line: int | None
    diagnosis: str
    correction: str
    reference_id: str
    reference: str
    wrong_response: str  # the whole wrong rollout the prefix is cut from
    locator: str
    mode: str
    error_kind: str | None = None  # of the wrong rollout's first error, when the task tells


def trajectories(run_dir: str | Path, k: int, n: int | None = None) -> list[Trajectory]:
    """The first `n` (all when None) of round k's constructed trajectories."""
    here = iter_dir(run_dir, k)
    summary(run_dir, k)
    if not (here / "construct").is_dir():
        return []  # a GRPO round
    built = read_pandas(here / "construct")
    if n is not None:
        built = built.head(n)
    located = read_pandas(here / "locate", columns=[
        "wrong_rollout_id", "wrong_response", "reference_response", "locator"])
    located = located.drop_duplicates("wrong_rollout_id").set_index("wrong_rollout_id")
    task = task_of(load_config(Path(run_dir) / "config.yaml"))
    out = []
    for row in built.itertuples():
        source = located.loc[row.source_rollout_id]
        lines = row.prefix.splitlines(keepends=True)
        steps = [i for i, line in enumerate(lines) if line.strip()]
        failed = steps[row.failure_step - 1] if 0 < row.failure_step <= len(steps) else None
        out.append(Trajectory(row.trajectory_id, row.problem, row.answer, int(row.failure_step),
                              lines, failed, row.diagnosis, row.correction,
                              row.reference_rollout_id, source.reference_response,
                              source.wrong_response, source.locator, row.mode,
                              task.error_kind(row.problem, source.wrong_response)))
    return out


def rejections(run_dir: str | Path, k: int) -> pd.DataFrame:
    """Round k's dropped rows, stage by stage: `stage`, `reason`, `detail`, `id` (the rollout,
    candidate or trajectory) and `text` (its response)."""
    here = iter_dir(run_dir, k)
    summary(run_dir, k)
    problems = read_pandas(here / "problems", columns=["problem_id", "problem"]).set_index(
        "problem_id")["problem"]
    frames = []
    for stage in REJECTING:
        if not (here / stage / EXCLUDED).is_dir():
            continue
        rows = read_pandas(here / stage / EXCLUDED)
        ident = next(c for c in ("trajectory_id", "wrong_rollout_id", "rollout_id",
                                 "sample_id", "problem_id") if c in rows.columns)
        text = next((c for c in ("response", "wrong_response") if c in rows.columns), None)
        frames.append(pd.DataFrame({
            "stage": stage, "reason": rows["reason"], "detail": rows["detail"],
            "id": rows[ident], "problem": rows["problem_id"].map(problems).fillna(""),
            "text": rows[text] if text else ""}))
    columns = ["stage", "reason", "detail", "id", "problem", "text"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

"""Chains as data: a flow (a round, the cold start, an evaluation) is a list of `Step`s, each a
stage with the step it reads and the steps it reads whole as side inputs, run in order by one
function: `run_chain` over stage directories (pipeline/runner.py), or `run_chain_in_memory`
over rows (the OpenRLHF adapter, which augments each PPO step's rollouts in process).

    runs = run_chain(ROUND, cfg, root=run_dir / "iter_0001")   # root/problems must exist
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.runner import StageResult, run_stage
from pipeline.stage import Stage


@dataclass(frozen=True)
class Step:
    """`stage` reads the rows of step `input` and writes step `out` (a directory under the
    chain's root, or a name in memory); `side` maps the stage's side inputs to steps."""

    out: str
    stage: type[Stage]
    input: str
    side: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepRun:
    result: StageResult
    seconds: float  # measured now (a step already complete takes ~0 s: see result.skipped)


def run_chain(steps: Sequence[Step], cfg: Config, root: str | Path, progress: bool = True,
              until: str | None = None) -> dict[str, StepRun]:
    """Runs the steps in order over directories under `root` (each resumable, a no-op when
    complete), stopping after step `until` when given; returns each step's result and time."""
    root = Path(root)
    runs: dict[str, StepRun] = {}
    for step in steps:
        t = time.time()
        result = run_stage(step.stage, cfg, root / step.input, root / step.out,
                           progress=progress,
                           side={name: root / source for name, source in step.side.items()})
        runs[step.out] = StepRun(result, time.time() - t)
        if step.out == until:
            break
    return runs


def run_chain_in_memory(steps: Sequence[Step], cfg: Config,
                        inputs: Mapping[str, list[dict[str, Any]]],
                        stages: dict[str, Stage] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The same steps over rows held in memory: `inputs` names the rows the first steps read;
    returns every step's kept rows by name (with the inputs). A step whose input is empty
    gives no rows. `stages` keeps the built stages (and so their engines) from one call to the
    next; without it they are built and closed here."""
    rows = dict(inputs)
    built = stages if stages is not None else {}
    try:
        for step in steps:
            if not rows[step.input]:
                rows[step.out] = []
                continue
            if step.out not in built:
                built[step.out] = step.stage(cfg)
            stage = built[step.out]
            stage.side.update({name: rows[source] for name, source in step.side.items()})
            rows[step.out] = stage.process(rows[step.input]).rows
    finally:
        if stages is None:
            for stage in built.values():
                stage.close()
    return rows

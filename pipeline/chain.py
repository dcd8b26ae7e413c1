"""Chains as data: a flow (a round, the cold start, an evaluation) is a list of `Link`s, each a
stage with the link it reads and the links it reads whole as side inputs, run in order by one
function: `run_chain` over stage directories (pipeline/runner.py), or `run_chain_in_memory`
over rows (the OpenRLHF adapter, which augments each PPO link's rollouts in process).

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
class Link:
    """`stage` reads the rows of link `input` and writes link `out` (a directory under the
    chain's root, or a name in memory); `side` maps the stage's side inputs to links."""

    out: str
    stage: type[Stage]
    input: str
    side: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LinkRun:
    result: StageResult
    seconds: float  # measured now (a link already complete takes ~0 s: see result.skipped)


def run_chain(links: Sequence[Link], cfg: Config, root: str | Path, progress: bool = True,
              until: str | None = None) -> dict[str, LinkRun]:
    """Runs the links in order over directories under `root` (each resumable, a no-op when
    complete), stopping after link `until` when given; returns each link's result and time."""
    root = Path(root)
    runs: dict[str, LinkRun] = {}
    for link in links:
        t = time.time()
        result = run_stage(link.stage, cfg, root / link.input, root / link.out,
                           progress=progress,
                           side={name: root / source for name, source in link.side.items()})
        runs[link.out] = LinkRun(result, time.time() - t)
        if link.out == until:
            break
    return runs


def run_chain_in_memory(links: Sequence[Link], cfg: Config,
                        inputs: Mapping[str, list[dict[str, Any]]],
                        stages: dict[str, Stage] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The same links over rows held in memory: `inputs` names the rows the first links read;
    returns every link's kept rows by name (with the inputs). A link whose input is empty
    gives no rows. `stages` keeps the built stages (and so their engines) from one call to the
    next; without it they are built and closed here."""
    rows = dict(inputs)
    built = stages if stages is not None else {}
    try:
        for link in links:
            if not rows[link.input]:
                rows[link.out] = []
                continue
            if link.out not in built:
                built[link.out] = link.stage(cfg)
            stage = built[link.out]
            stage.side.update({name: rows[source] for name, source in link.side.items()})
            rows[link.out] = stage.process(rows[link.input]).rows
    finally:
        if stages is None:
            for stage in built.values():
                stage.close()
    return rows

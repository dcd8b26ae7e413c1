"""The stage runner: applies a Stage (pipeline/stage.py) to every shard of an input directory,
its pending shards run by the executor `runner.executor` names (pipeline/executors.py).

The output directory's layout is pipeline/stage.py's (a dataset of its kept rows, metadata and
excluded rows under `__`-prefixed directories); stages never open files.

A stage may also read whole *side inputs* (complete stage directories named in its
`side_inputs`, e.g. assemble reads the constructed trajectories beside the rollouts it
processes shard by shard); their files enter the fingerprint like the main input's.

A row that raises is dropped as `error` (the row-by-row fallback), but a failure that is not the
row's fails the stage (`StageFailed`: no manifest, the first error in the message): a shard
whose rows (two or more) all raise the same error (a model that cannot load, a pool that cannot
start), or a stage whose `error` drops pass `runner.max_error_share` of its input rows.

A killed run resumes at shard granularity: shards with a marker of the current fingerprint are
kept, the rest are recomputed and their part files replaced atomically, so no row is lost or
duplicated. A complete directory with the same fingerprint is a no-op; a changed config section
or input file changes the fingerprint, and the directory is rebuilt.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.config import Config, section_fingerprint
from pipeline.executors import executor_for
from pipeline.io import list_parts, part_name
from pipeline.stage import (
    ERROR_REASON,
    EXCLUDED,
    LEGACY,
    MARKERS,
    META,
    STATS,
    SUCCESS,
    Stage,
    StageFailed,
    StageJob,
    is_complete,
    stage_ref,
)
from pipeline.util import (
    file_sha256,
    fingerprint,
    git_commit,
    package_versions,
    read_json,
    write_json_atomic,
)


@dataclass(frozen=True)
class StageResult:
    out_dir: Path
    skipped: bool  # True when the directory was already complete
    stats: dict[str, int]


def stage_fingerprint(stage_cls: type[Stage], config: Config, input_hashes: dict[str, str],
                      side_hashes: dict[str, dict[str, str]]) -> str:
    """What a stage directory's rows depend on: the stage and its version, the config sections
    it reads (`sections`), its input and side-input files, and the models it runs."""
    return fingerprint(
        {
            "stage": stage_ref(stage_cls),
            "version": stage_cls.version,
            "config": section_fingerprint(config, stage_cls.sections),
            "inputs": input_hashes,
            **({"side": side_hashes} if side_hashes else {}),
            **({"models": models} if (models := stage_cls.models_state(config)) else {}),
        }
    )


def run_stage(
    stage_cls: type[Stage],
    config: Config,
    in_dir: str | Path,
    out_dir: str | Path,
    workers: int | None = None,
    progress: bool = True,
    side: Mapping[str, str | Path] | None = None,
) -> StageResult:
    """Runs `stage_cls` over every shard of `in_dir` into `out_dir`; see the module docstring.
    `side` maps names of the stage's `side_inputs` to complete stage directories."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    inputs = list_parts(in_dir)
    if not inputs:
        raise FileNotFoundError(f"{in_dir} has no part-*.parquet shards to process")
    side_dirs = _check_side(stage_cls, side or {})
    input_hashes = {p.name: file_sha256(p) for p in inputs}
    side_hashes = {name: {p.name: file_sha256(p) for p in list_parts(d)}
                   for name, d in side_dirs.items()}
    fp = stage_fingerprint(stage_cls, config, input_hashes, side_hashes)
    manifest = read_json(out_dir / SUCCESS)
    if manifest is not None and manifest.get("fingerprint") == fp:
        return StageResult(out_dir, True, read_json(out_dir / STATS) or {})
    _prepare(out_dir, fp)

    units = [[p] for p in inputs] if not stage_cls.whole_input else [inputs]
    pending = [i for i in range(len(units)) if not _marker_ok(out_dir, i, fp)]
    workers = max(1, min(workers or config.runner.workers, len(pending) or 1))
    bar = tqdm(total=len(units), initial=len(units) - len(pending), unit="shard",
               desc=stage_cls.name, disable=not progress)
    if pending:
        job = StageJob(stage_cls, config, side_dirs, units, out_dir, fp)
        executor_for(config, workers).run(job, pending, on_done=bar.update)
    bar.close()

    stats = _aggregate(out_dir, len(units), fp)
    write_json_atomic(out_dir / STATS, stats)
    _check_error_share(stage_cls.name, out_dir, stats, config.runner.max_error_share)
    write_json_atomic(
        out_dir / SUCCESS,
        {
            "stage": stage_cls.name,
            "stage_ref": stage_ref(stage_cls),
            "version": stage_cls.version,
            "fingerprint": fp,
            "config": {s: config.section(s).model_dump(mode="json") for s in stage_cls.sections},
            "input_dir": str(in_dir),
            "inputs": input_hashes,
            "side_inputs": {name: str(d) for name, d in side_dirs.items()},
            "rows": stats,
            "executor": config.runner.executor,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return StageResult(out_dir, False, stats)


# --- internals ----------------------------------------------------------------------------


def _check_side(stage_cls: type[Stage], side: Mapping[str, str | Path]) -> dict[str, Path]:
    unknown = set(side) - set(stage_cls.side_inputs)
    if unknown:
        raise ValueError(f"stage {stage_cls.name!r} has no side input {sorted(unknown)}; "
                         f"its side inputs: {', '.join(stage_cls.side_inputs) or '(none)'}")
    for name, d in side.items():
        if not is_complete(d):
            raise FileNotFoundError(f"side input {name!r}: {d} is not a complete stage directory "
                                    f"(no {SUCCESS})")
    return {name: Path(d) for name, d in sorted(side.items())}


def _prepare(out_dir: Path, fp: str) -> None:
    """Removes temp files, the files of the layout before (LEGACY), and every output of a
    different fingerprint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    legacy = any((out_dir / name).exists() for name in LEGACY)
    stale = legacy or read_json(out_dir / SUCCESS) is not None or any(
        (read_json(m) or {}).get("fingerprint") != fp for m in (out_dir / MARKERS).glob("*.json")
    )
    for tmp in list(out_dir.glob(".*.tmp")) + list(out_dir.glob(f"{EXCLUDED}/.*.tmp")):
        tmp.unlink()
    if stale:
        for sub in (META, EXCLUDED, *LEGACY):
            path = out_dir / sub
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for part in out_dir.glob("part-*.parquet"):
            part.unlink()


def _marker_ok(out_dir: Path, index: int, fp: str) -> bool:
    marker = read_json(out_dir / MARKERS / f"{part_name(index)}.json")
    return (
        marker is not None
        and marker.get("fingerprint") == fp
        and (out_dir / part_name(index)).exists()
    )


def _check_error_share(stage: str, out_dir: Path, stats: dict[str, int], limit: float) -> None:
    """StageFailed when the rows dropped as `error` pass `limit` of the rows in."""
    errors = stats.get(f"dropped_{ERROR_REASON}", 0)
    if errors and errors > limit * max(stats["rows_in"], 1):
        detail = next(row["detail"] for part in list_parts(out_dir / EXCLUDED)
                      for row in pq.read_table(part, columns=["reason", "detail"]).to_pylist()
                      if row["reason"] == ERROR_REASON)
        raise StageFailed(f"stage {stage!r}: {errors} of {stats['rows_in']} rows raised errors, "
                          f"more than runner.max_error_share = {limit}; the first: {detail} "
                          f"(all in {out_dir / EXCLUDED})")


def _aggregate(out_dir: Path, n_units: int, fp: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for i in range(n_units):
        marker = read_json(out_dir / MARKERS / f"{part_name(i)}.json")
        if marker is None or marker.get("fingerprint") != fp:
            raise RuntimeError(f"{out_dir}: shard {i} has no marker after the run")
        total.update({k: v for k, v in marker.items() if k != "fingerprint"})
    return {"rows_in": total.pop("rows_in", 0), "rows_out": total.pop("rows_out", 0),
            **dict(sorted(total.items()))}

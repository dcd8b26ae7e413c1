"""The stage runner: applies a Stage to every shard of an input directory.

Output directory layout (all written by this module; stages never open files):

    part-NNNNN.parquet        kept rows of input shard NNNNN (atomic rename)
    excluded/part-NNNNN.parquet  dropped rows with `reason` and `detail` columns
    _shards/part-NNNNN.json   per-shard marker (fingerprint, counts), written after both parts
    stats.json                rows_in, rows_out, dropped_<reason> over all shards
    _SUCCESS                  manifest, written last: the directory is complete

A stage may also read whole *side inputs* (complete stage directories named in its
`side_inputs`, e.g. assemble reads the constructed trajectories beside the rollouts it
processes shard by shard); their files enter the fingerprint like the main input's.

A row that raises is dropped as `error` (the row-by-row fallback), but a failure that is not the
row's fails the stage (`StageFailed`: no `_SUCCESS`, the first error in the message): a shard
whose rows (two or more) all raise the same error (a model that cannot load, a pool that cannot
start), or a stage whose `error` drops pass `runner.max_error_share` of its input rows.

A killed run resumes at shard granularity: shards with a marker of the current fingerprint are
kept, the rest are recomputed and their part files replaced atomically, so no row is lost or
duplicated. A complete directory with the same fingerprint is a no-op; a changed config section
or input file changes the fingerprint, and the directory is rebuilt.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.config import Config, section_fingerprint
from pipeline.io import check_schema, list_parts, part_name, write_table_atomic
from pipeline.util import file_sha256, fingerprint, git_commit, package_versions, write_json_atomic

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
STATS = "stats.json"
MARKERS = "_shards"
EXCLUDED = "excluded"
ERROR_REASON = "error"


class StageFailed(RuntimeError):
    """A stage that cannot produce its output: a systemic error, not a bad row."""


@dataclass
class StageOutput:
    """What `Stage.process` returns: kept rows and dropped rows with their reasons."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)

    def keep(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def drop(self, row: dict[str, Any], reason: str, detail: str = "") -> None:
        self.dropped.append({**row, "reason": reason, "detail": detail})

    def extend(self, other: StageOutput) -> None:
        self.rows.extend(other.rows)
        self.dropped.extend(other.dropped)


class Stage:
    """Base class of a stage: a pure transform over rows (lists of dicts).

    Subclasses set `name`, `version` (bump when the transform's output changes), `sections`
    (config sections read; they enter the fingerprint), `output_schema`, optionally
    `input_schema`, and implement `process`. `whole_input = True` gives `process` every input
    row at once (for stages that rank or budget across shards) and writes one output shard.
    `side_inputs` names extra inputs, read whole into `self.side[name]` (a list of rows; empty
    when the run gives none). `close()` releases what the stage opened (engines, pools).
    `row_fallback = False` is for stages whose rows only make sense together (groups): a batch
    that raises then fails the stage instead of being retried row by row. A stage that generates
    overrides `models_state`.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    sections: ClassVar[tuple[str, ...]] = ()
    input_schema: ClassVar[pa.Schema | None] = None
    output_schema: ClassVar[pa.Schema]
    whole_input: ClassVar[bool] = False
    side_inputs: ClassVar[tuple[str, ...]] = ()
    row_fallback: ClassVar[bool] = True

    def __init__(self, config: Config):
        self.config = config
        self.side: dict[str, list[dict[str, Any]]] = {name: [] for name in self.side_inputs}

    def process(self, rows: list[dict[str, Any]]) -> StageOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Releases resources; the runner calls it once the stage is done."""

    @classmethod
    def models_state(cls, config: Config) -> dict[str, Any]:
        """What identifies the models the stage runs (enters the fingerprint, so a model
        retrained at the same path re-runs the stage); none by default."""
        return {}

    @classmethod
    def runs_model(cls, config: Config) -> bool:
        """Whether the stage generates with a model under `config` (on Ray its workers then ask
        for `runner.gpus_per_worker` GPUs)."""
        return bool(cls.models_state(config))


def stage_ref(stage_cls: type[Stage]) -> str:
    return f"{stage_cls.__module__}:{stage_cls.__qualname__}"


def load_stage_class(ref: str, registry: Mapping[str, str] | None = None) -> type[Stage]:
    """`package.module:ClassName`, or a name of `registry` (name -> `module:Class`, e.g.
    stages.REGISTRY)."""
    if ":" not in ref:
        registry = registry or {}
        if ref not in registry:
            known = ", ".join(sorted(registry)) or "(none given)"
            raise KeyError(f"unknown stage {ref!r}; registered stages: {known}")
        ref = registry[ref]
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Stage)):
        raise TypeError(f"{ref} is not a Stage subclass")
    return obj


@dataclass(frozen=True)
class StageResult:
    out_dir: Path
    skipped: bool  # True when the directory was already complete
    stats: dict[str, int]


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
    fp = fingerprint(
        {
            "stage": stage_ref(stage_cls),
            "version": stage_cls.version,
            "config": section_fingerprint(config, stage_cls.sections),
            "inputs": input_hashes,
            **({"side": side_hashes} if side_hashes else {}),
            **({"models": models} if (models := stage_cls.models_state(config)) else {}),
        }
    )
    manifest = _read_json(out_dir / SUCCESS)
    if manifest is not None and manifest.get("fingerprint") == fp:
        return StageResult(out_dir, True, _read_json(out_dir / STATS) or {})
    _prepare(out_dir, fp)

    units = [[p] for p in inputs] if not stage_cls.whole_input else [inputs]
    pending = [i for i in range(len(units)) if not _marker_ok(out_dir, i, fp)]
    workers = max(1, min(workers or config.runner.workers, len(pending) or 1))
    bar = tqdm(total=len(units), initial=len(units) - len(pending), unit="shard",
               desc=stage_cls.name, disable=not progress)
    if pending and config.runner.executor == "ray":
        from pipeline.ray_executor import run_units

        run_units(stage_cls, config, side_dirs, [(units[i], i) for i in pending], out_dir, fp,
                  workers, on_done=bar.update)
    elif workers == 1 and pending:  # (a stage may load a model: only build it when needed)
        stage = _make_stage(stage_cls, config, side_dirs)
        try:
            for i in pending:
                _process_unit(stage, units[i], out_dir, i, fp)
                bar.update()
        finally:
            stage.close()
    elif pending:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker,
            initargs=(stage_ref(stage_cls), config.model_dump(mode="json"), side_dirs),
        ) as pool:
            futures = [pool.submit(_worker_unit, units[i], out_dir, i, fp) for i in pending]
            for future in as_completed(futures):
                future.result()
                bar.update()
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
        if not (Path(d) / SUCCESS).exists():
            raise FileNotFoundError(f"side input {name!r}: {d} is not a complete stage directory "
                                    f"(no {SUCCESS})")
    return {name: Path(d) for name, d in sorted(side.items())}


def _make_stage(stage_cls: type[Stage], config: Config, side_dirs: dict[str, Path]) -> Stage:
    stage = stage_cls(config)
    for name, d in side_dirs.items():
        stage.side[name] = [row for p in list_parts(d) for row in pq.read_table(p).to_pylist()]
    return stage


def _prepare(out_dir: Path, fp: str) -> None:
    """Removes temp files, and every output of a different fingerprint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = _read_json(out_dir / SUCCESS) is not None or any(
        (_read_json(m) or {}).get("fingerprint") != fp for m in (out_dir / MARKERS).glob("*.json")
    )
    for tmp in list(out_dir.glob(".*.tmp")) + list(out_dir.glob(f"{EXCLUDED}/.*.tmp")):
        tmp.unlink()
    if stale:
        for name in (SUCCESS, STATS):
            (out_dir / name).unlink(missing_ok=True)
        for sub in (MARKERS, EXCLUDED):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        for part in out_dir.glob("part-*.parquet"):
            part.unlink()


def _marker_ok(out_dir: Path, index: int, fp: str) -> bool:
    marker = _read_json(out_dir / MARKERS / f"{part_name(index)}.json")
    return (
        marker is not None
        and marker.get("fingerprint") == fp
        and (out_dir / part_name(index)).exists()
    )


_WORKER_STAGE: Stage | None = None


def _init_worker(ref: str, config: dict[str, Any], side_dirs: dict[str, Path]) -> None:
    global _WORKER_STAGE
    _WORKER_STAGE = _make_stage(load_stage_class(ref), Config.model_validate(config), side_dirs)


def _worker_unit(paths: list[Path], out_dir: Path, index: int, fp: str) -> None:
    assert _WORKER_STAGE is not None
    _process_unit(_WORKER_STAGE, paths, out_dir, index, fp)


def _process_unit(stage: Stage, paths: list[Path], out_dir: Path, index: int, fp: str) -> None:
    """Reads input shard(s), processes them, writes part + excluded + marker (in that order)."""
    tables = [pq.read_table(p) for p in paths]
    if stage.input_schema is not None:
        for path, table in zip(paths, tables, strict=True):
            check_schema(table.schema, stage.input_schema, where=f"{stage.name} input {path}")
    rows = [row for t in tables for row in t.to_pylist()]
    out = _safe_process(stage, rows)
    kept = _to_table(out.rows, stage.output_schema, stage.name)
    write_table_atomic(kept, out_dir / part_name(index))
    excluded = out_dir / EXCLUDED / part_name(index)
    if out.dropped:
        write_table_atomic(pa.Table.from_pylist(out.dropped), excluded)
    else:
        excluded.unlink(missing_ok=True)
    counts = Counter(f"dropped_{row['reason']}" for row in out.dropped)
    write_json_atomic(
        out_dir / MARKERS / f"{part_name(index)}.json",
        {"fingerprint": fp, "rows_in": len(rows), "rows_out": len(out.rows), **counts},
    )


def _safe_process(stage: Stage, rows: list[dict[str, Any]]) -> StageOutput:
    """`stage.process(rows)`; if it raises, each row alone, and a row that still raises is
    dropped with reason `error` (the exception in `detail`) instead of failing the shard.
    When every row (two or more) raises the same error, the error is not the rows': StageFailed.
    """
    try:
        return stage.process(rows)
    except Exception as e:
        if not rows or not stage.row_fallback:
            raise
        if len(rows) == 1:
            return _drop_error(rows[0], e)
        log.warning("%s: a batch of %d rows raised (%s); retrying row by row",
                    stage.name, len(rows), _describe(e))
    out = StageOutput()
    errors: list[Exception] = []
    for row in rows:
        try:
            out.extend(stage.process([row]))
        except Exception as e:  # a bad row is a counted rejection, not a crash
            errors.append(e)
            out.extend(_drop_error(row, e))
    if len(errors) == len(rows) and len({_describe(e) for e in errors}) == 1:
        raise StageFailed(f"stage {stage.name!r}: all {len(rows)} rows of a shard raised the "
                          f"same error, which is not theirs: {_describe(errors[0])}") from errors[0]
    return out


def _describe(error: Exception) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def _drop_error(row: dict[str, Any], error: Exception) -> StageOutput:
    out = StageOutput()
    out.drop(row, ERROR_REASON, _describe(error)[:2000])
    return out


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


def _to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema, stage: str) -> pa.Table:
    rows = list(rows)
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise TypeError(f"stage {stage!r} produced rows that do not fit its schema: {e}") from e


def _aggregate(out_dir: Path, n_units: int, fp: str) -> dict[str, int]:
    total: Counter[str] = Counter()
    for i in range(n_units):
        marker = _read_json(out_dir / MARKERS / f"{part_name(i)}.json")
        if marker is None or marker.get("fingerprint") != fp:
            raise RuntimeError(f"{out_dir}: shard {i} has no marker after the run")
        total.update({k: v for k, v in marker.items() if k != "fingerprint"})
    return {"rows_in": total.pop("rows_in", 0), "rows_out": total.pop("rows_out", 0),
            **dict(sorted(total.items()))}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

"""A stage: the contract every stage implements, and the processing of one unit of its input
(a shard, or every shard of a whole-input stage) into the stage directory.

    class MyStage(Stage): name = "my_stage"; output_schema = ...; def process(self, rows): ...
    stage = make_stage(MyStage, config, side_dirs)
    process_unit(stage, input_paths, out_dir, index, fingerprint)

A stage directory reads as a dataset: `pandas.read_parquet(DIR)` and `datasets.load_dataset(
"parquet", data_dir=DIR)` give exactly its kept rows, as both skip `__`-prefixed directories:

    part-NNNNN.parquet              kept rows of input shard NNNNN
    __excluded/part-NNNNN.parquet   dropped rows with `reason` and `detail` columns
    __stage/shards/part-NNNNN.json  a unit's marker (fingerprint, counts)
    __stage/stats.json              rows_in, rows_out, dropped_<reason> over all shards
    __stage/SUCCESS.json            the manifest, written last: the directory is complete

A unit writes, in this order (each file atomically): its kept rows, its dropped rows, then its
marker: a unit with a marker of the current fingerprint is complete. The runner (pipeline/
runner.py) plans which units run and finishes the directory; an executor (pipeline/
executors.py) runs them.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.io import check_schema, list_parts, part_name, write_table_atomic
from pipeline.util import write_json_atomic

log = logging.getLogger(__name__)

META = "__stage"  # the directory's metadata
SUCCESS = f"{META}/SUCCESS.json"
STATS = f"{META}/stats.json"
MARKERS = f"{META}/shards"
EXCLUDED = "__excluded"
LEGACY = ("_SUCCESS", "stats.json", "_shards", "excluded")  # the layout before: removed
ERROR_REASON = "error"


def is_complete(directory: str | Path) -> bool:
    """Whether `directory` is a complete stage directory (its manifest written)."""
    return (Path(directory) / SUCCESS).exists()


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
class StageJob:
    """One stage run: what any executor needs to process its units."""

    stage_cls: type[Stage]
    config: Config
    side_dirs: dict[str, Path]
    units: list[list[Path]]  # unit i: its input parts; it writes part i
    out_dir: Path
    fingerprint: str


def make_stage(stage_cls: type[Stage], config: Config, side_dirs: dict[str, Path]) -> Stage:
    stage = stage_cls(config)
    for name, d in side_dirs.items():
        stage.side[name] = [row for p in list_parts(d) for row in pq.read_table(p).to_pylist()]
    return stage


def process_unit(stage: Stage, paths: list[Path], out_dir: Path, index: int, fp: str) -> None:
    """Reads input shard(s), processes them, writes part + excluded + marker (in that order)."""
    tables = [pq.read_table(p) for p in paths]
    if stage.input_schema is not None:
        for path, table in zip(paths, tables, strict=True):
            check_schema(table.schema, stage.input_schema, where=f"{stage.name} input {path}")
    rows = [row for t in tables for row in t.to_pylist()]
    out = safe_process(stage, rows)
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


def safe_process(stage: Stage, rows: list[dict[str, Any]]) -> StageOutput:
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


def _to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema, stage: str) -> pa.Table:
    rows = list(rows)
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
        raise TypeError(f"stage {stage!r} produced rows that do not fit its schema: {e}") from e

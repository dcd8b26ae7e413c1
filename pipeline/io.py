"""Parquet shard I/O: the only place that reads or writes stage data.

A stage directory holds `part-NNNNN.parquet` shards, each written atomically (temp file in the
same directory, fsync, rename): a crash never leaves a partial part file behind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

PART_RE = re.compile(r"^part-(\d{5})\.parquet$")


class SchemaError(ValueError):
    """A table lacks a required column or has one of the wrong type."""


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def list_parts(directory: str | Path) -> list[Path]:
    """The part files of a stage directory, sorted by index."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no such stage directory: {directory}")
    return sorted(p for p in directory.iterdir() if PART_RE.match(p.name))


def to_table(data: pa.Table | pd.DataFrame, schema: pa.Schema | None = None) -> pa.Table:
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, schema=schema, preserve_index=False)
    return data.cast(schema) if schema is not None and data.schema != schema else data


def write_table_atomic(
    data: pa.Table | pd.DataFrame, path: str | Path, schema: pa.Schema | None = None
) -> Path:
    """Writes one parquet file atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = to_table(data, schema)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_table(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of a stage directory as one Arrow table (an empty dir raises)."""
    parts = list_parts(directory)
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet shards in {directory}")
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts],
                            promote_options="default")


def read_pandas(directory: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    return read_table(directory, columns).to_pandas()


def iter_batches(directory: str | Path, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Record batches over every shard, in shard order."""
    for part in list_parts(directory):
        yield from pq.ParquetFile(part).iter_batches(batch_size=batch_size)


def _same_type(found: pa.DataType, want: pa.DataType) -> bool:
    """Equal types, counting string and large_string (what pandas writes) as one."""
    strings = (pa.string(), pa.large_string())
    return found.equals(want) or (found in strings and want in strings)


def check_schema(schema: pa.Schema, required: pa.Schema, where: str = "") -> None:
    """Raises SchemaError naming every missing column and every type mismatch."""
    problems = []
    for field in required:
        if field.name not in schema.names:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif not _same_type(schema.field(field.name).type, field.type):
            problems.append(
                f"column {field.name!r} is {schema.field(field.name).type}, expected {field.type}"
            )
    if problems:
        raise SchemaError(
            f"{where or 'table'}: " + "; ".join(problems) + f" (has: {', '.join(schema.names)})"
        )

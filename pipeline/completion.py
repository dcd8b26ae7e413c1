"""Completion of a directory that is not a stage directory (a checkpoint, a cold-start model, the
testbed base): its marker `_SUCCESS`, written last, holds the fingerprint of the inputs that made
it and what the step reports. A directory whose marker holds the current fingerprint is done.

    record = completed(directory, fp)          # the marker's record when done for fp, else None
    mark_complete(directory, fp, metrics=...)  # the marker, atomically, after every output

(A stage directory's manifest is pipeline/stage.py's `SUCCESS`, under `__stage/`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.util import read_json, write_json_atomic

DONE = "_SUCCESS"


def completed(directory: str | Path, fp: str) -> dict[str, Any] | None:
    """The marker's record when `directory` is complete for the fingerprint `fp`, else None."""
    record = read_json(Path(directory) / DONE)
    return record if isinstance(record, dict) and record.get("fingerprint") == fp else None


def is_done(directory: str | Path) -> bool:
    """Whether `directory` has its marker (for any fingerprint)."""
    return (Path(directory) / DONE).exists()


def mark_complete(directory: str | Path, fp: str, **record: Any) -> None:
    """Writes the marker (`fingerprint` and `record`): call it after every other output."""
    write_json_atomic(Path(directory) / DONE, {"fingerprint": fp, **record})

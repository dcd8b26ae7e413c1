"""Completion of a directory that is not a stage directory (a checkpoint, a cold-start model, the
testbed base): its marker `_SUCCESS`, written last, holds the fingerprint of the inputs that made
it and what the step reports. A directory whose marker holds the current fingerprint is done.

    record = completed(directory, fp)          # the marker's record when done for fp, else None
    mark_complete(directory, fp, metrics=...)  # the marker, atomically, after every output

A step that writes a whole directory writes it in a staging directory beside it and publishes
it by one rename, so a killed step leaves no half output:

    tmp = staging_dir(out_dir, fp, resume=True)   # `.NAME.tmp`, kept when started for fp
    ...                                           # write everything into tmp
    publish(tmp, out_dir, fp, metrics=...)        # marker, then tmp renamed to out_dir

(A stage directory's manifest is pipeline/stage.py's `SUCCESS`, under `__stage/`.)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.util import read_json, write_json_atomic

DONE = "_SUCCESS"
STAGED_FOR = ".fingerprint"  # in a staging directory: the inputs it was started for


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


def staging_dir(out_dir: str | Path, fp: str, resume: bool = False) -> Path:
    """The directory a step writes `out_dir` in (`.NAME.tmp` beside it): emptied, unless
    `resume` and it was started for the same fingerprint (a step that resumes from its own
    state there)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if not (resume and (read_json(tmp / STAGED_FOR) or {}).get("fingerprint") == fp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_json_atomic(tmp / STAGED_FOR, {"fingerprint": fp})
    return tmp


def publish(tmp: Path, out_dir: str | Path, fp: str, **record: Any) -> None:
    """Marks the staging directory complete and puts it in `out_dir`'s place (one rename)."""
    (tmp / STAGED_FOR).unlink(missing_ok=True)
    mark_complete(tmp, fp, **record)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)

"""Problem files: read (parquet or JSON Lines, bad rows rejected with their line) and written
as a stage directory of shards that the first stage of a chain reads.

    table, rejected = load_problems("data/aime2024.jsonl")
    stats = write_problems(pool, run_dir / "iter_0001" / "problems", start=0, count=64, seed=0,
                           shard_size=32)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.io import part_name, write_table_atomic
from pipeline.stage import EXCLUDED, LEGACY, META, STATS, SUCCESS
from pipeline.util import file_sha256, fingerprint, write_json_atomic


def load_problems(path: str | Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """(problems, rejected) from parquet or JSON Lines (`id` is read as `problem_id`). A problem
    needs `problem_id`, `problem` (non-empty text) and `answer` (made text); other columns
    (`solution`, ...) are kept. A row that lacks one is rejected as `bad_problem`, with its
    line (jsonl) or row (parquet) number. A file that is not UTF-8, a line that is not JSON, and
    a file without those columns at all are errors that name the place."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no problems file at {path}")
    if path.suffix == ".jsonl":
        numbered, where = _read_jsonl(path), "line"
    else:
        numbered, where = list(enumerate(pd.read_parquet(path).to_dict("records"), 1)), "row"
    records = [r for _, r in numbered]
    if records and "problem_id" not in records[0] and any("id" in r for r in records):
        records = [{"problem_id": r.pop("id", None), **r} for r in records]
    columns = {k for r in records for k in r}
    missing = {"problem_id", "problem", "answer"} - columns
    if records and missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)} (problem_id or id, problem, "
                         "answer)")
    kept, rejected = [], []
    for (number, _), record in zip(numbered, records, strict=True):
        problem = record.get("problem")
        bad = [k for k in ("problem_id", "answer") if _missing(record.get(k))]
        if not isinstance(problem, str) or not problem.strip():
            bad.append("problem")
        if bad:
            rejected.append({"line": number, "reason": "bad_problem",
                             "detail": f"{path.name} {where} {number}: no {', '.join(bad)}",
                             "raw": json.dumps(record, default=str)[:2000]})
        else:
            kept.append({**record, "problem_id": str(record["problem_id"]),
                         "answer": str(record["answer"])})
    table = pd.DataFrame(kept, columns=sorted(columns) if not kept else None)
    return table, rejected


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value == ""


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte {data[e.start]:#04x} on line "
                         f"{line}") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # (JSON Lines: \n ends a line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name} line {number}: not valid JSON ({e.msg} at column "
                             f"{e.colno})") from None
        records.append((number, record if isinstance(record, dict) else {"problem": None,
                                                                          "value": record}))
    return records


def write_problems(pool_path: Path, out_dir: Path, start: int, count: int | None, seed: int,
                   shard_size: int) -> dict[str, int]:
    """Positions start .. start+count-1 (wrapping; count None: all) of a seeded permutation of
    the pool's valid problems, in shards of `shard_size`, into the stage directory `out_dir`;
    rejected rows into `out_dir/__excluded/` (reason, detail, line, raw). A no-op when done.
    Returns its stats: rows in the file, problems out, dropped_bad_problem."""
    fp = fingerprint({"pool": file_sha256(pool_path), "start": start, "count": count,
                      "seed": seed, "shard_size": shard_size})
    done = out_dir / SUCCESS
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fp:
        return json.loads((out_dir / STATS).read_text())
    pool, rejected = load_problems(pool_path)
    if pool.empty:
        raise ValueError(f"{pool_path}: no valid problem among {len(rejected)} rows"
                         + (f" (first: {rejected[0]['detail']})" if rejected else ""))
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    count = len(pool) if count is None else min(count, len(pool))
    table = pool.iloc[[order[(start + i) % len(order)] for i in range(count)]]
    table = table.reset_index(drop=True)
    for old in [*out_dir.glob("part-*.parquet"), *(out_dir / n for n in (META, EXCLUDED, *LEGACY))]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    for i, lo in enumerate(range(0, len(table), shard_size)):
        write_table_atomic(table.iloc[lo : lo + shard_size], out_dir / part_name(i))
    if rejected:
        write_table_atomic(pd.DataFrame(rejected), out_dir / EXCLUDED / part_name(0))
    stats = {"rows_in": len(pool) + len(rejected), "rows_out": len(table),
             **({"dropped_bad_problem": len(rejected)} if rejected else {})}
    write_json_atomic(out_dir / STATS, stats)
    write_json_atomic(done, {"fingerprint": fp, "pool": str(pool_path), "rows": len(table)})
    return stats

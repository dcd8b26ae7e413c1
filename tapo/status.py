"""`tapo status`: a table of every stage directory under a run directory."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.stage import MARKERS, META, STATS, is_complete

PIPELINE_ORDER = {name: i for i, name in enumerate(
    ["problems", "sample", "classify", "select", "locate", "pick_repair", "construct",
     "assemble"])}


def stage_dirs(run_dir: Path) -> list[Path]:
    """Directories under `run_dir` that a stage has written to (sorted)."""
    found = {p.parent for p in run_dir.rglob(META) if p.is_dir()}
    found = {d for d in found if is_complete(d) or (d / MARKERS).is_dir()}
    return sorted(found, key=lambda d: (str(d.parent), PIPELINE_ORDER.get(d.name, 99), d.name))


def stage_row(d: Path) -> dict[str, str]:
    if is_complete(d):
        stats = json.loads((d / STATS).read_text()) if (d / STATS).exists() else {}
        state = "complete"
    else:
        stats: dict[str, int] = {}
        markers = sorted((d / MARKERS).glob("*.json"))
        for m in markers:
            for k, v in json.loads(m.read_text()).items():
                if k != "fingerprint":
                    stats[k] = stats.get(k, 0) + v
        state = f"partial ({len(markers)} shards done)"
    drops = ", ".join(f"{k[len('dropped_'):]}={v}" for k, v in stats.items()
                      if k.startswith("dropped_"))
    return {
        "stage": str(d),
        "state": state,
        "rows in": str(stats.get("rows_in", "")),
        "rows out": str(stats.get("rows_out", "")),
        "dropped": drops or "-",
    }


def render_status(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such run directory: {run_dir}")
    rows = [stage_row(d) for d in stage_dirs(run_dir)]
    for row in rows:
        row["stage"] = str(Path(row["stage"]).relative_to(run_dir)) or "."
    if not rows:
        return f"{run_dir}: no stage outputs yet"
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols), "  ".join("-" * width[c] for c in cols)]
    lines += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)

"""`tapo show RUN_DIR [--round K] [--n 5] [--rejected]`: a round's trajectories in the terminal.

Each accepted trajectory beside the correct sibling it drew on, in segments: the kept prefix of
the wrong rollout (the located wrong step marked), the diagnosis, the correction. `--rejected`:
what the round's stages dropped, counted by stage and reason, then examples of each reason.
Colour (rich) on a terminal; plain text, the segments named in the left column, otherwise
(`NO_COLOR` / `FORCE_COLOR` decide when set).
"""

from __future__ import annotations

from itertools import zip_longest
from pathlib import Path

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tapo.flows.run_files import (
    REJECTING,
    Trajectory,
    last_round,
    rejections,
    summary,
    trajectories,
)

# segment -> (label in the left column, style); the report uses the same names (flows/report.py)
SEGMENTS = {"prefix": ("kept", "dim"), "failed": ("wrong", "bold red"),
            "diagnosis": ("diagnosis", "yellow"), "correction": ("correction", "green"),
            "reference": ("", "cyan")}


def segment_lines(t: Trajectory) -> list[tuple[str, str]]:
    """(segment, line) of the trajectory, in order: prefix lines (the failed one as 'failed'),
    then the diagnosis and correction lines."""
    out = [("failed" if i == t.failed_line else "prefix", line.rstrip("\n"))
           for i, line in enumerate(t.prefix)]
    out += [("diagnosis", line) for line in t.diagnosis.rstrip("\n").splitlines()]
    out += [("correction", line) for line in t.correction.rstrip("\n").splitlines()]
    return out


def trajectory_panel(t: Trajectory) -> Panel:
    table = Table(box=None, padding=(0, 1), expand=True, show_edge=False)
    table.add_column("", no_wrap=True, style="dim")
    kind = f": {t.error_kind}" if t.error_kind else ""
    table.add_column(f"trajectory ({t.mode}, failure at step {t.failure_step}{kind}, "
                     f"located by {t.locator})", ratio=1)
    table.add_column(f"correct sibling {t.reference_id}", ratio=1)
    reference = t.reference.rstrip("\n").splitlines()
    for (segment, line), ref in zip_longest(segment_lines(t), reference):
        label, style = SEGMENTS.get(segment, ("", ""))
        table.add_row(label, Text(line or "", style=style),
                      Text(ref or "", style=SEGMENTS["reference"][1]))
    return Panel(table, title=f"{t.trajectory_id}: {t.problem} = {t.answer}",
                 title_align="left")


def rejected_view(run_dir: Path, k: int, n: int) -> Group:
    """Counts by stage and reason, then up to `n` examples taking each reason in turn."""
    rows = rejections(run_dir, k)
    if rows.empty:
        return Group(Text(f"round {k}: no stage dropped a row"))
    counts = Table(title=f"round {k}: rows dropped, by stage and reason", title_justify="left")
    for column in ("stage", "reason", "dropped", "example detail"):
        counts.add_column(column, justify="right" if column == "dropped" else "left")
    groups = [g for _, g in sorted(rows.groupby(["stage", "reason"], sort=False),
                                   key=lambda item: REJECTING.index(item[0][0]))]
    for g in groups:
        counts.add_row(g["stage"].iloc[0], g["reason"].iloc[0], str(len(g)), g["detail"].iloc[0])
    examples = [r for batch in zip_longest(*(g.to_dict("records") for g in groups))
                for r in batch if r is not None][:n]
    panels = [Panel(Group(*(Text(text, style=style) for text, style in (
        (r["detail"], "yellow"), (r["problem"], "bold"), (r["text"], "dim")) if text)),
        title=f"{r['stage']} · {r['reason']} · {r['id']}", title_align="left")
        for r in examples]
    return Group(counts, *panels)


def show(run_dir: str | Path, k: int | None = None, n: int = 5, rejected: bool = False,
         console: Console | None = None) -> None:
    """Prints round `k` (default: the last complete one) of the run to `console`."""
    run_dir = Path(run_dir)
    console = console or Console()
    k = k or last_round(run_dir)
    info = summary(run_dir, k)
    if rejected:
        console.print(rejected_view(run_dir, k, n))
        return
    shown = trajectories(run_dir, k, n)
    head = (f"round {k} ({info['algo']}): {info.get('accepted', 0)} trajectories accepted of "
            f"{info.get('candidates', 0)} candidates; pass rate {info['pass_rate']:.3f}")
    console.print(Text(head, style="bold"))
    if not shown:
        console.print("no constructed trajectories in this round"
                      + (" (a GRPO round)" if info["algo"] == "grpo" else ""))
        return
    for t in shown:
        console.print(trajectory_panel(t))
    if len(shown) < info.get("accepted", 0):
        console.print(f"(first {len(shown)} of {info['accepted']}; --n shows more)")

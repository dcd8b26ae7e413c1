"""`tapo report RUN_DIR`: one self-contained HTML page (plots inline as SVG, no scripts, nothing
fetched at view time) of an `iterate` run or a `compare` directory.

    path = write_report("runs/testbed-tapo")        # -> runs/testbed-tapo/report.html

A run: the per-round metrics as plots (pass and reflection rate, augmented and suppressed share,
the loss of every optimizer step, seconds per stage), the metrics table, each round's funnel
(problems -> rollouts -> candidates -> located -> constructed -> in the shard, with every drop
reason) and sample trajectories of the last round, coloured by segment as `tapo show` does.
A compare directory: the held-out tables and pass@k plot of its report, the training pass rate
per round, then each run's own section (collapsed).
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import pandas as pd

from pipeline.layout import CONFIG, METRICS
from tapo.flows.compare import last_checkpoints, plot_heldout, plot_per_round, summary_rows
from tapo.flows.evaluate import format_cell, metric_columns, new_plot, plot_pass_at_k
from tapo.flows.run_files import funnel, rounds, step_log, summary, trajectories
from tapo.flows.show import segment_lines

REPORT = "report.html"
STAGE_COLOURS = {"sample": "#4c72b0", "classify": "#dd8452", "select": "#55a868",
                 "locate": "#c44e52", "pick_repair": "#8172b3", "construct": "#937860",
                 "assemble": "#da8bc3", "train": "#8c8c8c"}
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1180px; margin: 24px auto;
       padding: 0 16px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
.wide { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.plots svg { max-width: 100%; height: auto; }
.traj { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; border: 1px solid #ddd;
        border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.traj h3 { grid-column: 1 / 3; font-size: 14px; margin: 0; }
.traj pre { margin: 0; font: 13px/1.5 ui-monospace, monospace; white-space: pre-wrap; }
.traj .head { color: #666; font-size: 12px; }
.seg { display: block; padding: 0 4px; border-left: 4px solid transparent; }
.prefix { color: #666; border-color: #bbb; }
.failed { color: #b00020; font-weight: 600; border-color: #b00020; background: #fde8ea; }
.diagnosis { color: #7a5a00; border-color: #e0a800; background: #fff6d6; }
.correction { color: #0b6b2b; border-color: #2ca02c; background: #e6f6ea; }
.reference { color: #0b5394; border-color: #6fa8dc; }
.legend span { margin-right: 14px; }
.bar { background: #4c72b0; height: 10px; display: inline-block; vertical-align: middle; }
details { margin: 6px 0; } summary { cursor: pointer; font-weight: 600; }
.drops { color: #a33; }
"""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Writes the page (default RUN_DIR/report.html) and returns its path."""
    run_dir = Path(run_dir)
    if (run_dir / "compare.parquet").exists():
        title, body = f"TAPO compare: {run_dir.name}", compare_body(run_dir)
    elif rounds(run_dir):
        title, body = f"TAPO run: {run_dir.name}", run_body(run_dir, n_trajectories=5)
    else:
        raise FileNotFoundError(f"{run_dir}: neither a run (no iter_0001/round.json) nor a "
                                "compare directory (no compare.parquet)")
    path = Path(out) if out else run_dir / REPORT
    page = (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def run_body(run_dir: Path, n_trajectories: int) -> str:
    """The sections of one iterate run."""
    done = rounds(run_dir)
    metrics = pd.read_csv(run_dir / METRICS) if (run_dir / METRICS).exists() else pd.DataFrame()
    first = summary(run_dir, done[0])
    parts = [f"<p>{len(done)} round(s) of {html.escape(first['algo'])}; round 1's policy "
             f"<code>{html.escape(first['policy'])}</code>; trained rounds: {len(metrics)}; "
             f"config: <code>{html.escape(str(run_dir / CONFIG))}</code></p>"]
    if not metrics.empty:
        parts += ["<h2>Per round</h2>", f"<div class='plots'>{round_plots(metrics, run_dir)}</div>",
                  table_html(metrics, [c for c in metrics.columns if c != "algo"])]
    parts.append("<h2>Funnel</h2><p>Each stage's rows in and out, with every drop reason "
                 "(select counts problems, the others rows).</p>")
    for k in done:
        open_ = " open" if k == done[-1] else ""
        parts.append(f"<details{open_}><summary>round {k}</summary>{funnel_html(run_dir, k)}"
                     "</details>")
    shown = trajectories(run_dir, done[-1], n_trajectories)
    parts.append(f"<h2>Trajectories of round {done[-1]}</h2>")
    if shown:
        parts.append("<p class='legend'>" + "".join(
            f"<span class='seg {c}' style='display:inline'>{c}</span>"
            for c in ("prefix", "failed", "diagnosis", "correction", "reference")) + "</p>")
        parts += [trajectory_html(t) for t in shown]
    else:
        parts.append("<p>No constructed trajectories in this round.</p>")
    return "".join(parts)


def compare_body(out_dir: Path) -> str:
    """The compare report's tables and plots, then each run's section."""
    table = pd.read_parquet(out_dir / "compare.parquet").astype({"seed": "Int64"})
    final = last_checkpoints(table)
    rows = summary_rows(final)
    means = final.groupby("variant", sort=False)[metric_columns(final)].mean().reset_index()
    runs = [d for d in sorted(out_dir.iterdir()) if d.is_dir() and rounds(d)]
    per_round = out_dir / "per_round.parquet"  # (not written by a compare before 2026-11-26)
    parts = ["<h2>Held-out metrics (mean ± std over seeds)</h2>",
             table_html(pd.DataFrame(rows), list(rows[0])),
             f"<div class='plots'>{svg(lambda p: plot_pass_at_k(means, 'variant', p))}",
             svg(lambda p: plot_heldout(table, p)),
             svg(lambda p: plot_per_round(pd.read_parquet(per_round), p))
             if per_round.exists() else "", "</div>",
             "<h2>Every run</h2>", table_html(table, ["variant", "seed", "rounds",
                                                      *metric_columns(table)])]
    for d in runs:
        parts.append(f"<details><summary>{html.escape(d.name)}</summary>"
                     f"{run_body(d, n_trajectories=2)}</details>")
    return "".join(parts)


def svg(draw) -> str:
    """The SVG text of the plot `draw(path)` writes (matplotlib, by the path's suffix)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plot.svg"
        draw(path)
        text = path.read_text()
    return text[text.index("<svg"):]


def round_plots(metrics: pd.DataFrame, run_dir: Path) -> str:
    """Six panels: pass/reflection rate, augmented share, suppressed share, the loss of each
    optimizer step (round means as points), seconds per stage (stacked)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = new_plot((12, 6.4), rows=2, cols=3)
    r = metrics["round"]
    line = {"marker": "o", "markersize": 3}
    axes[0, 0].plot(r, metrics["pass_rate"], label="pass rate", **line)
    axes[0, 0].plot(r, metrics["reflection_rate"], label="reflection rate", **line)
    axes[0, 0].set_title("rollouts of each round")
    if "augmented_share" in metrics:
        axes[0, 1].plot(r, metrics["augmented_share"], **line)
    axes[0, 1].set_title("augmented share of the shard")
    axes[0, 2].plot(r, metrics["suppressed_share"], **line)
    axes[0, 2].set_title("OOD-suppressed share (corrective tokens)")
    steps = step_log(run_dir)
    if not steps.empty:
        axes[1, 0].plot(steps["global_step"], steps["loss"], linewidth=1, label="step")
        ends = metrics["steps"].cumsum()
        axes[1, 0].plot(ends, metrics["loss"], "o", markersize=4, label="round mean")
        axes[1, 0].set_xlabel("optimizer step")
    axes[1, 0].set_title("loss")
    bottom = pd.Series(0.0, index=metrics.index)
    for stage, colour in STAGE_COLOURS.items():
        if f"seconds_{stage}" in metrics:
            axes[1, 1].bar(r, metrics[f"seconds_{stage}"], bottom=bottom, color=colour,
                           label=stage)
            bottom += metrics[f"seconds_{stage}"]
    axes[1, 1].set_title("seconds per stage")
    axes[1, 2].plot(r, metrics["entropy"], label="entropy", **line)
    axes[1, 2].plot(r, metrics["clip_fraction"], label="clip fraction", **line)
    axes[1, 2].set_title("entropy, clip fraction")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax is not axes[1, 0]:
            ax.set_xlabel("round")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    text = svg(fig.savefig)
    plt.close(fig)
    return text


def table_html(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th class='l'>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(row[c]))}</td>"
                                    for c in columns) + "</tr>"
                   for row in frame.to_dict("records"))
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def funnel_html(run_dir: Path, k: int) -> str:
    steps = funnel(run_dir, k)
    widest = max((max(s.rows_in, s.rows_out) for s in steps), default=1) or 1
    rows = []
    for s in steps:
        drops = ", ".join(f"{reason}: {n} {s.drop_unit}" for reason, n in s.drops.items())
        rows.append(f"<tr><td class='l'>{html.escape(s.label)}</td><td class='l'>{s.stage}</td>"
                    f"<td>{s.rows_in}</td><td>{s.rows_out}</td><td class='l'><span class='bar' "
                    f"style='width:{200 * s.rows_out // widest}px'></span></td>"
                    f"<td class='l drops'>{html.escape(drops)}</td></tr>")
    augmented = summary(run_dir, k)["augmented"]
    return ("<table><tr><th class='l'>step</th><th class='l'>stage</th><th>rows in</th>"
            "<th>rows out</th><th></th><th class='l'>dropped</th></tr>" + "".join(rows)
            + f"</table><p>In the training shard: {augmented} augmented trajectories.</p>")


def trajectory_html(t) -> str:
    def seg(cls: str, line: str) -> str:
        return f"<span class='seg {cls}'>{html.escape(line) or '&nbsp;'}</span>"

    left = "".join(seg(cls, line) for cls, line in segment_lines(t))
    right = "".join(seg("reference", line) for line in t.reference.rstrip("\n").splitlines())
    return (f"<div class='traj'><h3>{html.escape(t.trajectory_id)}: {html.escape(t.problem)} = "
            f"{html.escape(t.answer)}</h3>"
            f"<div><div class='head'>trajectory ({html.escape(t.mode)}, failure at step "
            f"{t.failure_step}, located by {html.escape(t.locator)})</div><pre>{left}</pre></div>"
            f"<div><div class='head'>correct sibling {html.escape(t.reference_id)}</div>"
            f"<pre>{right}</pre></div></div>")

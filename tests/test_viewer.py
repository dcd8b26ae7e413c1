"""`tapo show` and `tapo report` on a real two-round run of the small testbed; the report is
rendered in headless Chromium."""

import io
import json
import re

import pytest
from rich.console import Console

from pipeline.io import read_pandas
from stages.tasks import arith
from tapo.cli import main
from tapo.flows.report import write_report
from tapo.flows.run_files import funnel, rejections, trajectories
from tapo.flows.show import show
from tests.browser import ink, render

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_trajectories_are_cut_at_the_located_step(small_run):
    shown = trajectories(small_run, 2)
    built = read_pandas(small_run / "iter_0002" / "construct")
    assert [t.trajectory_id for t in shown] == list(built["trajectory_id"]) and shown
    for t in shown:
        wrong_steps = [line for line in t.wrong_response.splitlines() if line.strip()]
        assert t.prefix[t.failed_line].rstrip("\n") == wrong_steps[t.failure_step - 1]
        assert "".join(t.prefix) + t.diagnosis + t.correction == built.set_index(
            "trajectory_id").loc[t.trajectory_id, "response"]


def test_show_prints_plain_text_when_piped(small_run, capsys):
    assert main(["show", str(small_run), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert not ANSI.search(out)  # captured: not a terminal
    first = trajectories(small_run, 2, 1)[0]
    failed = first.prefix[first.failed_line].strip()
    assert re.search(rf"^\W*wrong\s+{re.escape(failed)}", out, re.M)  # the wrong step, labelled
    assert re.search(r"^\W*diagnosis\s+Wait, step \d+ is wrong", out, re.M)
    assert re.search(r"^\W*correction\s", out, re.M)
    assert first.reference_id in out and "round 2 (tapo)" in out
    kind = arith.ArithTask().error_kind(first.problem, first.wrong_response)
    assert first.error_kind == kind in arith.ERROR_KINDS
    assert f"step {first.failure_step}: {kind}" in out
    # the diagnosis names that kind's reason (arith.diagnosis), as the rule constructor writes it
    error = arith.first_wrong_step(arith.parse_problem(first.problem), first.wrong_response)
    assert arith.diagnosis(arith.parse_problem(first.problem), error.chain_step, error.found,
                           error.expected) in first.diagnosis
    assert out.count("/tapo: ") == 2 and "--n shows more" in out


def test_show_colours_the_segments_on_a_terminal(small_run):
    buffer = io.StringIO()
    show(small_run, 2, n=1, console=Console(file=buffer, force_terminal=True, width=160,
                                            color_system="standard"))
    out = buffer.getvalue()
    first = trajectories(small_run, 2, 1)[0]
    failed = first.prefix[first.failed_line].strip()
    assert re.search(r"\x1b\[1;31m" + re.escape(failed), out)  # bold red
    assert re.search(r"\x1b\[33mWait, step", out)  # the diagnosis in yellow


def test_show_rejected_counts_every_drop(small_run, capsys):
    stats = json.loads((small_run / "iter_0002" / "round.json").read_text())["stats"]
    dropped = {(stage, key[8:]): n for stage, s in stats.items() for key, n in s.items()
               if key.startswith("dropped_")}
    rows = rejections(small_run, 2)
    assert dict(rows.groupby(["stage", "reason"]).size()) == dropped and dropped
    assert main(["show", str(small_run), "--round", "2", "--rejected", "--n", "3"]) == 0
    out = capsys.readouterr().out
    for (stage, reason), n in dropped.items():
        assert re.search(rf"{stage}\W+{reason}\W+{n}\b", out), (stage, reason, n)
    assert out.count(" · ") == 2 * min(3, len(rows))  # 3 example panels: stage · reason · id


def test_show_names_what_is_missing(small_run, tmp_path, capsys):
    assert main(["show", str(small_run), "--round", "9"]) == 1
    assert "round 9 has not run (complete rounds: 1, 2)" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 1
    assert "no such run directory" in capsys.readouterr().err


def test_report_is_one_self_contained_page_that_renders(small_run, tmp_path):
    page = write_report(small_run, tmp_path / "report.html")
    text = page.read_text()
    # nothing fetched: no scripts, links, images; the SVGs refer only to their own ids
    assert not re.search(r"<script|<link|<img|\ssrc=|url\((?!#)|href=['\"](?!#)", text)
    assert text.count("<svg") == 1  # the six per-round panels
    for k in (1, 2):
        for step in funnel(small_run, k):
            for reason in step.drops:
                assert reason in text
    for t in trajectories(small_run, 2, 5):
        assert t.trajectory_id in text
    assert "class='seg failed'" in text and "class='seg diagnosis'" in text

    console = render(page, tmp_path / "report.png", tmp_path / "profile")
    assert console == []
    share, colours = ink(tmp_path / "report.png")
    assert share > 0.05 and colours > 50, (share, colours)


def test_the_console_check_catches_a_broken_page(tmp_path):
    """The renderer's console check can fail: a page with a script error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><h1>x</h1><script>missing();</script></body></html>")
    console = render(page, tmp_path / "broken.png", tmp_path / "profile")
    assert any("missing is not defined" in line for line in console)
    share, _ = ink(tmp_path / "broken.png")
    assert share < 0.05  # an almost empty page reads as (nearly) blank


def test_report_of_nothing_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run"):
        write_report(tmp_path)

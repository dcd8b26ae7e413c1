"""`tapo locator-check`: a model's error localization scored against the exact checker."""

import json

import pandas as pd
import pytest

from pipeline.io import read_pandas
from stages.tasks.arith import ArithTask
from tapo.cli import main
from tapo.flows.locator_check import score, summarize


def test_outcomes_against_the_checker():
    rule = pd.DataFrame({"wrong_rollout_id": list("abcdef"), "n_steps": [3, 4, 2, 5, 4, 3],
                         "failure_step": [2, 3, 1, 5, 1, None],
                         "reason": [None] * 5 + ["no_error_found"]})
    llm = pd.DataFrame({"wrong_rollout_id": list("abcdef"), "n_steps": [3, 4, 2, 5, 4, 3],
                        "failure_step": [2, 4, None, 1, 4, 2],
                        "reason": [None, None, "locator_unparseable", None, None, None]})
    scores = score(rule, llm)
    assert list(scores["wrong_rollout_id"]) == list("abcde")  # f: the checker finds no error
    assert list(scores["outcome"]) == ["exact", "off_by_one", "none", "earlier", "later"]
    result = summarize(scores)
    assert result["candidates"] == 5 and result["exact"] == pytest.approx(0.2)
    assert sum(result[o] for o in ("exact", "off_by_one", "earlier", "later", "none")) == 1
    assert result["chance"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2 + 1 / 5 + 1 / 4) / 5)
    assert result["no_step_reasons"] == {"locator_unparseable": 1}
    assert result["by_error_kind"] == {}  # a task that cannot tell its errors apart
    scores["error_kind"] = ["slip", "misread", None, "slip", "misread"]
    assert summarize(scores)["by_error_kind"] == {
        "misread": {"candidates": 2, "exact": 0.0}, "slip": {"candidates": 2, "exact": 0.5}}


def test_the_command_scores_every_candidate_of_a_round(small_run, capsys):
    quick = "locate.max_tokens=8"  # the small testbed's model names no step either way
    assert main(["locator-check", str(small_run), "--round", "2", quick]) == 0
    out = capsys.readouterr().out
    assert "against the exact checker" in out and "chance" in in_lines(out)
    check = small_run / "iter_0002" / "locator_check" / "policy"
    result = json.loads((check / "summary.json").read_text())
    round_located = read_pandas(small_run / "iter_0002" / "locate")  # the round's own: rule
    assert result["candidates"] == len(round_located) > 0
    scores = pd.read_parquet(check / "scores.parquet")
    truth = round_located.set_index("wrong_rollout_id")["failure_step"]
    assert (scores["truth"].to_numpy() == truth[scores["wrong_rollout_id"]].to_numpy()).all()
    # every candidate the model located or failed to is counted once, none dropped silently
    llm = read_pandas(check / "llm")
    excluded = check / "llm" / "__excluded"
    dropped = read_pandas(excluded) if excluded.is_dir() else llm.iloc[:0]
    assert len(llm) + len(dropped) == len(read_pandas(small_run / "iter_0002" / "select"))
    assert result["no_step_reasons"] == dropped["reason"].value_counts().to_dict()
    task, rows = ArithTask(), round_located.set_index("wrong_rollout_id")
    kinds = [task.error_kind(rows.at[key, "problem"], rows.at[key, "wrong_response"])
             for key in scores["wrong_rollout_id"]]
    assert list(scores["error_kind"]) == kinds and None not in kinds
    assert sum(k["candidates"] for k in result["by_error_kind"].values()) == len(scores)
    assert "exact by error kind" in out
    assert main(["locator-check", str(small_run), "--round", "2", quick]) == 0  # a no-op now


def in_lines(text: str) -> list[str]:
    return [word for line in text.splitlines() for word in line.split()]

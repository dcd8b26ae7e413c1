"""`tapo locator-check RUN_DIR [--round K] [--model PATH]`: score a model's error localization
against the task's exact step checker, on the candidates of a round, before paying for a run.

    scores = locator_check("runs/testbed-tapo", k=1, cfg=cfg, model="/models/teacher")

Runs the `locate` stage twice over round K's candidates (RUN_DIR/iter_KKKK/select): with the
exact checker (`locate.method=rule`; arith has one) and with the model (`method=llm`: `--model`,
else `locate.model`, else the round's policy), into OUT/rule and OUT/llm (default OUT:
RUN_DIR/iter_KKKK/locator_check/<model's directory name, or "policy">; resumable). Then, over
the candidates the checker finds a wrong step in: the share the model names exactly, one step
off, earlier or later, or not at all (an answer without `<step>k</step>` or out of range), and
the chance level (a uniform guess among the response's steps); for a task that tells its
errors apart (arith: misread, slip, copy, ...), the exact share by the kind of the first error.
Writes OUT/scores.parquet (a row per candidate) and OUT/summary.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from pipeline.io import read_pandas
from pipeline.layout import iter_dir
from pipeline.runner import run_stage
from pipeline.stage import EXCLUDED
from pipeline.util import write_json_atomic
from stages.locate import Locate
from stages.tasks.base import Task, task_of
from tapo.flows.run_files import summary as round_summary_of

KEY = "wrong_rollout_id"


def locator_check(run_dir: str | Path, k: int, cfg: Config, model: str | Path | None = None,
                  out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Runs both locators over round k's candidates and returns (and writes) the summary."""
    here = iter_dir(run_dir, k)
    policy = round_summary_of(run_dir, k)["policy"]
    teacher = str(model or cfg.locate.model)
    out = Path(out_dir) if out_dir else here / "locator_check" / (Path(teacher).name or "policy")
    base = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"path": policy})})
    for method in ("rule", "llm"):
        locate = base.locate.model_copy(update={"method": method, "model": teacher})
        run_stage(Locate, base.model_copy(update={"locate": locate}), here / "select",
                  out / method, progress=progress)
    scores = score(located(out / "rule"), located(out / "llm"))
    scores["error_kind"] = scores[KEY].map(error_kinds(out / "rule", task_of(cfg)))
    scores.to_parquet(out / "scores.parquet", index=False)
    result = {"round": k, "model": teacher or policy, "out": str(out), **summarize(scores)}
    write_json_atomic(out / "summary.json", result)
    return result


def located(stage_dir: Path) -> pd.DataFrame:
    """A locate directory's rows, kept and dropped: `KEY`, `n_steps` and `failure_step` (null
    when dropped), `reason` (null when kept)."""
    frames = [read_pandas(stage_dir, columns=[KEY, "n_steps", "failure_step"]).assign(
        reason=None)]
    if (stage_dir / EXCLUDED).is_dir():
        frames.append(read_pandas(stage_dir / EXCLUDED, columns=[KEY, "reason"]))
    return pd.concat(frames, ignore_index=True)[[KEY, "n_steps", "failure_step", "reason"]]


def error_kinds(stage_dir: Path, task: Task) -> pd.Series:
    """The kind of each located wrong rollout's first error (Task.error_kind; None when the
    task cannot tell), by `KEY`, from a locate directory's kept rows."""
    rows = read_pandas(stage_dir, columns=[KEY, "problem", "wrong_response"])
    return pd.Series([task.error_kind(p, r) for p, r in zip(rows["problem"],
                                                             rows["wrong_response"])],
                     index=rows[KEY], dtype=object)


def score(rule: pd.DataFrame, llm: pd.DataFrame) -> pd.DataFrame:
    """A row per candidate the exact checker located: `truth`, `located` (null when the model
    named no valid step), `outcome`: exact | off_by_one | earlier | later | none."""
    truth = rule[rule["reason"].isna()].rename(columns={"failure_step": "truth"})
    model = llm.set_index(KEY)
    rows = truth[[KEY, "n_steps", "truth"]].copy()
    rows["located"] = rows[KEY].map(model["failure_step"])
    rows["llm_reason"] = rows[KEY].map(model["reason"])
    diff = rows["located"].astype("Float64") - rows["truth"].astype("Float64")
    rows["outcome"] = "none"
    rows.loc[diff < -1, "outcome"] = "earlier"
    rows.loc[diff > 1, "outcome"] = "later"
    rows.loc[diff.abs() == 1, "outcome"] = "off_by_one"
    rows.loc[diff == 0, "outcome"] = "exact"
    return rows.reset_index(drop=True)


def summarize(scores: pd.DataFrame) -> dict[str, Any]:
    """Shares of each outcome over the located candidates, the chance level, and (with an
    `error_kind` column the task filled) the candidates and exact share of each error kind."""
    n = len(scores)
    shares = {o: float((scores["outcome"] == o).mean()) if n else 0.0
              for o in ("exact", "off_by_one", "earlier", "later", "none")}
    steps = scores["n_steps"].astype(float).clip(lower=1)
    kinds = scores.get("error_kind", pd.Series(None, index=scores.index, dtype=object))
    return {"candidates": n, **shares,
            "chance": float((1 / steps).mean()) if n else 0.0,
            "truth_past_last_step": int((scores["truth"] > scores["n_steps"]).sum()),
            "no_step_reasons": scores["llm_reason"].dropna().value_counts().to_dict(),
            "by_error_kind": {
                kind: {"candidates": len(g), "exact": float((g["outcome"] == "exact").mean())}
                for kind, g in scores.groupby(kinds)}}  # (a None kind in no group)


def render(result: dict[str, Any]) -> str:
    lines = [f"round {result['round']}: locator {result['model']} against the exact checker, "
             f"{result['candidates']} candidates"]
    for key in ("exact", "off_by_one", "earlier", "later", "none", "chance"):
        lines.append(f"  {key:<11} {result[key]:6.1%}")
    if result["by_error_kind"]:
        lines.append("  exact by error kind: " + ", ".join(
            f"{kind} {k['exact']:.1%} of {k['candidates']}"
            for kind, k in sorted(result["by_error_kind"].items(),
                                  key=lambda item: -item[1]["candidates"])))
    if result["no_step_reasons"]:
        lines.append("  no step named: " + ", ".join(
            f"{reason} {n}" for reason, n in result["no_step_reasons"].items()))
    if result["truth_past_last_step"]:
        lines.append(f"  {result['truth_past_last_step']} responses stop before their error "
                     "shows (the checker's step is past the last one; no answer can match)")
    lines.append(f"  per candidate: {result['out']}/scores.parquet")
    return "\n".join(lines)

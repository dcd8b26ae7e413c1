"""select: difficulty-aware candidate selection (DCS), at most one construction per problem.

Reads the round's classified rollouts, all at once (the budget spans shards); writes, per selected
problem, a wrong rollout to repair and a correct reference from the same group
(schema.CANDIDATES). With `select.repair=latest_failure` (the default) every repairable wrong
rollout of a selected problem is a row: `locate` finds each one's failure and `pick_repair`
keeps the latest. With `select.repair=longest` the one row is the longest wrong rollout. Every
problem not selected goes to `excluded/` with its reason:

- `no_correct_reference`: no rollout is correct (p = 0): nothing to learn the fix from;
- `no_wrong_rollout`: every rollout is correct (p = 1): nothing to fix;
- `outside_window`: p outside [select.p_low, select.p_high];
- `no_repairable_rollout`: the wrong rollouts were all graded `timeout`/`error` (unknown);
- `over_budget`: a candidate beyond the round's budget, `select.max_constructions`, or else
  ceil(select.budget_fraction x problems in the round).

The rule (PAPER.md, our reading): candidates are taken hardest first (lowest p; equal p in a
seeded pseudo-random order); `select.order=random` takes them in the seeded order alone.
`longest`: the rollout to repair is a wrong one with an answer
(`incorrect` before `no_answer`), finished before truncated, then the longest (the most
reasoning to keep), ties by seed. The reference is the shortest correct rollout, ties by seed.
Counts in stats.json: `rows_in` rollouts, the drops problems, `rows_out` candidate rows (one
per problem with `longest`, one per wrong rollout with `latest_failure`).
"""

from __future__ import annotations

import math
from collections import defaultdict

from pipeline.stage import Stage, StageOutput
from stages import schema
from stages.common import tiebreak

REPAIRABLE = ("incorrect", "no_answer")


class Select(Stage):
    name = "select"
    version = "2"
    sections = ("select",)
    input_schema = schema.CLASSIFIED
    output_schema = schema.CANDIDATES
    whole_input = True
    row_fallback = False

    def process(self, rows):
        cfg = self.config.select
        out = StageOutput()
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[row["problem_id"]].append(row)
        candidates = []
        for pid, group in groups.items():
            g, c = len(group), sum(r["label"] == "correct" for r in group)
            p = c / g
            summary = {"problem_id": pid, "group_size": g, "group_correct": c, "pass_rate": p}
            wrong = [r for r in group if r["label"] in REPAIRABLE]
            if c == 0:
                out.drop(summary, "no_correct_reference", f"0 of {g} correct")
            elif c == g:
                out.drop(summary, "no_wrong_rollout", f"{g} of {g} correct")
            elif not cfg.p_low <= p <= cfg.p_high:
                out.drop(summary, "outside_window",
                         f"p = {c}/{g} outside [{cfg.p_low}, {cfg.p_high}]")
            elif not wrong:
                out.drop(summary, "no_repairable_rollout", "wrong rollouts were timeout/error")
            else:
                candidates.append((p, tiebreak(cfg.seed, pid), summary, group, wrong))
        candidates.sort(key=lambda t: t[:2] if cfg.order == "hardest" else t[1])
        budget = (cfg.max_constructions if cfg.max_constructions is not None
                  else math.ceil(cfg.budget_fraction * len(groups)))
        for rank, (_, _, summary, group, wrong) in enumerate(candidates):
            if rank >= budget:
                out.drop(summary, "over_budget", f"rank {rank} >= budget {budget}")
                continue
            reference = choose_reference([r for r in group if r["label"] == "correct"], cfg.seed)
            repairs = [choose_repair(wrong, cfg.seed)] if cfg.repair == "longest" else sorted(
                wrong, key=lambda r: repair_order(r, cfg.seed))
            for i, repair in enumerate(repairs):
                out.keep(candidate_row(repair, summary["group_size"], summary["pass_rate"], rank,
                                       reference["rollout_id"], reference["response"], i))
        return out


def repair_order(r: dict, seed: int) -> tuple:
    """The preference among wrong rollouts: `incorrect` before `no_answer`, finished before
    truncated, then the longest, ties by seed."""
    return (r["label"] != "incorrect", r["finish_reason"] != "stop", -r["response_len"],
            tiebreak(seed, r["rollout_id"]))


def choose_repair(wrong: list[dict], seed: int) -> dict:
    """The wrong rollout to repair without locating: the first in repair_order."""
    return min(wrong, key=lambda r: repair_order(r, seed))


def choose_reference(correct: list[dict], seed: int) -> dict:
    """The shortest correct rollout, ties by seed."""
    return min(correct, key=lambda r: (r["response_len"], tiebreak(seed, r["rollout_id"])))


def candidate_row(repair: dict, group_size: int, pass_rate: float, rank: int,
                  reference_id: str, reference: str, repair_rank: int = 0) -> dict:
    """A schema.CANDIDATES row for the rollout `repair`."""
    return {
        "problem_id": repair["problem_id"], "problem": repair["problem"],
        "answer": repair["answer"], "prompt": repair["prompt"], "group_size": group_size,
        "pass_rate": pass_rate, "rank": rank, "repair_rank": repair_rank,
        "wrong_rollout_id": repair["rollout_id"],
        "wrong_label": repair["label"], "wrong_response": repair["response"],
        "wrong_token_ids": repair["response_token_ids"], "reference_rollout_id": reference_id,
        "reference_response": reference,
    }

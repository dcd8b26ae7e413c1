"""coldstart_select: one wrong response per problem to repair, for the cold-start set.

Reads the base model's classified responses shard by shard (schema.CLASSIFIED; `sample` writes
all the responses of a problem into one shard, so a shard holds whole groups: the cold-start set
streams at any size), and the problems as the side input `problems` (their `solution` is the
reference when no response is correct); writes one candidate per problem (schema.CANDIDATES).
Unlike the RL `select` there is no difficulty window and no budget: every problem with a wrong
response gives one candidate (PAPER.md: built only from incorrect responses, one per query). The
rollout to repair and the reference follow `select`'s rules; a dataset solution as reference has
`reference_rollout_id` "solution". Drops, one row per problem: `no_wrong_response` (all
correct), `no_repairable_response` (the wrong ones were graded timeout/error), `no_reference`
(none correct and no solution).
"""

from __future__ import annotations

from collections import defaultdict

from pipeline.stage import Stage, StageOutput
from stages import schema
from stages.select import REPAIRABLE, candidate_row, choose_reference, choose_repair


class ColdstartSelect(Stage):
    name = "coldstart_select"
    sections = ("run",)
    input_schema = schema.CLASSIFIED
    output_schema = schema.CANDIDATES
    side_inputs = ("problems",)
    row_fallback = False

    def process(self, rows):
        seed = self.config.run.seed
        solutions = {p["problem_id"]: p.get("solution") or "" for p in self.side["problems"]}
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[row["problem_id"]].append(row)
        out = StageOutput()
        for pid, group in groups.items():
            correct = [r for r in group if r["label"] == "correct"]
            wrong = [r for r in group if r["label"] in REPAIRABLE]
            summary = {"problem_id": pid, "group_size": len(group), "group_correct": len(correct),
                       "pass_rate": len(correct) / len(group)}
            if len(correct) == len(group):
                out.drop(summary, "no_wrong_response", f"{len(group)} of {len(group)} correct")
            elif not wrong:
                out.drop(summary, "no_repairable_response", "wrong responses were timeout/error")
            elif not correct and not solutions.get(pid):
                out.drop(summary, "no_reference", "no correct response and no dataset solution")
            else:
                ref = choose_reference(correct, seed) if correct else None
                out.keep(candidate_row(
                    choose_repair(wrong, seed), len(group), summary["pass_rate"], 0,
                    ref["rollout_id"] if ref else "solution",
                    ref["response"] if ref else solutions[pid]))
        return out

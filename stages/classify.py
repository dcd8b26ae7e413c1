"""classify: grade every rollout with the task's grader; group pass rates.

Reads rollouts (schema.ROLLOUTS); writes them with `label`, `reason`, `extracted_answer`,
`reward` and the group's `group_size`, `group_correct`, `pass_rate` (schema.CLASSIFIED). A
group is the rollouts of one problem in the shard (sample writes a problem's group together).
A repeated `rollout_id` is dropped as `duplicate_rollout`, a row without response text or
reference answer as `bad_rollout` (validated up front, so one bad row never splits a group).
"""

from __future__ import annotations

from collections import Counter

from pipeline.grader import Grader
from pipeline.stage import Stage, StageOutput
from stages import schema
from stages.common import valid_unique
from stages.tasks import task_of


class Classify(Stage):
    name = "classify"
    sections = ("task", "grader")
    input_schema = schema.ROLLOUTS
    output_schema = schema.CLASSIFIED
    row_fallback = False  # group statistics need the whole group

    def __init__(self, config):
        super().__init__(config)
        self.grader = Grader(task_of(config), config.grader.workers, config.grader.timeout_s)

    def process(self, rows):
        out = StageOutput()
        unique = valid_unique(
            rows, key=lambda r: r["rollout_id"],
            valid=lambda r: isinstance(r.get("response"), str) and isinstance(r.get("answer"), str),
            out=out, bad=("bad_rollout", "response and answer must be text"),
            duplicate="duplicate_rollout")
        verdicts = self.grader.grade([r["response"] for r in unique],
                                     [r["answer"] for r in unique])
        size = Counter(r["problem_id"] for r in unique)
        correct = Counter(r["problem_id"] for r, v in zip(unique, verdicts) if v.label == "correct")
        for row, v in zip(unique, verdicts, strict=True):
            pid = row["problem_id"]
            out.keep({
                **row, "label": v.label, "reason": v.reason, "extracted_answer": v.answer,
                "reward": 1.0 if v.label == "correct" else 0.0, "group_size": size[pid],
                "group_correct": correct[pid], "pass_rate": correct[pid] / size[pid],
            })
        return out

    def close(self):
        self.grader.close()

"""pick_repair: of a problem's located wrong rollouts, the one whose failure comes latest.

Reads located candidates (schema.LOCATED), all at once (a problem's rows travel together);
writes one per problem (schema.LOCATED): the longest valid prefix (`prefix_chars`), ties by
select's repair order (`repair_rank`: `incorrect` before `no_answer`, finished, longer, seed).
PAPER.md, our reading: the latest failure keeps the most of the model's own reasoning. The
problem's other located rollouts are dropped as `not_latest_failure`, naming the one kept. With
`select.repair=longest` every problem has one row, which this stage keeps.
"""

from __future__ import annotations

from collections import defaultdict

from pipeline.stage import Stage, StageOutput
from stages import schema


class PickRepair(Stage):
    name = "pick_repair"
    input_schema = schema.LOCATED
    output_schema = schema.LOCATED
    whole_input = True
    row_fallback = False

    def process(self, rows):
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[row["problem_id"]].append(row)
        out = StageOutput()
        for group in groups.values():
            kept, *others = sorted(group, key=lambda r: (-r["prefix_chars"], r["repair_rank"]))
            out.keep(kept)
            for other in others:
                out.drop(other, "not_latest_failure",
                         f"{kept['wrong_rollout_id']} keeps {kept['prefix_chars']} characters, "
                         f"this one {other['prefix_chars']}")
        return out

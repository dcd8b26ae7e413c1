"""locate: the first wrong step of each candidate's wrong rollout, and the prefix to keep.

Reads candidates (schema.CANDIDATES); writes them with `n_steps`, `failure_step`, and the kept
prefix's end in characters and in the rollout's own tokens (schema.LOCATED). Steps are the
non-empty lines of the response. The prefix of a failure at step k is steps 1..k, the wrong step
included, so the reflection that follows names an error the text shows (`locate.keep_failed_step`,
the default; false keeps steps 1..k-1, PAPER.md's reading). A response that stops too early
(k = n_steps + 1) is kept whole.

Locators (`locate.method`):
- `rule`: the task's exact step checker (arith only).
- `llm`: a model (the policy, or `locate.model`) is shown the problem, the numbered steps and the
  reference's, numbered alike (stages/tasks/prompts.py), and answers `<step>k</step>` (or,
  without the tags, "the first wrong step is k"). An answer that names no step is dropped as
  `locator_unparseable`; a k outside 1..n_steps as `locator_out_of_range`.
Other drops: `no_error_found` (the checker finds the response correct), `token_mismatch` (the
token ids do not decode to the response text).
"""

from __future__ import annotations

import json
import re

from pipeline.stage import Stage, StageOutput
from pipeline.util import model_state
from stages import schema
from stages.common import (
    EngineHolder,
    ask,
    load_tokenizer,
    policy_path,
    prefix_boundary,
    require_rule_task,
)
from stages.tasks.base import Rejection, Step, task_of
from stages.tasks.prompts import STEP_TAG, locate_instruction

# Without the tags, a plain "the first wrong step is 2." / "Step 2 is wrong" (what a small
# instruct model writes); not a number that starts arithmetic ("step is 6 + 6 = 12").
_STEP_PHRASE = re.compile(r"\bstep\s+(?:is\s+)?\[?(\d{1,6})\]?(?!\s*[-+*/=\d])", re.IGNORECASE)


class Locate(Stage):
    name = "locate"
    version = "4"
    sections = ("task", "policy", "locate", "engine", "run")
    input_schema = schema.CANDIDATES
    output_schema = schema.LOCATED

    def __init__(self, config):
        super().__init__(config)
        require_rule_task(config, "locate")
        self.engine = EngineHolder(config, config.locate.model or policy_path(config))
        self.task = task_of(config)

    def process(self, rows):
        tokenizer = load_tokenizer(str(policy_path(self.config)))
        if self.config.locate.method == "rule":
            found = [self.task.locate_failure(r["problem"], r["wrong_response"]) for r in rows]
        else:
            found = self._llm(rows)
        out = StageOutput()
        for row, result in zip(rows, found, strict=True):
            if isinstance(result, Rejection):
                out.drop(row, result.reason, result.detail)
                continue
            step, chars, detail = result
            steps = self.task.split_steps(row["wrong_response"])
            if self.config.locate.keep_failed_step:
                chars = failed_step_end(steps, step, chars)
            try:
                n_tokens, chars = prefix_boundary(tokenizer, row["wrong_token_ids"],
                                                  row["wrong_response"], chars)
            except ValueError as e:
                out.drop(row, "token_mismatch", str(e))
                continue
            out.keep({**row, "n_steps": len(steps),
                      "failure_step": step, "prefix_chars": chars, "prefix_tokens": n_tokens,
                      "locator": self.config.locate.method, "locate_detail": detail})
        return out

    def _llm(self, rows):
        cfg = self.config.locate
        split = self.task.split_steps
        answers = ask(self.engine, [locate_instruction(
            r["problem"], split(r["wrong_response"]), split(r["reference_response"]))
            for r in rows],
            cfg.temperature, cfg.max_tokens, self.config.run.seed)
        return [parse_located_step(a, self.task.split_steps(r["wrong_response"]))
                for r, a in zip(rows, answers)]

    @classmethod
    def models_state(cls, config):
        return {"model": model_state(config.locate.model or policy_path(config))}

    @classmethod
    def runs_model(cls, config):
        return config.locate.method == "llm"

    def close(self):
        self.engine.close()


def failed_step_end(steps: list[Step], step: int, chars: int) -> int:
    """The end of line `step` of a response's `steps` (its line terminator included), or
    `chars` when there is no such step."""
    return steps[step - 1].line_end if 1 <= step <= len(steps) else chars


def parse_located_step(answer: str, steps: list[Step]):
    """(failure_step, prefix_chars, detail) from a locator model's answer about a response cut
    into `steps`, or a Rejection when it names no valid step: `<step>k</step>`, else the first
    "step k" phrase (the detail says which form)."""
    m, form = STEP_TAG.search(answer), "tag"
    if m is None:
        m, form = _STEP_PHRASE.search(answer), "phrase"
    if m is None:
        return Rejection("locator_unparseable", f"no <step>k</step> or \"step k\" in "
                                                f"{answer[:200]!r}")
    k = int(m.group(1))
    if not 1 <= k <= len(steps):
        return Rejection("locator_out_of_range", f"step {k} of {len(steps)}")
    return k, steps[k - 1].start, json.dumps({"answer": answer[:500], "form": form})

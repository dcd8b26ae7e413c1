"""construct: the micro-reflective trajectory for each located candidate, verified.

Reads located candidates (schema.LOCATED); writes trajectories (schema.TRAJECTORIES):
`response = prefix + diagnosis + correction`, where `prefix` is the wrong rollout's own text up
to and including the wrong step k (stages/locate.py; `prefix_token_ids`: its own tokens),
`diagnosis` starts with the transition phrase "Wait, step k is wrong: ", and `correction`
redoes step k and continues to a boxed answer.
`construction.mode=full_reconstruction` (the ablation) keeps no prefix and no diagnosis: the
correction is a whole corrected solution.

Constructors (`construction.method`):
- `rule` (arith): the diagnosis names the wrong step, the kind of error and why
  (`arith.diagnosis`: "left to right, 48 + 17 comes first, not 29 * 3."); the correction is
  the exact remaining steps. A prefix that itself contains an error (an llm locator pointed too
  late) is dropped as `prefix_has_error`.
- `llm`: a model (the policy: self-distillation; or a teacher, `construction.model`) gets the
  problem, the numbered steps, the failure step and the reference, and answers
  `<analysis>...</analysis><reconstruction>...</reconstruction>`.

Every trajectory is verified; a failure is dropped with its reason: `tags_missing` (llm answer
without both tags), `prefix_mismatch` (the prefix or its tokens differ from the rollout's),
`copied_reference` (llm: the correction contains the reference response whole; not checked for
a task whose solution is unique, `Task.unique_solutions`: arith),
`wrong_final_answer` / `no_final_answer` / `grading_failed` (the response does not grade correct).
With `construction.verify=checker` (a task with an exact step checker: arith), a trajectory that
grades correct must also pass the checker: `wrong_steps` (a step of the response is wrong, the
correction's included: a right answer reached by wrong arithmetic), `wrong_diagnosis` (the
diagnosis is not the checker's for the located step: a misreading named where a slip stands, or
a step called wrong that is right).
"""

from __future__ import annotations

import re

from pipeline.grader import Grader
from pipeline.stage import Stage, StageOutput
from pipeline.util import model_state
from stages import schema
from stages.common import (
    EngineHolder,
    ask,
    load_tokenizer,
    policy_path,
    require_rule_task,
)
from stages.tasks.base import Rejection, line_break, task_of
from stages.tasks.prompts import ANALYSIS, RECONSTRUCTION, construct_instruction

TRANSITION = "Wait, step {k} is wrong: "
TRANSITION_RE = re.compile(r"^Wait, step \d+ is wrong:\s*")  # TRANSITION, any step

_GRADE_REJECTION = {"incorrect": "wrong_final_answer", "no_answer": "no_final_answer"}


class Construct(Stage):
    name = "construct"
    version = "3"
    sections = ("task", "policy", "construction", "engine", "grader", "run")
    input_schema = schema.LOCATED
    output_schema = schema.TRAJECTORIES

    def __init__(self, config):
        super().__init__(config)
        require_rule_task(config, "construction")
        self.task = task_of(config)
        if config.construction.verify == "checker" and not self.task.has_step_checker:
            raise ValueError("construction.verify=checker needs a task with an exact step "
                             f"checker (arith); task {config.task.name!r} needs verify=answer")
        self.engine = EngineHolder(config, config.construction.model or policy_path(config))
        self.grader = Grader(self.task, config.grader.workers, config.grader.timeout_s)

    def process(self, rows):
        cfg = self.config.construction
        full = cfg.mode == "full_reconstruction"
        if cfg.method == "rule":
            built = [rule_trajectory(self.task, row, full) for row in rows]
        else:
            built = self._llm(rows, full)
        tokenizer = load_tokenizer(str(policy_path(self.config)))
        out = StageOutput()
        checked = []
        for row, parts in zip(rows, built, strict=True):
            if isinstance(parts, Rejection):
                out.drop(row, parts.reason, parts.detail)
                continue
            rejection = check_prefix(row, parts[0], tokenizer, full)
            if rejection is None and cfg.method == "llm" and not self.task.unique_solutions:
                rejection = check_not_copied(parts[2], row["reference_response"])
            if rejection is not None:
                out.drop(row, rejection.reason, rejection.detail)
            else:
                checked.append((row, parts))
        responses = ["".join(parts) for _, parts in checked]
        verdicts = self.grader.grade(responses, [row["answer"] for row, _ in checked])
        for (row, (prefix, diagnosis, correction)), response, v in zip(checked, responses,
                                                                       verdicts):
            if v.label != "correct":
                out.drop(row, _GRADE_REJECTION.get(v.label, "grading_failed"), v.reason)
                continue
            if cfg.verify == "checker":
                rejection = check_exactly(self.task, row, (prefix, diagnosis, correction), full)
                if rejection is not None:
                    out.drop(row, rejection.reason, rejection.detail)
                    continue
            out.keep({
                "trajectory_id": f"{row['wrong_rollout_id']}/{'full' if full else 'tapo'}",
                "problem_id": row["problem_id"], "problem": row["problem"],
                "answer": row["answer"], "prompt": row["prompt"],
                "source_rollout_id": row["wrong_rollout_id"],
                "reference_rollout_id": row["reference_rollout_id"], "mode": cfg.mode,
                "constructor": cfg.method, "failure_step": row["failure_step"],
                "prefix": prefix, "diagnosis": diagnosis, "correction": correction,
                "response": response,
                "prefix_token_ids": [] if full else row["wrong_token_ids"][: row["prefix_tokens"]],
            })
        return out

    def _llm(self, rows, full: bool):
        cfg = self.config.construction
        split = self.task.split_steps
        answers = ask(self.engine, [construct_instruction(
            r["failure_step"], r["problem"], split(r["wrong_response"]),
            split(r["reference_response"]), cfg.mode) for r in rows],
            cfg.temperature, cfg.max_tokens, self.config.run.seed)
        return [llm_trajectory(r, a, full, self.task) for r, a in zip(rows, answers, strict=True)]

    @classmethod
    def models_state(cls, config):
        return {"model": model_state(config.construction.model or policy_path(config))}

    @classmethod
    def runs_model(cls, config):
        return config.construction.method == "llm"

    def close(self):
        self.engine.close()
        self.grader.close()


def rule_trajectory(task, row, full: bool):
    """(prefix, diagnosis, correction) built by the task's exact step checker, or a
    Rejection."""
    prefix = "" if full else row["wrong_response"][: row["prefix_chars"]]
    steps = task.split_steps(row["wrong_response"])
    failed = steps[row["failure_step"] - 1] if row["failure_step"] <= len(steps) else None
    return task.repair(row["problem"], prefix, failed, full)


def llm_trajectory(row, answer: str, full: bool, task):
    """(prefix, diagnosis, correction) from a constructor model's tagged answer, or a
    Rejection when either tag is missing or empty. The transition names the located step as
    the task numbers it (Task.step_number), as the rule path's reflection does."""
    analysis, reconstruction = ANALYSIS.search(answer), RECONSTRUCTION.search(answer)
    if not (analysis and analysis.group(1).strip() and reconstruction
            and reconstruction.group(1).strip()):
        return Rejection("tags_missing", f"need <analysis> and <reconstruction>: {answer[:200]!r}")
    correction = reconstruction.group(1).strip()
    if full:
        return "", "", correction
    prefix = row["wrong_response"][: row["prefix_chars"]]
    k = task.step_number(row["problem"], row["wrong_response"], row["failure_step"])
    diagnosis = (line_break(prefix) + TRANSITION.format(k=k)
                 + analysis.group(1).strip() + "\n")
    return prefix, diagnosis, correction


def check_prefix(row, prefix: str, tokenizer, full: bool) -> Rejection | None:
    """The prefix must be the rollout's own text and tokens, byte for byte."""
    if full:
        return None if prefix == "" else Rejection("prefix_mismatch", "full mode keeps no prefix")
    ids = row["wrong_token_ids"][: row["prefix_tokens"]]
    if prefix != row["wrong_response"][: row["prefix_chars"]]:
        return Rejection("prefix_mismatch", "the prefix is not the rollout's text")
    if tokenizer.decode(ids, skip_special_tokens=True) != prefix:
        return Rejection("prefix_mismatch", "the prefix tokens do not decode to the prefix")
    return None


def check_exactly(task, row, parts: tuple[str, str, str], full: bool) -> Rejection | None:
    """`construction.verify=checker`: the trajectory `parts` (prefix, diagnosis, correction) of
    a located candidate `row` read by the task's exact step checker: every step right (a
    reflection forgives the line it names) and the diagnosis the checker's own for the located
    step, word for word after "is wrong: " (none in full mode)."""
    error = task.locate_failure(row["problem"], "".join(parts))
    if not isinstance(error, Rejection):
        return Rejection("wrong_steps", f"line {error[0]} of the trajectory: {error[2]}")
    if full:
        return None
    exact = rule_trajectory(task, row, full=False)
    if isinstance(exact, Rejection):
        return Rejection("wrong_diagnosis", f"{exact.reason}: {exact.detail}")
    said, due = (d.strip().split(" is wrong: ", 1)[-1] for d in (parts[1], exact[1]))
    if said != due:
        return Rejection("wrong_diagnosis", f"said {said[:200]!r}, the checker {due!r}")
    return None


def check_not_copied(correction: str, reference: str) -> Rejection | None:
    """Rejects a correction that contains the whole reference response (whitespace aside)."""
    ref = re.sub(r"\s+", "", reference)
    if ref and ref in re.sub(r"\s+", "", correction):
        return Rejection("copied_reference", "the correction contains the whole reference")
    return None

"""sft_examples: the cold-start mixture of self-error-analysis (SFT) and instruction-following
(IF) examples, from the constructed trajectories.

Reads the trajectories (schema.TRAJECTORIES), all at once, and the located candidates they came
from (side input `located`: the full wrong response and the reference); writes the mixture
(schema.SFT_EXAMPLES), which OpenRLHF's `train_sft` reads as is (input_key `prompt`,
output_key `response`, input_template ""). Our reading of PAPER.md:

- SFT: prompt = the task prompt + the kept wrong prefix (context, as in the RL loss), response =
  the diagnosis + the corrected reasoning: the model learns to stop, name the wrong step and fix it.
- direct: prompt = the task prompt, response = the base model's own correct response to the
  problem (the candidate's reference, when it is a rollout): a `coldstart.direct_share` of the
  SFT share, so that the model keeps solving directly and reflects only after an error. Without
  them the testbed model learns to open every answer with "Wait" (pass@1 0.57 -> 0.00).
- IF: prompt = the construction instruction (stages/construct.py) for the same wrong response,
  rendered exactly as construction's llm path sends it to the policy (`instruction_prompt`),
  response = `<analysis>diagnosis</analysis>\\n<reconstruction>correction</reconstruction>`: the
  model learns to answer the instruction it is given in RL's self-construction in reliable tags.

The mixture is (SFT + direct) : IF = 1 : `coldstart.if_ratio` (0.5: the paper's 30k : 15k; 0:
no IF, a control), at most `coldstart.size` examples: SFT + direct up to 1 / (1 + if_ratio) of
the size, IF `if_ratio` times as many, each drawn with `coldstart.seed` when there are more.
Drops, one row per example: `duplicate` (same prompt and response as a kept one), `over_quota`
(beyond its share of the size), `no_analysis` (IF from a trajectory without a diagnosis: full
reconstruction), `no_located_row` (the side input lacks the source).
"""

from __future__ import annotations

import random

from pipeline.engines import render_prompt
from pipeline.stage import Stage, StageOutput
from stages import schema
from stages.common import instruction_prompt, load_tokenizer, policy_path, valid_unique
from stages.construct import TRANSITION_RE
from stages.tasks.base import split_steps, task_of
from stages.tasks.prompts import construct_answer, construct_instruction

SFT, DIRECT, IF = "sft", "direct", "if"


class SftExamples(Stage):
    name = "sft_examples"
    version = "4"
    sections = ("task", "coldstart", "policy")
    input_schema = schema.TRAJECTORIES
    output_schema = schema.SFT_EXAMPLES
    whole_input = True
    side_inputs = ("located",)
    row_fallback = False

    def process(self, rows):
        cfg = self.config.coldstart
        located = {r["wrong_rollout_id"]: r for r in self.side["located"]}
        tokenizer = load_tokenizer(str(policy_path(self.config)))
        task = task_of(self.config)
        out = StageOutput()
        sft, direct, instruct = [], [], []
        for t in sorted(rows, key=lambda t: t["trajectory_id"]):
            sft.append(sft_example(t))
            source = located.get(t["source_rollout_id"])
            if source is None:
                out.drop(_stub(t, IF), "no_located_row", f"{t['source_rollout_id']} not located")
                continue
            if source["reference_rollout_id"] != "solution":
                direct.append(direct_example(source, t))
            if not t["diagnosis"].strip():
                out.drop(_stub(t, IF), "no_analysis", "the trajectory has no diagnosis")
            else:
                instruct.append(if_example(source, t, tokenizer, task.split_steps))
        sft, direct, instruct = (valid_unique(
            pool, key=lambda e: (e["prompt"], e["response"]), valid=lambda e: True, out=out,
            bad=("", ""), duplicate="duplicate") for pool in (sft, direct, instruct))
        n_all = int(cfg.size / (1 + cfg.if_ratio))  # the SFT share: reflective + direct
        direct_quota = round(n_all * cfg.direct_share)  # a short part is not filled up
        n_sft = min(len(sft), n_all - direct_quota)
        n_direct = min(len(direct), direct_quota)
        n_if = min(len(instruct), int((n_sft + n_direct) * cfg.if_ratio))
        rng = random.Random(cfg.seed)
        for pool, n in ((sft, n_sft), (direct, n_direct), (instruct, n_if)):
            keep = set(rng.sample(range(len(pool)), n))
            for i, example in enumerate(pool):
                if i in keep:
                    out.keep(example)
                else:
                    out.drop(example, "over_quota", f"beyond {n} {example['source']} examples")
        return out


def sft_example(t: dict) -> dict:
    """A trajectory as a self-error-analysis example: the prefix is context, not trained."""
    return {"example_id": f"{t['trajectory_id']}/{SFT}", "source": SFT,
            "problem_id": t["problem_id"], "prompt": t["prompt"] + t["prefix"],
            "response": t["diagnosis"] + t["correction"]}


def direct_example(located: dict, t: dict) -> dict:
    """The base model's own correct response (the candidate's reference) to the same problem:
    it keeps the cold-start model solving directly where it makes no error."""
    return {"example_id": f"{located['reference_rollout_id']}/{DIRECT}", "source": DIRECT,
            "problem_id": t["problem_id"], "prompt": t["prompt"],
            "response": located["reference_response"]}


def if_example(located: dict, t: dict, tokenizer, split=split_steps) -> dict:
    """The construction instruction for the located wrong response, as the policy reads it in
    construction, answered in the tags."""
    instruction = render_prompt(instruction_prompt(construct_instruction(
        t["failure_step"], t["problem"], split(located["wrong_response"]),
        split(located["reference_response"]), t["mode"]), tokenizer), tokenizer)
    analysis = TRANSITION_RE.sub("", t["diagnosis"].strip(), count=1).strip()
    answer = construct_answer(analysis, t["correction"])
    return {"example_id": f"{t['trajectory_id']}/{IF}", "source": IF,
            "problem_id": t["problem_id"], "prompt": instruction, "response": answer}


def _stub(t: dict, source: str) -> dict:
    return {"example_id": f"{t['trajectory_id']}/{source}", "source": source,
            "problem_id": t["problem_id"]}

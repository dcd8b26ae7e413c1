"""sample: G rollouts per problem from the policy, through any engine.

Reads problems (`problem_id`, `problem`, `answer`); writes one row per rollout (schema.ROLLOUTS)
with `rollout_id = problem_id/k` and the token ids as sampled. A problem row without an id or
text is dropped as `bad_problem`, a repeated id as `duplicate_problem`.
"""

from __future__ import annotations

from pipeline.engines import SamplingParams, render_prompt
from pipeline.runner import Stage, StageOutput
from pipeline.util import model_state
from stages import schema
from stages.common import (
    EngineHolder,
    load_tokenizer,
    policy_path,
    task_prompt,
    tiebreak,
    valid_unique,
)


class Sample(Stage):
    name = "sample"
    sections = ("run", "task", "testbed", "policy", "rollout", "engine")
    input_schema = schema.PROBLEMS
    output_schema = schema.ROLLOUTS

    def __init__(self, config):
        super().__init__(config)
        self.engine = EngineHolder(config, policy_path(config))

    def process(self, rows):
        out = StageOutput()
        problems = valid_unique(
            rows, key=lambda r: r["problem_id"],
            valid=lambda r: bool(r.get("problem_id") and r.get("problem"))
            and r.get("answer") is not None,
            out=out, bad=("bad_problem", "problem_id, problem and answer are required"),
            duplicate="duplicate_problem")
        if not problems:
            return out
        cfg = self.config.rollout
        tokenizer = load_tokenizer(str(policy_path(self.config)))
        prompts = [render_prompt(task_prompt(self.config, r["problem"]), tokenizer)
                   for r in problems]
        params = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
            seed=tiebreak(self.config.run.seed, problems[0]["problem_id"]) % 2**31,
        )
        groups = self.engine.get().generate(prompts, cfg.group_size, params)
        for row, prompt, group in zip(problems, prompts, groups, strict=True):
            for k, c in enumerate(group):
                out.keep({
                    "problem_id": row["problem_id"], "problem": row["problem"],
                    "answer": str(row["answer"]), "rollout_id": f"{row['problem_id']}/{k}",
                    "sample_index": k, "prompt": prompt, "response": c.text,
                    "response_token_ids": c.token_ids, "finish_reason": c.finish_reason,
                    "response_len": c.length,
                })
        return out

    @classmethod
    def models_state(cls, config):
        return {"model": model_state(policy_path(config))}

    def close(self):
        self.engine.close()

"""sample: G rollouts per problem from the policy, through any engine.

Reads problems (`problem_id`, `problem`, `answer`); writes one row per rollout (schema.ROLLOUTS)
with `rollout_id = problem_id/k`, the token ids as sampled and the prompt's ids as the engine fed
them (the trainer trains on exactly those). Sample k of a problem is seeded by (run.seed,
problem_id, k) where the engine takes per-request seeds (vLLM, an OpenAI-compatible server);
the hf engine seeds per batch (docs/engines.md). A problem
row without an id or text is dropped as `bad_problem`, a repeated id as `duplicate_problem`.
"""

from __future__ import annotations

from pipeline.engines import SamplingParams, render_prompt
from pipeline.stage import Stage, StageOutput
from pipeline.util import model_state
from stages import schema
from stages.common import (
    EngineHolder,
    load_tokenizer,
    policy_path,
    tiebreak,
    valid_unique,
)
from stages.tasks import task_of


class Sample(Stage):
    name = "sample"
    version = "2"
    sections = ("run", "task", "policy", "rollout", "engine")
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
        cfg, seed = self.config.rollout, self.config.run.seed
        tokenizer = load_tokenizer(str(policy_path(self.config)))
        task = task_of(self.config)
        prompts = [task.prompt(r["problem"]) for r in problems]
        params = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
            seed=tiebreak(seed, problems[0]["problem_id"]) % 2**31,
        )
        seeds = [[request_seed(seed, r["problem_id"], k) for k in range(cfg.group_size)]
                 for r in problems]
        groups = self.engine.get().generate(prompts, cfg.group_size, params, seeds=seeds)
        for row, prompt, group in zip(problems, prompts, groups, strict=True):
            text = render_prompt(prompt, tokenizer)
            for k, c in enumerate(group):
                if not c.prompt_token_ids:
                    raise ValueError(f"the {self.engine.get().name} engine did not say which "
                                     "prompt token ids it used (openai: a vLLM server, or a "
                                     "local model path for its tokenizer)")
                out.keep({
                    "problem_id": row["problem_id"], "problem": row["problem"],
                    "answer": str(row["answer"]), "rollout_id": f"{row['problem_id']}/{k}",
                    "sample_index": k, "prompt": text,
                    "prompt_token_ids": c.prompt_token_ids, "response": c.text,
                    "response_token_ids": c.token_ids, "finish_reason": c.finish_reason,
                    "response_len": c.length,
                })
        return out

    @classmethod
    def models_state(cls, config):
        return {"model": model_state(policy_path(config))}

    def close(self):
        self.engine.close()


def request_seed(seed: int, problem_id: str, k: int) -> int:
    """The seed of sample k of a problem: the same whatever the shard, batch or group size."""
    return tiebreak(seed, f"{problem_id}/{k}") % 2**31

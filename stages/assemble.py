"""assemble: the training shard: the on-policy rollouts plus the augmented trajectories.

Reads classified rollouts shard by shard, and the constructed trajectories whole (side input
`trajectories`; absent for plain GRPO). Writes schema.TRAINING: the shard's rollouts as sampled
(their prompt ids as the engine fed them), then the trajectory built for each of its groups, if
any, under its group's prompt ids. The trajectory's new text is tokenized
here, once: `response_token_ids` = the rollout's own prefix tokens + tokens(diagnosis) +
tokens(correction) + EOS, with `prefix_len`, `diagnosis_len`, `correction_len` giving the three
segments (they add up to the length; a rollout is all `correction`). An augmented row has
reward 1 (it was verified correct) and the group's on-policy `group_size` and `pass_rate`.
A trajectory whose tokens do not decode back to its text is dropped as `tokenization_mismatch`.
"""

from __future__ import annotations

from pipeline.stage import Stage, StageOutput
from stages import schema
from stages.common import load_tokenizer, policy_path


class Assemble(Stage):
    name = "assemble"
    version = "2"
    sections = ("policy",)
    input_schema = schema.CLASSIFIED
    output_schema = schema.TRAINING
    side_inputs = ("trajectories",)
    row_fallback = False

    def process(self, rows):
        tokenizer = load_tokenizer(str(policy_path(self.config)))
        trajectories = {t["problem_id"]: t for t in self.side["trajectories"]}
        groups: dict[str, dict] = {}
        out = StageOutput()
        for r in rows:
            groups.setdefault(r["problem_id"], r)
            n = len(r["response_token_ids"])
            out.keep({
                "sample_id": r["rollout_id"], "kind": "rollout", "problem_id": r["problem_id"],
                "answer": r["answer"],
                "prompt": r["prompt"], "prompt_token_ids": r["prompt_token_ids"],
                "response": r["response"], "response_token_ids": r["response_token_ids"],
                "reward": r["reward"], "label": r["label"], "finish_reason": r["finish_reason"],
                "group_size": r["group_size"], "pass_rate": r["pass_rate"],
                "prefix_len": 0, "diagnosis_len": 0, "correction_len": n,
                "source_rollout_id": None, "failure_step": None,
            })
        for pid, group in groups.items():
            t = trajectories.get(pid)
            if t is None:
                continue
            diagnosis = tokenizer(t["diagnosis"], add_special_tokens=False)["input_ids"]
            correction = tokenizer(t["correction"], add_special_tokens=False)["input_ids"]
            ids = list(t["prefix_token_ids"]) + diagnosis + correction + [tokenizer.eos_token_id]
            if tokenizer.decode(ids, skip_special_tokens=True) != t["response"]:
                out.drop(t, "tokenization_mismatch", "the tokens do not decode to the response")
                continue
            out.keep({
                "sample_id": t["trajectory_id"], "kind": "augmented", "problem_id": pid,
                "answer": group["answer"],
                "prompt": group["prompt"], "prompt_token_ids": group["prompt_token_ids"],
                "response": t["response"], "response_token_ids": ids, "reward": 1.0,
                "label": "correct", "finish_reason": "stop", "group_size": group["group_size"],
                "pass_rate": group["pass_rate"], "prefix_len": len(t["prefix_token_ids"]),
                "diagnosis_len": len(diagnosis), "correction_len": len(correction) + 1,
                "source_rollout_id": t["source_rollout_id"], "failure_step": t["failure_step"],
            })
        return out

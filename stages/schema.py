"""The shard schemas of the TAPO stages, in pipeline order. docs/stages.md documents each column.

Ids: `problem_id`; `rollout_id = problem_id/k` (k = sample index); `trajectory_id =
rollout_id/tapo` (or `/full` in the full-reconstruction ablation), naming the repaired rollout.
Token ids are kept as sampled (`list<int32>`), the prompt's as the engine fed them; new text
is tokenized once, in `assemble`.
"""

from __future__ import annotations

import pyarrow as pa

_IDS = pa.list_(pa.int32())


def _extend(schema: pa.Schema, *fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema(list(schema) + [pa.field(n, t) for n, t in fields])


PROBLEMS = pa.schema([("problem_id", pa.string()), ("problem", pa.string()),
                      ("answer", pa.string())])

ROLLOUTS = _extend(
    PROBLEMS,
    ("rollout_id", pa.string()),
    ("sample_index", pa.int32()),
    ("prompt", pa.string()),  # the rendered prompt text the model saw
    ("prompt_token_ids", _IDS),  # the prompt's ids exactly as the engine fed them (BOS too)
    ("response", pa.string()),
    ("response_token_ids", _IDS),  # as sampled; ends in EOS when the model stopped
    ("finish_reason", pa.string()),  # stop | length
    ("response_len", pa.int32()),
)

CLASSIFIED = _extend(
    ROLLOUTS,
    ("label", pa.string()),  # correct | incorrect | no_answer | timeout | error
    ("reason", pa.string()),
    ("extracted_answer", pa.string()),  # the last \boxed{}, null when none
    ("reward", pa.float32()),  # 1.0 iff correct
    ("group_size", pa.int32()),  # G: rollouts of this problem
    ("group_correct", pa.int32()),
    ("pass_rate", pa.float32()),  # group_correct / group_size
)

CANDIDATES = pa.schema([
    ("problem_id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
    ("prompt", pa.string()),
    ("group_size", pa.int32()), ("pass_rate", pa.float32()),
    ("rank", pa.int32()),  # 0 = selected first (the hardest)
    ("repair_rank", pa.int32()),  # 0 = the problem's first wrong rollout in select's order
    ("wrong_rollout_id", pa.string()), ("wrong_label", pa.string()),
    ("wrong_response", pa.string()), ("wrong_token_ids", _IDS),
    ("reference_rollout_id", pa.string()), ("reference_response", pa.string()),
])

LOCATED = _extend(
    CANDIDATES,
    ("n_steps", pa.int32()),  # non-empty lines of the wrong response
    ("failure_step", pa.int32()),  # 1-based; n_steps + 1 when the response stops too early
    ("prefix_chars", pa.int32()),  # the kept prefix is wrong_response[:prefix_chars]
    ("prefix_tokens", pa.int32()),  # ... and wrong_token_ids[:prefix_tokens] decodes to it
    ("locator", pa.string()),  # rule | llm
    ("locate_detail", pa.string()),
)

TRAJECTORIES = pa.schema([
    ("trajectory_id", pa.string()), ("problem_id", pa.string()), ("problem", pa.string()),
    ("answer", pa.string()), ("prompt", pa.string()),
    ("source_rollout_id", pa.string()), ("reference_rollout_id", pa.string()),
    ("mode", pa.string()),  # prefix | full_reconstruction
    ("constructor", pa.string()),  # rule | llm
    ("failure_step", pa.int32()),
    ("prefix", pa.string()), ("diagnosis", pa.string()), ("correction", pa.string()),
    ("response", pa.string()),  # prefix + diagnosis + correction
    ("prefix_token_ids", _IDS),  # the rollout's own tokens for `prefix`
])

TRAINING = pa.schema([
    ("sample_id", pa.string()),  # rollout_id or trajectory_id
    ("kind", pa.string()),  # rollout | augmented
    ("problem_id", pa.string()),  # the group: a problem's G rollouts and its trajectory
    ("answer", pa.string()),  # the reference answer
    ("prompt", pa.string()), ("prompt_token_ids", _IDS),
    ("response", pa.string()), ("response_token_ids", _IDS),
    ("reward", pa.float32()), ("label", pa.string()), ("finish_reason", pa.string()),
    ("group_size", pa.int32()), ("pass_rate", pa.float32()),  # of the on-policy group
    # segments of response_token_ids, in order; they add up to its length. A rollout is all
    # correction (every token is the policy's own and trained on).
    ("prefix_len", pa.int32()), ("diagnosis_len", pa.int32()), ("correction_len", pa.int32()),
    ("source_rollout_id", pa.string()),  # augmented: the repaired rollout; else null
    ("failure_step", pa.int32()),  # augmented: the located step; else null
])

# The cold-start mixture, read as is by OpenRLHF's train_sft (input_key=prompt,
# output_key=response, input_template=""): the loss covers `response` only.
SFT_EXAMPLES = pa.schema([
    ("example_id", pa.string()),  # trajectory_id + "/sft" or "/if"; rollout_id + "/direct"
    ("source", pa.string()),  # sft (self-error analysis) | direct (own correct) | if (instr.)
    ("problem_id", pa.string()),
    ("prompt", pa.string()),  # sft: task prompt + kept wrong prefix; direct: task prompt; if:
    # the construction instruction
    ("response", pa.string()),  # sft: diagnosis + correction; direct: the base's correct answer;
    # if: <analysis>..</analysis> <reconstruction>..</reconstruction>
])

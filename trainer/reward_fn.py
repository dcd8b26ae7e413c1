"""OpenRLHF's reward hook (`--reward.remote_url trainer/reward_fn.py`): reward 1.0 when the
response's last \\boxed{} answer grades correct against the label (our math grader: the fast
exact path, then math-verify under a hard timeout), else 0.0."""

from __future__ import annotations

import torch

from pipeline.grader import Grader


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF's contract: queries are prompt + response texts; returns rewards, scores (the
    same, 0/1) and extra logs (here none)."""
    responses = [q[len(p):] if q.startswith(p) else q for q, p in zip(queries, prompts)]
    with Grader("math", workers=1, timeout_s=5.0) as grader:
        verdicts = grader.grade(responses, [str(label) for label in labels])
    rewards = torch.tensor([float(v.label == "correct") for v in verdicts])
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

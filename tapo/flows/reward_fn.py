"""OpenRLHF's reward hook (`--reward.remote_url tapo/flows/reward_fn.py`): reward 1.0 when
the response's last \\boxed{} answer grades correct against the label by the task of the run's
tapo config ($TAPO_CONFIG; math: the fast exact path, then math-verify under a hard timeout),
else 0.0."""

from __future__ import annotations

import torch

from pipeline.grader import Grader
from stages.tasks import task_of
from trainer.openrlhf_adapter import tapo_config


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF's contract: queries are prompt + response texts; returns rewards, scores (the
    same, 0/1) and extra logs (here none)."""
    responses = [q[len(p):] if q.startswith(p) else q for q, p in zip(queries, prompts)]
    cfg = tapo_config()
    with Grader(task_of(cfg), workers=1, timeout_s=cfg.grader.timeout_s) as grader:
        verdicts = grader.grade(responses, [str(label) for label in labels])
    rewards = torch.tensor([float(v.label == "correct") for v in verdicts])
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

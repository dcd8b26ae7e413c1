"""Online TAPO: OpenRLHF's own loop (vLLM sampling, Ray, DeepSpeed) with our stages inside
each PPO step. OpenRLHF samples G rollouts per prompt and rewards them (tapo/flows/
reward_fn.py); `OnlineTapoTrainer.augment` runs the ONLINE chain (select -> locate ->
pick_repair -> construct -> assemble, tapo/flows/chains.py) on them in memory, the same
stages as `tapo round` (llm locators and constructors use the configured `engine`), and hands
the accepted trajectories to trainer/openrlhf_adapter.py as Experiences.

Launch (GPU cluster, `pip install -e '.[gpu]'`; TAPO settings from a tapo config file):

    TAPO_CONFIG=configs/my-run.yaml python -m tapo.flows.online \\
        --actor.model_name_or_path /models/Qwen3-8B --data.prompt_dataset data/train.parquet \\
        --data.input_key prompt --data.label_key answer --rollout.n_samples_per_prompt 8 \\
        --algo.advantage.estimator group_norm --actor.eps_clip_low_high 0.2 0.28 \\
        --algo.kl.init_coef 0 --reward.remote_url tapo/flows/reward_fn.py ...

(every flag is OpenRLHF's own `train_ppo_ray` flag).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.chain import run_chain_in_memory
from pipeline.config import Config
from stages.tasks import task_of
from tapo.flows.chains import ONLINE
from trainer import openrlhf_adapter as adapter


def rollout_rows(samples: Sequence, n: int, tokenizer, step: int, cfg: Config) -> list[dict]:
    """OpenRLHF's rollouts (batch-of-one Experiences, n consecutive per prompt, rewarded) as
    our classified rollout rows (stages/schema.CLASSIFIED): label correct iff reward > 0.5; the
    problem is the one inside the prompt (Task.problem_from_prompt)."""
    task = task_of(cfg)
    rows = []
    for i, s in enumerate(samples):
        g, k = divmod(i, n)
        group = samples[g * n : (g + 1) * n]
        correct = sum(float(x.rewards[0]) > 0.5 for x in group)
        mask = s.action_mask[0].bool()
        ids = s.sequences[0][1:][mask].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        prompt_len = int(torch.nonzero(mask)[0]) + 1
        ok = float(s.rewards[0]) > 0.5
        rows.append({
            "problem_id": f"step{step}-g{g}", "answer": str(s.labels[0]),
            "problem": task.problem_from_prompt(s.prompts[0]),
            "rollout_id": f"step{step}-g{g}/{k}", "sample_index": k,
            "prompt": tokenizer.decode(s.sequences[0][:prompt_len].tolist()),
            "prompt_token_ids": s.sequences[0][:prompt_len].tolist(),
            "response": text, "response_token_ids": ids,
            "finish_reason": "length" if bool(s.truncated[0]) else "stop",
            "response_len": len(ids), "label": "correct" if ok else "incorrect",
            "reason": "reward", "extracted_answer": None, "reward": float(ok), "group_size": n,
            "group_correct": correct, "pass_rate": correct / n})
    return rows


def augmented_experiences(samples, n: int, tokenizer, cfg: Config, step: int,
                          stages: dict | None = None) -> list:
    """Runs the ONLINE chain on OpenRLHF's rollouts; returns the accepted trajectories as
    Experiences tagged with their source group. `stages` keeps the built stages (and so the
    locate and construct engines) from one step to the next; without it they are built and
    closed here. The llm locator and constructor run a fixed model: `locate.model` /
    `construction.model` (a teacher), else the run's initial checkpoint, not the step's current
    policy (OpenRLHF's vLLM engines are not shared with them)."""
    rows = rollout_rows(samples, n, tokenizer, step, cfg)
    out = run_chain_in_memory(ONLINE, cfg, {"classify": rows}, stages)
    keys = list(samples[0].info) if samples else []
    return [adapter.experience_from_row(r, int(r["problem_id"].rsplit("-g", 1)[1]), keys)
            for r in out["assemble"] if r["kind"] == "augmented"]  # (prompt ids: the group's)


class OnlineTapoTrainer(adapter.TapoPPOTrainer):
    """OpenRLHF's PPO trainer whose steps add the trajectories our stages build."""

    tapo_stages: dict | None = None  # built on the first step; their engines live on

    def augment(self, rollout_samples, global_step):
        if self.tapo_stages is None:
            self.tapo_stages = {}
        return augmented_experiences(rollout_samples, self.args.rollout.n_samples_per_prompt,
                                     self.tokenizer, self.tapo_cfg, global_step, self.tapo_stages)


def main(argv: Sequence[str] | None = None) -> None:
    """OpenRLHF's `train_ppo_ray` with `OnlineTapoTrainer`; every flag is OpenRLHF's."""
    adapter.main(argv, OnlineTapoTrainer)


if __name__ == "__main__":
    main()

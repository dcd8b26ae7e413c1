"""The policy update of a round, by the backend the config names (`train.backend`):

    metrics = train_round(policy_dir, shard_dir, out_dir, cfg, reference=initial_policy)

`local`: trainer/rl.py, one process (CPU or one GPU). `openrlhf`: trainer/openrlhf_shard.py,
OpenRLHF's actor, loss and DeepSpeed strategy in processes started by DeepSpeed's launcher.
Both read the same shard, write the same checkpoint layout (HF model, `train_log.jsonl`,
`_SUCCESS` with the round's metrics) and are no-ops when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config


def train_round(policy_dir: str | Path, shard_dir: str | Path, out_dir: str | Path, cfg: Config,
                progress: bool = True, reference: str | Path | None = None) -> dict[str, Any]:
    if cfg.train.backend == "openrlhf":
        from trainer.openrlhf_shard import train_round as train
    else:
        from trainer.rl import train_round as train
    return train(policy_dir, shard_dir, out_dir, cfg, progress=progress, reference=reference)

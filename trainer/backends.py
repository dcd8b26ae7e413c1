"""The policy update of a round, by the backend the config names (`train.backend`):

    metrics = train_round(policy_dir, shard_dir, out_dir, cfg, reference=initial_policy)

`local`: trainer/rl.py, one process (CPU or one GPU). `openrlhf`: trainer/openrlhf_shard.py,
OpenRLHF's actor, loss and DeepSpeed strategy in processes started by DeepSpeed's launcher.
Both read the same shard, write the same checkpoint layout (HF model, `train_log.jsonl`,
`_SUCCESS` with the round's metrics) and are no-ops when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.layout import DS_STATE


def train_round(policy_dir: str | Path, shard_dir: str | Path, out_dir: str | Path, cfg: Config,
                progress: bool = True, reference: str | Path | None = None) -> dict[str, Any]:
    if cfg.train.backend == "openrlhf":
        from trainer.openrlhf_shard import train_round as train
    else:
        from trainer.rl import train_round as train
    return train(policy_dir, shard_dir, out_dir, cfg, progress=progress, reference=reference)


def train_sft(base_dir: str | Path, examples_dir: str | Path, out_dir: str | Path, cfg: Config,
               progress: bool = True) -> dict[str, Any]:
    """The cold-start SFT (`local`: trainer/sft.py; `openrlhf`: trainer/openrlhf_sft.py, OpenRLHF's
    train_sft); both write the HF model, `sft_log.jsonl` and `_SUCCESS` with the metrics."""
    if cfg.train.backend == "openrlhf":
        from trainer.openrlhf_sft import train_sft as train
    else:
        from trainer.sft import train_sft as train
    return train(base_dir, examples_dir, out_dir, cfg, progress=progress)


def prune_optimizer_state(checkpoint: str | Path) -> None:
    """Removes a round's DeepSpeed state (`_ds/`: weights and Adam moments, about 16 bytes a
    parameter, 130 GB for an 8B model) once the next round has trained from it: a run keeps
    its last round's state only, which the next round (or a longer `iterate`) starts from."""
    state = Path(checkpoint) / DS_STATE
    if state.is_dir():
        shutil.rmtree(state)

"""The run folder and the testbed folder: the one module that builds paths inside them.

    RUN_DIR/config.yaml              the resolved config of the run
    RUN_DIR/iter_KKKK/<stage>/       round K's stage directories (pipeline/runner.py)
    RUN_DIR/iter_KKKK/round.json     round K's summary (tapo/flows/round.py)
    RUN_DIR/models/iter_KKKK/        the checkpoint round K trains (trainer/), with
                                     train_log.jsonl: one line per optimizer step
    RUN_DIR/metrics.csv              one row per complete round (tapo/flows/iterate.py)
    RUN_DIR/steps.csv                one row per optimizer step of every complete round
    RUN_DIR/tensorboard/, wandb/     the trackers' files (run.trackers; tapo/flows/tracking.py)
    RUN_DIR/tracking.json            the last round each tracker was sent

    TESTBED/data/<split>.parquet     the testbed's problems: pretrain, train, heldout
    TESTBED/model/                   the testbed base model
    TESTBED/build.json, _SUCCESS     how it was built; written last
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
ROUND_SUMMARY = "round.json"
METRICS = "metrics.csv"
STEPS = "steps.csv"
TRAIN_LOG = "train_log.jsonl"
OPTIMIZER = "optimizer.pt"  # a checkpoint's Adam moments (the local trainer's layout)
DS_STATE = "_ds"  # a checkpoint's DeepSpeed state: weights + optimizer (the OpenRLHF trainer)
TRACKING = "tracking.json"


def iter_dir(run_dir: str | Path, iteration: int) -> Path:
    """Round K's stage directories."""
    return Path(run_dir) / f"iter_{iteration:04d}"


def round_summary(run_dir: str | Path, iteration: int) -> Path:
    return iter_dir(run_dir, iteration) / ROUND_SUMMARY


def checkpoint_dir(run_dir: str | Path, iteration: int) -> Path:
    """The checkpoint round K trains (and round K+1 samples from)."""
    return Path(run_dir) / "models" / f"iter_{iteration:04d}"


def testbed_split(base_dir: str | Path, split: str) -> Path:
    """The testbed's problems of one split: pretrain, train or heldout."""
    return Path(base_dir) / "data" / f"{split}.parquet"


def testbed_model(base_dir: str | Path) -> Path:
    return Path(base_dir) / "model"

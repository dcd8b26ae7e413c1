"""`make iterate`: N rounds of sample -> ... -> assemble -> train, each from the last checkpoint.

    iterate(run_dir, rounds=10, cfg=cfg)

Round K runs the stages into RUN_DIR/iter_KKKK (flows/round.py) with the checkpoint of round
K-1 (round 1: the run's initial policy, `policy.path`, else the cold-start checkpoint when
complete, else the base model), trains on the
round's shard (trainer/rl.py; with `algo.kl_coef > 0` the KL reference is round 1's policy)
into RUN_DIR/models/iter_KKKK, and rewrites RUN_DIR/metrics.csv:
one row per completed round (pass rate, candidates, accepted constructions, augmented share,
loss, clip fraction, entropy, grad norm, suppressed share, reflection rate, response length,
seconds per stage), and sends the round to the trackers of `run.trackers` (flows/tracking.py).
Everything is resumable: a killed run re-run continues from the last complete stage, or inside
training from the last saved step. The engines are kept from round to round
(engines.kept_engine): each round's checkpoint is loaded into the running vLLM engine, on CPU;
on a GPU machine they are ended before training (free_gpus_for_training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.completion import DONE
from pipeline.config import Config, write_resolved
from pipeline.engines import release_engine
from pipeline.layout import CONFIG, METRICS, checkpoint_dir, iter_dir, round_summary
from pipeline.ray_executor import release_workers
from tapo.flows.round import resolve_policy, run_round
from tapo.flows.tracking import Trackers
from trainer.backends import prune_optimizer_state, train_round

STAGE_SECONDS = ("sample", "classify", "select", "locate", "construct", "assemble", "train")


def iterate(run_dir: str | Path, rounds: int, cfg: Config, progress: bool = True,
            on_round=None) -> pd.DataFrame:
    """Runs rounds 1..`rounds` (complete ones are no-ops); returns the metrics table.
    `on_round(row)` is called after each round (the CLI prints it)."""
    run_dir = Path(run_dir)
    write_resolved(cfg, run_dir / CONFIG)
    resolve_policy(run_dir, 1, cfg, build_base=True)  # (the testbed base, when it is the start)
    with Trackers(run_dir, cfg) as trackers:
        for k in range(1, rounds + 1):
            summary = run_round(run_dir, k, cfg, progress=progress)
            initial = summary["policy"] if k == 1 else json.loads(
                round_summary(run_dir, 1).read_text())["policy"]
            free_gpus_for_training(cfg)
            train_round(summary["policy"], iter_dir(run_dir, k) / "assemble",
                        checkpoint_dir(run_dir, k), cfg, progress=progress, reference=initial)
            if k > 1:
                prune_optimizer_state(checkpoint_dir(run_dir, k - 1))
            table = write_metrics(run_dir)
            trackers.update(table)
            if on_round is not None:
                on_round(table[table["round"] == k].iloc[0].to_dict())
    return read_metrics(run_dir, rounds)


def free_gpus_for_training(cfg: Config) -> None:
    """Ends the kept engines (this process's, and the Ray workers' when they hold GPUs) on a
    machine with GPUs: the trainer needs their memory. On CPU they stay for the next round,
    which loads the new checkpoint into them."""
    import torch

    if torch.cuda.is_available():
        release_engine()
    if cfg.runner.gpus_per_worker > 0:
        release_workers()


def metrics_row(run_dir: Path, k: int) -> dict[str, Any] | None:
    """Round k's row, from its round.json and its checkpoint's _SUCCESS; None if incomplete."""
    round_file = round_summary(run_dir, k)
    train_file = checkpoint_dir(run_dir, k) / DONE
    if not (round_file.exists() and train_file.exists()):
        return None
    summary = json.loads(round_file.read_text())
    train = json.loads(train_file.read_text())["metrics"]
    row = {"round": k, "algo": summary["algo"], "pass_rate": summary["pass_rate"],
           "reflection_rate": summary["reflection_rate"],
           "candidates": summary.get("candidates", 0), "accepted": summary.get("accepted", 0),
           "training_rows": summary["training_rows"], "augmented": summary["augmented"],
           "augmented_share": summary["augmented"] / max(summary["training_rows"], 1),
           "response_length": summary.get("response_length", float("nan")),
           **{k2: train[k2] for k2 in ("loss", "clip_fraction", "entropy", "grad_norm",
                                       "suppressed_share", "steps")}}
    seconds = {**summary["seconds"], "train": train["seconds"]}
    row.update({f"seconds_{s}": seconds.get(s, 0.0) for s in STAGE_SECONDS})
    return row


def write_metrics(run_dir: Path) -> pd.DataFrame:
    """Rewrites RUN_DIR/metrics.csv from every complete round (so a re-run never duplicates)."""
    rows, k = [], 1
    while (row := metrics_row(run_dir, k)) is not None:
        rows.append(row)
        k += 1
    table = pd.DataFrame(rows)
    tmp = run_dir / f".{METRICS}.tmp"
    table.to_csv(tmp, index=False)
    tmp.replace(run_dir / METRICS)
    return table


def read_metrics(run_dir: Path, rounds: int | None = None) -> pd.DataFrame:
    table = pd.read_csv(run_dir / METRICS)
    return table if rounds is None else table[table["round"] <= rounds]

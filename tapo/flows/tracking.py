"""Experiment tracking (`run.trackers`: csv, tensorboard, wandb): each complete round of a run,
its optimizer steps and the resolved config, in the trackers a researcher already uses.

    with Trackers(run_dir, cfg) as trackers:   # `make iterate` does this
        ...                                    # after each round:
        trackers.update(metrics_table)

csv: RUN_DIR/metrics.csv (iterate writes it) and RUN_DIR/steps.csv, rewritten from the run's
files. tensorboard: event files in RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR`).
wandb: a Weights & Biases run in RUN_DIR/wandb/, offline unless you are logged in (`wandb
login`; `WANDB_MODE` set by you wins); `wandb sync RUN_DIR/wandb/offline-run-*` uploads it.

Everything is on OpenRLHF's x-axis, `train/global_step` (optimizer steps over the run), under
OpenRLHF's names where the quantity is the same (STEP_NAMES, ROUND_NAMES), so a TAPO run and an
OpenRLHF run share a chart; TAPO's own quantities are `train/suppressed_share` and `round/*`
(logged at each round's last step). RUN_DIR/tracking.json keeps the last round each tracker was
sent, so a resumed run sends each round once; a tracker added to an existing run is sent every
complete round. A round half-sent when a run was killed is purged from TensorBoard
(`purge_step`) and re-sent.
"""

from __future__ import annotations

import importlib.util
import math
import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config, ConfigError
from pipeline.layout import STEPS, TRACKING
from pipeline.util import read_json, write_json_atomic
from tapo.flows.run_files import step_log

# the trainers' step log -> OpenRLHF's names (its PPO actor's status keys, logged as train/<key>)
STEP_NAMES = {"clip_fraction": "ppo_clip_ratio", "entropy": "entropy_loss",
              "grad_norm": "actor_grad_norm", "lr": "actor_lr",
              "suppressed_share": "suppressed_share", "loss_tokens": "loss_tokens",
              "seconds": "step_seconds"}
# a round's metrics.csv columns -> OpenRLHF's names: the rollouts' mean reward (rewards are 1/0,
# so it is the pass rate) and mean response length in tokens
ROUND_NAMES = {"pass_rate": "train/reward", "response_length": "train/response_length"}
ROUND_COLUMNS = ("pass_rate", "reflection_rate", "candidates", "accepted", "augmented_share",
                 "training_rows", "suppressed_share", "loss")


def step_scalars(step: dict[str, Any], kl_coef: float) -> dict[str, float]:
    """One optimizer step's scalars. The loss is OpenRLHF's `policy_loss` when there is no KL
    term; with `algo.kl_coef > 0` it includes the KL and is logged as `train/loss`."""
    out = {f"train/{name}": float(step[key]) for key, name in STEP_NAMES.items() if key in step}
    out["train/policy_loss" if kl_coef == 0 else "train/loss"] = float(step["loss"])
    return out


def round_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A round's scalars: OpenRLHF's reward and response length, and round/* for the rest."""
    out = {name: float(row[key]) for key, name in ROUND_NAMES.items() if key in row}
    out.update({f"round/{key}": float(row[key]) for key in ROUND_COLUMNS if key in row})
    out.update({f"round/{key}": float(v) for key, v in row.items()
                if key.startswith("seconds_")})
    out["round/round"] = float(row["round"])
    return {k: v for k, v in out.items() if not math.isnan(v)}


def flat_config(cfg: Config) -> dict[str, Any]:
    """`section.key` -> value (lists as text): the resolved config as hyperparameters."""
    return {f"{section}.{key}": v if isinstance(v, int | float | str | bool) else str(v)
            for section, values in cfg.model_dump(mode="json").items()
            for key, v in _flatten(values).items()}


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, v in values.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = v
    return out


class TensorBoard:
    """Event files in RUN_DIR/tensorboard/; steps >= `purge_step` from an earlier write are
    hidden (a round half-sent before a kill)."""

    def __init__(self, run_dir: Path, cfg: Config, purge_step: int, first: bool):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)
        if first:
            for summary in hparams(flat_config(cfg), {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A Weights & Biases run kept under one id for the whole run directory (resumed by later
    invocations), offline unless logged in."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str):
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else (
            "online" if wandb.login(prompt=False, verify=False) else "offline")
        self.run = wandb.init(project=cfg.run.wandb_project, name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), mode=mode, reinit="create_new")
        # a resumed run may come back with other settings (a tracker added, say): they win
        self.run.config.update(cfg.model_dump(mode="json"), allow_val_change=True)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "train/global_step": step})

    def flush(self) -> None:
        """(wandb writes in its own process)"""

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The run's trackers, open for one `iterate` call; see the module docstring."""

    def __init__(self, run_dir: str | Path, cfg: Config):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.names = list(dict.fromkeys(cfg.run.trackers))
        self.open: dict[str, TensorBoard | Wandb] = {}
        for name in self.names:
            if name != "csv" and importlib.util.find_spec(name) is None:
                raise ConfigError(f"run.trackers has {name}, but the {name} package is not "
                                  f"installed: pip install {name}")

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, table: pd.DataFrame) -> None:
        """Sends every round of `table` (metrics.csv) not yet sent to each tracker."""
        steps = step_log(self.run_dir)
        if "csv" in self.names:
            tmp = self.run_dir / f".{STEPS}.tmp"
            steps.to_csv(tmp, index=False)
            tmp.replace(self.run_dir / STEPS)
        state = read_json(self.run_dir / TRACKING) or {}
        ends = table.set_index("round")["steps"].cumsum()  # each round's last global step
        for name in (n for n in self.names if n != "csv"):
            sent = state.get(name, 0)
            todo = table[table["round"] > sent]
            if todo.empty:
                continue
            tracker = self._tracker(name, state, int(ends.get(sent, 0)) + 1, first=sent == 0)
            for row in todo.to_dict("records"):
                for step in steps[steps["round"] == row["round"]].to_dict("records"):
                    tracker.log(int(step["global_step"]),
                                step_scalars(step, self.cfg.algo.kl_coef))
                tracker.log(int(ends[row["round"]]), round_scalars(row))
                tracker.flush()
                state[name] = int(row["round"])
                write_json_atomic(self.run_dir / TRACKING, state)

    def _tracker(self, name: str, state: dict, purge_step: int, first: bool):
        if name not in self.open:
            if name == "tensorboard":
                self.open[name] = TensorBoard(self.run_dir, self.cfg, purge_step, first)
            else:
                state.setdefault("wandb_id", uuid.uuid4().hex[:12])
                write_json_atomic(self.run_dir / TRACKING, state)
                self.open[name] = Wandb(self.run_dir, self.cfg, state["wandb_id"])
        return self.open[name]

    def close(self) -> None:
        for tracker in self.open.values():
            tracker.close()
        self.open.clear()

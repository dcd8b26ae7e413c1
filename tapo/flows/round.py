"""One TAPO round: problems -> sample -> classify -> select -> locate -> pick_repair -> construct
-> assemble.

    run_round(run_dir, iteration=1, cfg=cfg)

Writes `RUN_DIR/iter_KKKK/<stage>/` for each step of the round's chain (tapo/flows/
chains.py; the layout: pipeline/layout.py, pipeline/runner.py) and `RUN_DIR/iter_KKKK/round.json`:
the policy, seconds and stats per stage, and the share of candidates that became accepted
trajectories. Every stage is resumable and a no-op when complete, so a killed round re-run
continues from the last complete stage. `algo.name=grpo`
skips select/locate/construct: the training shard holds the rollouts only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.chain import run_chain
from pipeline.completion import is_done
from pipeline.config import Config
from pipeline.io import read_pandas
from pipeline.layout import (
    ROUND_SUMMARY,
    checkpoint_dir,
    iter_dir,
)
from pipeline.problems import write_problems
from pipeline.util import write_json_atomic
from stages.tasks.base import reflects, task_of
from tapo.flows.chains import ROUND

log = logging.getLogger(__name__)


def resolve_policy(run_dir: str | Path, iteration: int, cfg: Config,
                   model: str | Path | None = None, build_base: bool = False) -> Path:
    """The checkpoint round K samples from and trains: `model` when given (`tapo round
    --model`); for round K > 1 the previous round's checkpoint (RUN_DIR/models/iter_K-1, which
    must be complete); for round 1 the run's initial policy: `policy.path` when set, else the
    cold-start checkpoint (`policy.coldstart`) when complete, else the testbed base model. A
    round never builds a model: the base is built only with `build_base` (iterate, compare and
    the cold start ask for it), else its absence is an error naming the command."""
    if model:
        return _existing(Path(model), "--model")
    if iteration > 1:
        previous = checkpoint_dir(run_dir, iteration - 1)
        if not is_done(previous):
            raise FileNotFoundError(f"round {iteration} samples from {previous}, which is not a "
                                    f"complete checkpoint: train round {iteration - 1} first, "
                                    "or give the policy with --model")
        return previous
    if cfg.policy.path:
        return _existing(Path(cfg.policy.path), "policy.path")
    coldstart = Path(cfg.policy.coldstart)
    if is_done(coldstart):
        return coldstart
    return testbed_base(cfg, build=build_base)


def testbed_base(cfg: Config, build: bool) -> Path:
    """The testbed base model; when it is missing or out of date, built first with `build`
    (said in the log: no policy was given, so the run starts from the testbed's own model),
    else a FileNotFoundError that names the command."""
    from testbed.base import base_is_current, build_base

    if not base_is_current(cfg.testbed, cfg.testbed.base_dir):
        if not build:
            raise FileNotFoundError(
                f"no policy: policy.path is empty, no complete cold-start model at "
                f"{cfg.policy.coldstart}, and no testbed base at {cfg.testbed.base_dir}: "
                "`tapo base` installs it (make iterate does first), or set policy.path")
        log.warning("no policy.path and no cold-start model: building the testbed base into %s "
                    "(`tapo base`)", cfg.testbed.base_dir)
    return build_base(cfg.testbed, cfg.testbed.base_dir)


def _existing(model: Path, what: str) -> Path:
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{what}: no model directory at {model} (no config.json; from a "
                                "GGUF file: `tapo import-model --gguf FILE --out DIR`)")
    return model


def problem_pool(cfg: Config) -> Path:
    """The training problems: `rollout.problems`, or (the arith task) the testbed's train
    split."""
    return problem_file(cfg, "rollout.problems", "train")


def problem_file(cfg: Config, key: str, split: str, required: bool = True) -> Path | None:
    """The problems file the config's `key` names, else, for a task whose problems are generated
    (arith), the testbed's `split` (generated on first use). Another task without one: an error
    when `required`, else None; never the testbed's arithmetic."""
    from testbed.base import testbed_problems

    section, field = key.split(".")
    given = getattr(getattr(cfg, section), field)
    if given:
        return Path(given)
    if task_of(cfg).generated_problems:
        return testbed_problems(cfg.testbed, split)
    if not required:
        return None
    raise ValueError(f"{key} is empty: the {cfg.task.name!r} task needs a problems file "
                     f"(parquet or jsonl: problem_id or id, problem, answer), e.g. "
                     f"{key}=/data/deepscaler.parquet")


def write_round_problems(cfg: Config, iteration: int, out_dir: Path) -> dict[str, int]:
    """Round K's problems: positions (K-1)*B .. K*B-1 (wrapping) of a seeded permutation of the
    pool, B = rollout.problems_per_round, in shards of rollout.shard_size."""
    pool_path = problem_pool(cfg)
    if not pool_path.exists():
        raise FileNotFoundError(f"no training problems at {pool_path} (set rollout.problems)")
    r = cfg.rollout
    return write_problems(pool_path, out_dir, (iteration - 1) * r.problems_per_round,
                          r.problems_per_round, cfg.run.seed, r.shard_size)


def run_round(run_dir: str | Path, iteration: int, cfg: Config, progress: bool = True,
              model: str | Path | None = None) -> dict[str, Any]:
    """Runs one round's stages into RUN_DIR/iter_KKKK and returns (and writes) its summary.
    `algo.name=grpo` skips the augmentation stages; `model` overrides the round's policy
    (resolve_policy). A stage already complete keeps the seconds its run measured."""
    algo = cfg.algo.name
    if iteration < 1:
        raise ValueError(f"iteration must be 1 or more, not {iteration}")
    here = iter_dir(run_dir, iteration)
    policy = resolve_policy(run_dir, iteration, cfg, model)
    cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"path": str(policy)})})
    timings: dict[str, float] = {}
    stats: dict[str, dict[str, int]] = {}

    t = time.time()
    stats["problems"] = write_round_problems(cfg, iteration, here / "problems")
    timings["problems"] = time.time() - t
    runs = run_chain(ROUND[algo], cfg, here, progress=progress)
    for name, run in runs.items():
        stats[name], timings[name] = run.result.stats, run.seconds
    reused = [name for name, run in runs.items() if run.result.skipped]  # a resumed round

    measured = _read_summary(here).get("seconds", {})
    for name in reused + (["problems"] if "sample" in reused else []):
        timings[name] = measured.get(name, timings[name])
    summary = summarize(here, algo, stats)
    summary.update({"iteration": iteration, "algo": algo, "policy": str(policy),
                    "seconds": {k: round(v, 2) for k, v in timings.items()}, "reused": reused})
    write_json_atomic(here / ROUND_SUMMARY, summary)
    return summary


def _read_summary(here: Path) -> dict[str, Any]:
    try:
        return json.loads((here / ROUND_SUMMARY).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def summarize(here: Path, algo: str, stats: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Pass rate, candidates, accepted trajectories; checks that assemble lost none."""
    classified = read_pandas(here / "classify", columns=["label", "response", "response_len"])
    training = read_pandas(here / "assemble", columns=["kind"])
    augmented = int((training["kind"] == "augmented").sum())
    out: dict[str, Any] = {
        "rollouts": len(classified),
        "pass_rate": float((classified["label"] == "correct").mean()) if len(classified) else 0.0,
        "reflection_rate": float(classified["response"].map(reflects).mean())
        if len(classified) else 0.0,
        "response_length": float(classified["response_len"].mean()) if len(classified) else 0.0,
        "training_rows": len(training), "augmented": augmented, "stats": stats,
    }
    if algo == "tapo":
        candidates = read_pandas(here / "select", columns=["problem_id"])["problem_id"].nunique()
        accepted = stats["construct"]["rows_out"]
        if augmented + stats["assemble"].get("dropped_tokenization_mismatch", 0) != accepted:
            raise RuntimeError(f"{here}: {accepted} trajectories constructed but {augmented} "
                               "assembled: a trajectory's problem is in no rollout shard")
        out.update({"candidates": candidates, "accepted": accepted,
                    "acceptance": accepted / candidates if candidates else 0.0})
    return out


def render_round(summary: dict) -> str:
    """A few lines: rows and drops per stage, seconds, and the acceptance share."""
    lines = [f"round {summary['iteration']} ({summary['algo']}), policy {summary['policy']}"]
    for name, stats in summary["stats"].items():
        drops = ", ".join(f"{k[8:]} {v}" for k, v in stats.items() if k.startswith("dropped_"))
        rows = f"{stats['rows_in']} -> {stats['rows_out']}"
        lines.append(f"  {name:<10} {rows:>14}  {summary['seconds'][name]:7.1f} s"
                     + (f"  dropped: {drops}" if drops else ""))
    lines.append(f"  pass rate {summary['pass_rate']:.3f} over {summary['rollouts']} rollouts; "
                 f"training rows {summary['training_rows']} ({summary['augmented']} augmented)")
    if "candidates" in summary:
        lines.append(f"  candidates {summary['candidates']}, accepted {summary['accepted']} "
                     f"({summary['acceptance']:.0%})")
    return "\n".join(lines)

"""One TAPO round: problems -> sample -> classify -> select -> locate -> pick_repair -> construct
-> assemble.

    run_round(run_dir, iteration=1, cfg=cfg)

Writes `RUN_DIR/iter_KKKK/<stage>/` for each stage (see pipeline/runner.py for the layout) and
`RUN_DIR/iter_KKKK/round.json`: the policy, seconds and stats per stage, and the share of
candidates that became accepted trajectories. Every stage is resumable and a no-op when
complete, so a killed round re-run continues from the last complete stage. `algo.name=grpo`
skips select/locate/construct: the training shard holds the rollouts only.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config
from pipeline.io import part_name, read_pandas, write_table_atomic
from pipeline.runner import STATS, SUCCESS, Stage, run_stage
from pipeline.util import file_sha256, fingerprint, write_json_atomic
from stages.assemble import Assemble
from stages.classify import Classify
from stages.construct import Construct
from stages.locate import Locate
from stages.pick_repair import PickRepair
from stages.sample import Sample
from stages.select import Select
from stages.tasks.base import reflects

AUGMENT_CHAIN: list[tuple[str, type[Stage], str]] = [  # (dir, stage, input dir)
    ("select", Select, "classify"),
    ("locate", Locate, "select"),
    ("pick_repair", PickRepair, "locate"),
    ("construct", Construct, "pick_repair"),
]


def iter_dir(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / f"iter_{iteration:04d}"


def resolve_policy(run_dir: str | Path, iteration: int, cfg: Config,
                   model: str | Path | None = None) -> Path:
    """The checkpoint round K samples from and trains: `model` when given (`tapo round
    --model`); for round K > 1 the previous round's checkpoint (RUN_DIR/models/iter_K-1, which
    must be complete); for round 1 the run's initial policy: `policy.path` when set, else the
    cold-start checkpoint (`policy.coldstart`) when complete, else the testbed base model
    (built when missing)."""
    if model:
        return _existing(Path(model), "--model")
    if iteration > 1:
        previous = Path(run_dir) / "models" / f"iter_{iteration - 1:04d}"
        if not (previous / SUCCESS).exists():
            raise FileNotFoundError(f"round {iteration} samples from {previous}, which is not a "
                                    f"complete checkpoint: train round {iteration - 1} first, "
                                    "or give the policy with --model")
        return previous
    if cfg.policy.path:
        return _existing(Path(cfg.policy.path), "policy.path")
    coldstart = Path(cfg.policy.coldstart)
    if (coldstart / SUCCESS).exists():
        return coldstart
    from pipeline.testbed import build_base

    return build_base(cfg.testbed, cfg.testbed.base_dir)


def _existing(model: Path, what: str) -> Path:
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{what}: no model directory at {model} (no config.json)")
    return model


def problem_pool(cfg: Config) -> Path:
    """The training problems: `rollout.problems`, or the testbed's train split."""
    if cfg.rollout.problems:
        return Path(cfg.rollout.problems)
    return Path(cfg.testbed.base_dir) / "data" / "train.parquet"


def load_problems(path: str | Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """(problems, rejected) from parquet or JSON Lines (`id` is read as `problem_id`). A problem
    needs `problem_id`, `problem` (non-empty text) and `answer` (made text); other columns
    (`solution`, ...) are kept. A row that lacks one is rejected as `bad_problem`, with its
    line (jsonl) or row (parquet) number. A file that is not UTF-8, a line that is not JSON, and
    a file without those columns at all are errors that name the place."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no problems file at {path}")
    if path.suffix == ".jsonl":
        numbered, where = _read_jsonl(path), "line"
    else:
        numbered, where = list(enumerate(pd.read_parquet(path).to_dict("records"), 1)), "row"
    records = [r for _, r in numbered]
    if records and "problem_id" not in records[0] and any("id" in r for r in records):
        records = [{"problem_id": r.pop("id", None), **r} for r in records]
    columns = {k for r in records for k in r}
    missing = {"problem_id", "problem", "answer"} - columns
    if records and missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)} (problem_id or id, problem, "
                         "answer)")
    kept, rejected = [], []
    for (number, _), record in zip(numbered, records, strict=True):
        problem = record.get("problem")
        bad = [k for k in ("problem_id", "answer") if _missing(record.get(k))]
        if not isinstance(problem, str) or not problem.strip():
            bad.append("problem")
        if bad:
            rejected.append({"line": number, "reason": "bad_problem",
                             "detail": f"{path.name} {where} {number}: no {', '.join(bad)}",
                             "raw": json.dumps(record, default=str)[:2000]})
        else:
            kept.append({**record, "problem_id": str(record["problem_id"]),
                         "answer": str(record["answer"])})
    table = pd.DataFrame(kept, columns=sorted(columns) if not kept else None)
    return table, rejected


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value == ""


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: byte {data[e.start]:#04x} on line "
                         f"{line}") from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # (JSON Lines: \n ends a line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name} line {number}: not valid JSON ({e.msg} at column "
                             f"{e.colno})") from None
        records.append((number, record if isinstance(record, dict) else {"problem": None,
                                                                          "value": record}))
    return records


def write_problems(pool_path: Path, out_dir: Path, start: int, count: int | None, seed: int,
                   shard_size: int) -> dict[str, int]:
    """Positions start .. start+count-1 (wrapping; count None: all) of a seeded permutation of
    the pool's valid problems, in shards of `shard_size`, into the stage directory `out_dir`;
    rejected rows into `out_dir/excluded/` (reason, detail, line, raw). A no-op when done.
    Returns its stats: rows in the file, problems out, dropped_bad_problem."""
    fp = fingerprint({"pool": file_sha256(pool_path), "start": start, "count": count,
                      "seed": seed, "shard_size": shard_size})
    done = out_dir / SUCCESS
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == fp:
        return json.loads((out_dir / STATS).read_text())
    pool, rejected = load_problems(pool_path)
    if pool.empty:
        raise ValueError(f"{pool_path}: no valid problem among {len(rejected)} rows"
                         + (f" (first: {rejected[0]['detail']})" if rejected else ""))
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    count = len(pool) if count is None else min(count, len(pool))
    table = pool.iloc[[order[(start + i) % len(order)] for i in range(count)]]
    table = table.reset_index(drop=True)
    for old in list(out_dir.glob("part-*.parquet")) + list(out_dir.glob("excluded/part-*")):
        old.unlink()
    for i, lo in enumerate(range(0, len(table), shard_size)):
        write_table_atomic(table.iloc[lo : lo + shard_size], out_dir / part_name(i))
    if rejected:
        write_table_atomic(pd.DataFrame(rejected), out_dir / "excluded" / part_name(0))
    stats = {"rows_in": len(pool) + len(rejected), "rows_out": len(table),
             **({"dropped_bad_problem": len(rejected)} if rejected else {})}
    write_json_atomic(out_dir / STATS, stats)
    write_json_atomic(done, {"fingerprint": fp, "pool": str(pool_path), "rows": len(table)})
    return stats


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
    reused: list[str] = []  # stages already complete (a resumed round)

    t = time.time()
    stats["problems"] = write_round_problems(cfg, iteration, here / "problems")
    timings["problems"] = time.time() - t
    chain: list[tuple[str, type[Stage], str]] = [("sample", Sample, "problems"),
                                                 ("classify", Classify, "sample")]
    if algo == "tapo":
        chain += AUGMENT_CHAIN
    for name, stage_cls, source in chain:
        t = time.time()
        result = run_stage(stage_cls, cfg, here / source, here / name, progress=progress)
        stats[name], timings[name] = result.stats, time.time() - t
        reused += [name] if result.skipped else []
    t = time.time()
    side = {"trajectories": here / "construct"} if algo == "tapo" else {}
    result = run_stage(Assemble, cfg, here / "classify", here / "assemble", progress=progress,
                       side=side)
    stats["assemble"], timings["assemble"] = result.stats, time.time() - t
    reused += ["assemble"] if result.skipped else []

    measured = _read_summary(here).get("seconds", {})
    for name in reused + (["problems"] if "sample" in reused else []):
        timings[name] = measured.get(name, timings[name])
    summary = summarize(here, algo, stats)
    summary.update({"iteration": iteration, "algo": algo, "policy": str(policy),
                    "seconds": {k: round(v, 2) for k, v in timings.items()}, "reused": reused})
    write_json_atomic(here / "round.json", summary)
    return summary


def _read_summary(here: Path) -> dict[str, Any]:
    try:
        return json.loads((here / "round.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def summarize(here: Path, algo: str, stats: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Pass rate, candidates, accepted trajectories; checks that assemble lost none."""
    classified = read_pandas(here / "classify", columns=["label", "response"])
    training = read_pandas(here / "assemble", columns=["kind"])
    augmented = int((training["kind"] == "augmented").sum())
    out: dict[str, Any] = {
        "rollouts": len(classified),
        "pass_rate": float((classified["label"] == "correct").mean()) if len(classified) else 0.0,
        "reflection_rate": float(classified["response"].map(reflects).mean())
        if len(classified) else 0.0,
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


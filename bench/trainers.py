"""Trainer step time, in the same run, on the same round's shard:

- the openrlhf backend (OpenRLHF's actor and loss under DeepSpeed, one process) over the local
  trainer: median seconds per optimizer step (each backend's own `train_log.jsonl`; the first
  step left out: warm-up); goal at most 1.3x;
- a TAPO step over a GRPO step on the same batch (the local trainer's update, the TAPO
  objective vs GRPO's: no OOD mask, no decoupled advantages, no capped ratio in the
  loss: `algo.ood=off`, `algo.dae=false`), median of `--repeats` steps each; goal at most
  1.10x.

    python -m bench.trainers [--config C] [--problems 64] [--repeats 5] [section.key=value ...]

Runs one TAPO round of the config's testbed (its base model is built when missing) into
runs/bench-trainers/ and prints one JSON line per comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import load_config
from pipeline.io import read_pandas
from tapo.flows.round import run_round
from trainer.backends import train_round
from trainer.objective import ObjectiveConfig, loss_mask
from trainer.rl import _update, build_batch, objective_config, old_logprobs

OUT = Path("runs/bench-trainers")


def step_seconds(out_dir: Path) -> list[float]:
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["seconds"] for line in lines]


def backends(cfg, policy: str, shard: Path) -> dict:
    """Both backends on the shard (fresh output directories); median step seconds."""
    seconds = {}
    for backend in ("local", "openrlhf"):
        out = OUT / f"train-{backend}"
        shutil.rmtree(out, ignore_errors=True)
        bcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"backend": backend})})
        t = time.time()
        metrics = train_round(policy, shard, out, bcfg, progress=False)
        per_step = step_seconds(out)
        seconds[backend] = {"median_step_s": statistics.median(per_step[1:] or per_step),
                            "steps": metrics["steps"], "wall_s": round(time.time() - t, 1)}
    ratio = seconds["openrlhf"]["median_step_s"] / seconds["local"]["median_step_s"]
    return {"bench": "trainer_step", **seconds, "openrlhf_over_local": round(ratio, 3),
            "goal": "<= 1.3"}


def objectives(cfg, policy: str, shard: Path, repeats: int) -> dict:
    """The local trainer's update with TAPO's objective and with GRPO's, same mini-batch."""
    tc = cfg.train
    rows = read_pandas(shard)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    idx = torch.arange(min(len(rows), tc.mini_batch_size))
    variants = {"tapo": objective_config(cfg),
                "grpo": ObjectiveConfig(ood="off", dae=False, clip_low=cfg.algo.clip_low,
                                        clip_high=cfg.algo.clip_high)}
    state = {}
    for name, obj in variants.items():
        model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
        batch = build_batch(rows, tokenizer.pad_token_id, obj)
        old = old_logprobs(model, batch, tc.micro_batch_size)
        in_loss, _ = loss_mask(batch.advantages, batch.trained, batch.corrective, old, obj)
        model.train()
        state[name] = (model, torch.optim.AdamW(model.parameters(), lr=tc.lr), batch, old,
                       in_loss, obj)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats + 1):  # interleaved, first one then the other, so that a change
        for name in (list(state) if r % 2 else list(state)[::-1]):  # in load hits both
            model, optimizer, batch, old, in_loss, obj = state[name]
            t = time.perf_counter()
            _update(model, optimizer, batch, old, None, in_loss, idx, obj, tc)
            times[name].append(time.perf_counter() - t)
    out = {name: statistics.median(t[1:]) for name, t in times.items()}
    return {"bench": "objective_step", "sequences": len(idx), "tapo_s": round(out["tapo"], 4),
            "grpo_s": round(out["grpo"], 4), "tapo_over_grpo": round(out["tapo"] / out["grpo"], 3),
            "goal": "<= 1.10"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--problems", type=int, default=64, help="problems in the round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"rollout.problems_per_round={args.problems}",
                                    "select.p_high=1", *args.overrides])
    summary = run_round(OUT / "run", 1, cfg, progress=False)
    shard = OUT / "run" / "iter_0001" / "assemble"
    print(json.dumps({"bench": "shard", "rows": summary["training_rows"],
                      "augmented": summary["augmented"], "policy": summary["policy"]}),
          flush=True)
    print(json.dumps(objectives(cfg, summary["policy"], shard, args.repeats)), flush=True)
    print(json.dumps(backends(cfg, summary["policy"], shard)), flush=True)


if __name__ == "__main__":
    main()

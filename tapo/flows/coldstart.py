"""`make coldstart`: the SFT/IF set from the base model's own wrong answers, and the SFT phase.

    summary = run_coldstart(run_dir, cfg)

Writes under RUN_DIR (default: the parent of `policy.coldstart`, i.e. runs/coldstart):

    problems/ sample/ classify/ select/ locate/ construct/ examples/   stage directories
    model/           the cold-start checkpoint (trainer/backends.py train_sft); `make iterate`
                     starts from it
    probe/           held-out wrong prefixes: problems/ sample/ classify/ select/ locate/
    coldstart.json   counts per source, rejections by reason, SFT metrics, and the reflection
                     rate of the base and the cold-start model on the held-out wrong prefixes

The chain reuses the RL stages with the base model as policy (G = coldstart.samples), with
`coldstart_select` (one wrong response per problem, no window or budget) in place of `select`,
and `sft_examples` (the 2 : 1 SFT/IF mixture) after `construct`. Every stage is resumable and a
no-op when complete.

The probe measures what the SFT is for: given the task prompt and a wrong response of the base
model cut before its first wrong step (held-out problems, never trained on), how often does a
greedy continuation reflect (stages.tasks.base.reflects)?
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.chain import run_chain
from pipeline.config import Config, write_resolved
from pipeline.engines import SamplingParams
from pipeline.io import read_pandas
from pipeline.problems import write_problems
from pipeline.stage import EXCLUDED
from pipeline.util import write_json_atomic
from stages.common import EngineHolder
from stages.tasks.base import reflects
from tapo.flows.chains import COLDSTART
from tapo.flows.evaluate import format_cell
from tapo.flows.round import problem_file, testbed_base
from trainer.backends import train_sft


def coldstart_dir(cfg: Config) -> Path:
    return Path(cfg.policy.coldstart).parent


def base_model(cfg: Config) -> Path:
    """The model the cold start samples and fine-tunes: `policy.path`, else the testbed base."""
    if cfg.policy.path:
        return Path(cfg.policy.path)
    return testbed_base(cfg, build=True)


def sampling_config(cfg: Config, base: Path) -> Config:
    """`cfg` with the base as policy and the cold start's sampling knobs as the rollout's."""
    c = cfg.coldstart
    rollout = cfg.rollout.model_copy(update={"group_size": c.samples,
                                             "temperature": c.temperature,
                                             "max_tokens": c.max_tokens})
    policy = cfg.policy.model_copy(update={"path": str(base)})
    return cfg.model_copy(update={"rollout": rollout, "policy": policy})


def build_chain(cfg: Config, pool: Path, here: Path, until: str, count: int | None,
              progress: bool = True) -> dict[str, dict[str, int]]:
    """`count` problems of the pool (None: all) -> ... -> `until` (a COLDSTART step) into
    `here`; returns the stats per stage."""
    stats = {"problems": write_problems(pool, here / "problems", 0, count, cfg.coldstart.seed,
                                        cfg.rollout.shard_size)}
    runs = run_chain(COLDSTART, cfg, here, progress=progress, until=until)
    return stats | {name: run.result.stats for name, run in runs.items()}


def probe_prompts(located_dir: Path) -> list[str]:
    """Task prompt + the kept wrong prefix of every located held-out response."""
    rows = read_pandas(located_dir, columns=["prompt", "wrong_response", "prefix_chars"])
    return [p + w[:n] for p, w, n in zip(rows["prompt"], rows["wrong_response"],
                                         rows["prefix_chars"])]


def reflection_rate(cfg: Config, model: Path, prompts: list[str]) -> float:
    """The share of greedy continuations of `prompts` by `model` that reflect."""
    engine = EngineHolder(cfg, model)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=cfg.coldstart.max_tokens)
        outs = engine.get().generate(prompts, 1, params)
    finally:
        engine.close()
    return sum(reflects(g[0].text) for g in outs) / len(prompts)


def source_counts(stats: dict[str, dict[str, int]], examples_dir: Path) -> dict[str, Any]:
    """What docs/coldstart.md's table shows: the funnel, rejections, and per source
    (sft, direct, if) the examples available, dropped by reason, and kept."""
    classified = read_pandas(examples_dir.parent / "classify", columns=["label"])
    kept = read_pandas(examples_dir, columns=["source"])["source"].value_counts()
    excluded_dir = examples_dir / EXCLUDED
    dropped = (read_pandas(excluded_dir, columns=["source", "reason"])
               if any(excluded_dir.glob("part-*.parquet"))
               else pd.DataFrame(columns=["source", "reason"]))
    per_source = {}
    for source in ("sft", "direct", "if"):
        reasons = dropped[dropped["source"] == source]["reason"].value_counts().to_dict()
        per_source[source] = {"kept": int(kept.get(source, 0)),
                              **{f"dropped_{k}": int(v) for k, v in reasons.items()}}
    rejected = {f"{stage}:{k[8:]}": v for stage in ("classify", "select", "locate", "construct")
                for k, v in stats[stage].items() if k.startswith("dropped_")}
    return {"problems": stats["problems"]["rows_out"], "responses": len(classified),
            "wrong_responses": int((classified["label"] != "correct").sum()),
            "candidates": stats["select"]["rows_out"], "located": stats["locate"]["rows_out"],
            "constructed": stats["construct"]["rows_out"], "rejected": rejected,
            "examples": per_source}


def run_coldstart(run_dir: str | Path | None, cfg: Config,
                  progress: bool = True) -> dict[str, Any]:
    """Builds the set, trains the cold-start model into RUN_DIR/model, probes base vs cold start
    on held-out wrong prefixes; returns (and writes to RUN_DIR/coldstart.json) the summary."""
    here = Path(run_dir) if run_dir is not None else coldstart_dir(cfg)
    base = base_model(cfg)
    scfg = sampling_config(cfg, base)
    write_resolved(cfg, here / "config.yaml")
    pool = problem_file(cfg, "coldstart.problems", "train")
    t = time.time()
    stats = build_chain(scfg, pool, here, "examples", cfg.coldstart.max_problems, progress)
    build_seconds = time.time() - t
    sft = train_sft(base, here / "examples", here / "model", cfg, progress=progress)

    summary: dict[str, Any] = {"base": str(base), "model": str(here / "model"),
                               **source_counts(stats, here / "examples"), "sft": sft,
                               "seconds": {"build": round(build_seconds, 2),
                                           "sft": sft["seconds"]}}
    heldout = problem_file(cfg, "coldstart.heldout", "heldout", required=False)
    if heldout is not None:
        t = time.time()
        build_chain(scfg, heldout, here / "probe", "locate", None, progress)
        prompts = probe_prompts(here / "probe" / "locate")
        summary["probe"] = {"prefixes": len(prompts), "reflection_rate": {
            "base": reflection_rate(cfg, base, prompts) if prompts else None,
            "coldstart": reflection_rate(cfg, here / "model", prompts) if prompts else None}}
        summary["seconds"]["probe"] = round(time.time() - t, 2)
    write_json_atomic(here / "coldstart.json", summary)
    return summary


def render_coldstart(s: dict) -> str:
    """The funnel, the examples per source, SFT time and the probe's reflection rates."""
    lines = [f"cold start from {s['base']} -> {s['model']}",
             f"  problems {s['problems']}, responses {s['responses']}, wrong "
             f"{s['wrong_responses']}, candidates {s['candidates']}, located {s['located']}, "
             f"constructed {s['constructed']}",
             "  rejected: " + (", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "none")]
    for source, counts in s["examples"].items():
        lines.append(f"  {source:>3} examples: " + ", ".join(f"{k} {v}"
                                                           for k, v in counts.items()))
    sft = s["sft"]
    lines.append(f"  sft: {sft['examples']} examples ({sft['too_long']} too long), "
                 f"{sft['steps']} steps, loss {sft['loss_first']:.3f} -> {sft['loss_last']:.3f}, "
                 f"{sft['seconds']:.0f} s")
    if "probe" in s:
        rate = s["probe"]["reflection_rate"]
        lines.append(f"  reflection rate on {s['probe']['prefixes']} held-out wrong prefixes: "
                     f"base {format_cell(rate['base'])}, "
                     f"cold start {format_cell(rate['coldstart'])}")
    return "\n".join(lines)

"""`tapo plan --config C`: what one round will use, before anything runs: processes and GPUs
per phase, the estimated peak GPU memory of a training rank and of an engine, the disk a round
writes, and a refusal (exit 2) when the plan cannot fit.

    plan = make_plan(cfg, shape, gpu_gb=80)         # a dict; `format_plan(plan)` prints it

The model's shape comes from the policy's `config.json` (`policy.path`) or `--shape FILE`;
the training estimate is trainer/memory.py's, which `make bench` (bench.memory) checks against
measured peaks. Estimates, not guarantees: they count what the code keeps, not allocator slack.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from pipeline.config import Config
from trainer.memory import ModelShape, engine_bytes, train_rank_bytes
from trainer.openrlhf_shard import hostfile_hosts

PROMPT_TOKENS = 1024  # a prompt's budget on top of rollout.max_tokens (math problems: < 1k)
HEADROOM = 0.9  # a rank may plan up to this share of a GPU (CUDA context, fragmentation)


def make_plan(cfg: Config, shape: ModelShape, gpu_gb: float = 80.0) -> dict[str, Any]:
    """The round's phases, their estimated peaks (GB) and the problems that keep it from
    fitting (`problems`: empty when it fits)."""
    tc, rc, ec = cfg.train, cfg.runner, cfg.engine
    gpu = gpu_gb * 1e9
    tokens = PROMPT_TOKENS + cfg.rollout.max_tokens
    flags = shlex.split(tc.openrlhf_flags)
    checkpointing = "--actor.gradient_checkpointing_enable" in flags
    problems: list[str] = []

    if tc.backend == "openrlhf":
        nodes = ([slots for _, slots in hostfile_hosts(tc.hostfile)] if tc.hostfile
                 else [tc.num_gpus])
        world, zero = sum(nodes), tc.zero_stage
    else:
        nodes, world, zero = [1], 1, 0
    dtype_bytes = 2  # bf16 on GPU
    rank = train_rank_bytes(shape, tokens * tc.micro_batch_size, world, zero, checkpointing,
                            dtype_bytes)
    reference = 0
    if cfg.algo.kl_coef > 0:  # the reference's weights, partitioned under ZeRO-3
        reference = dtype_bytes * shape.parameters / (world if zero >= 3 else 1)
    train_peak = rank + reference
    if train_peak > HEADROOM * gpu:
        problems.append(
            f"training: {train_peak / 1e9:.0f} GB a rank > {HEADROOM:.0%} of {gpu_gb:.0f} GB "
            + ("(add --actor.gradient_checkpointing_enable to train.openrlhf_flags)"
               if not checkpointing else "(raise train.zero_stage or lower micro_batch_size)"))

    engines = rc.workers if rc.executor == "ray" else 1
    gpus_per_engine = rc.gpus_per_worker if rc.executor == "ray" else 1
    engine_gpus = engines * gpus_per_engine
    weights = engine_bytes(shape, 0, 0, dtype_bytes) / ec.tensor_parallel_size
    one_sequence = engine_bytes(shape, ec.max_model_len, 1, dtype_bytes) / ec.tensor_parallel_size
    budget = ec.gpu_memory_utilization * gpu
    kv_sequences = int((budget - weights) // max(one_sequence - weights, 1))
    if ec.backend in ("vllm", "auto") and one_sequence > budget:
        problems.append(f"sampling: the engine's weights and one {ec.max_model_len}-token "
                        f"sequence need {one_sequence / 1e9:.0f} GB > engine."
                        f"gpu_memory_utilization x {gpu_gb:.0f} GB = {budget / 1e9:.0f} GB")
    if rc.executor == "ray" and rc.gpus_per_worker == 0:
        problems.append("sampling: runner.executor=ray with runner.gpus_per_worker=0 puts the "
                        "engines on no GPU (set runner.gpus_per_worker=1)")
    # `tapo coldstart`'s SFT: with openrlhf, OpenRLHF's train_sft on the training ranks (its
    # longest example: a prompt, a kept wrong prefix and a construction); locally, one device
    # with fp32 weights, gradients and AdamW moments (16 bytes a parameter)
    notes = []
    sft_tokens = PROMPT_TOKENS + cfg.coldstart.max_tokens + cfg.construction.max_tokens
    if tc.backend == "openrlhf":
        sft_checkpointing = ("--model.gradient_checkpointing_enable"
                             in shlex.split(cfg.coldstart.openrlhf_flags))
        coldstart_peak = train_rank_bytes(shape, sft_tokens * tc.micro_batch_size, world, zero,
                                          sft_checkpointing, dtype_bytes)
        if coldstart_peak > HEADROOM * gpu:
            problems.append(
                f"cold-start SFT: {coldstart_peak / 1e9:.0f} GB a rank > {HEADROOM:.0%} of "
                f"{gpu_gb:.0f} GB " + ("(add --model.gradient_checkpointing_enable to "
                                      "coldstart.openrlhf_flags)" if not sft_checkpointing
                                      else "(raise train.zero_stage)"))
    else:
        coldstart_peak = 16 * shape.parameters
        if coldstart_peak > HEADROOM * gpu:
            notes.append(f"tapo coldstart: its SFT runs on one GPU and needs "
                         f"{coldstart_peak / 1e9:.0f} GB for the model states alone: set "
                         "train.backend=openrlhf, or give a cold-start model trained elsewhere "
                         "(policy.coldstart)")
    rows = cfg.rollout.problems_per_round * cfg.rollout.group_size
    ds_state = (dtype_bytes + 12) * shape.parameters  # weights, fp32 master and two moments
    disk = {"checkpoint_gb": dtype_bytes * shape.parameters / 1e9,
            "deepspeed_state_gb": ds_state / 1e9 if tc.backend == "openrlhf" else 0.0,
            "shards_gb_at_most": rows * tokens * 4 * 3 / 1e9}  # ids, masks, log-probs (int32/fp32)
    return {
        "model": {"parameters_b": round(shape.parameters / 1e9, 2), "layers": shape.layers,
                  "hidden": shape.hidden, "vocab": shape.vocab},
        "sampling": {"engines": engines, "gpus_per_engine": gpus_per_engine,
                     "gpus": engine_gpus, "idle_gpus": max(world - engine_gpus, 0),
                     "engine_gb": round(budget / 1e9, 1),
                     "weights_gb": round(weights / 1e9, 1),
                     "sequences_in_kv_cache": kv_sequences, "rollouts": rows},
        "grading": {"cpu_workers": cfg.grader.workers},
        "training": {"backend": tc.backend, "nodes": len(nodes), "ranks": world,
                     "zero_stage": zero, "gradient_checkpointing": checkpointing,
                     "tokens_per_micro_batch": tokens * tc.micro_batch_size,
                     "peak_gb_per_rank": round(train_peak / 1e9, 1),
                     "reference_gb_per_rank": round(reference / 1e9, 1)},
        "disk_per_round": {k: round(v, 1) for k, v in disk.items()},
        "coldstart": {"backend": tc.backend, "tokens_per_example_at_most": sft_tokens,
                      "peak_gb_per_rank": round(coldstart_peak / 1e9, 1)},
        "gpu_gb": gpu_gb, "problems": problems, "notes": notes}


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines `tapo plan` prints."""
    m, s, t, d = plan["model"], plan["sampling"], plan["training"], plan["disk_per_round"]
    lines = [
        f"model: {m['parameters_b']}B parameters ({m['layers']} layers, hidden {m['hidden']}, "
        f"vocab {m['vocab']})",
        f"sampling: {s['engines']} engine(s) x {s['gpus_per_engine']} GPU, {s['engine_gb']} GB "
        f"each ({s['weights_gb']} GB weights, KV cache for {s['sequences_in_kv_cache']} "
        f"full-length sequences); {s['rollouts']} rollouts"
        + (f"; {s['idle_gpus']} GPU(s) idle (runner.executor=ray, runner.workers, "
           "runner.gpus_per_worker put an engine on each)" if s["idle_gpus"] else ""),
        f"grading: {plan['grading']['cpu_workers']} CPU workers",
        f"training: {t['backend']}, {t['ranks']} rank(s) on {t['nodes']} node(s), ZeRO-"
        f"{t['zero_stage']}, checkpointing {'on' if t['gradient_checkpointing'] else 'off'}, "
        f"{t['tokens_per_micro_batch']} tokens a micro-batch: ~{t['peak_gb_per_rank']} GB a "
        f"rank of {plan['gpu_gb']:.0f} GB"
        + (f" (reference {t['reference_gb_per_rank']} GB)" if t["reference_gb_per_rank"] else ""),
        f"disk a round: checkpoint {d['checkpoint_gb']} GB, DeepSpeed state "
        f"{d['deepspeed_state_gb']} GB (the last round's only), shards <= "
        f"{d['shards_gb_at_most']} GB",
    ]
    c = plan["coldstart"]
    lines.append(f"cold-start SFT: {c['backend']}, examples up to "
                 f"{c['tokens_per_example_at_most']} tokens: ~{c['peak_gb_per_rank']} GB a rank")
    lines += [f"note: {n}" for n in plan["notes"]]
    if plan["problems"]:
        lines += ["does not fit:"] + [f"  - {p}" for p in plan["problems"]]
    else:
        lines.append("fits")
    return "\n".join(lines)


def model_shape(cfg: Config, shape_file: str | None) -> ModelShape:
    """The shape from `--shape` (a config.json or model directory) or the policy's directory."""
    source = shape_file or cfg.policy.path
    if not source:
        raise ValueError("tapo plan: give the model (policy.path=DIR, or --shape CONFIG_JSON)")
    if not Path(source).exists():
        raise FileNotFoundError(f"tapo plan: {source} does not exist (give --shape "
                                "CONFIG_JSON, e.g. configs/shapes/qwen3-8b.json)")
    return ModelShape.from_config_json(source)

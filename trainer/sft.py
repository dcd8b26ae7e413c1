"""The cold-start SFT: causal-LM training on the `sft_examples` mixture, loss on `response` only.

    metrics = train_sft(base_dir, examples_dir, out_dir, cfg)

Reads the base checkpoint (its `optimizer.pt` too, when present: the testbed base's Adam
moments) and the examples' `prompt`/`response` (pipeline/io.py); writes `out_dir`: the HF model
and tokenizer, `optimizer.pt` (the moments RL continues), `sft_log.jsonl` (loss per step) and
`_SUCCESS` with the metrics, after an atomic rename from a temporary directory (a killed run
leaves no half checkpoint and starts again from the base). A complete `out_dir` with the same
fingerprint (base, examples, `coldstart` config) is a no-op. An example longer than the model's
context is left out and counted (`too_long`). With `train.backend: openrlhf` the same examples
go to OpenRLHF's train_sft under DeepSpeed (trainer/openrlhf_sft.py; trainer/backends.py chooses).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.completion import completed, publish, staging_dir
from pipeline.config import Config
from pipeline.io import list_parts, read_pandas
from pipeline.layout import OPTIMIZER
from pipeline.util import file_sha256, fingerprint, model_state
from trainer.lm import LMExample, TrainSchedule, train_lm

LOG = "sft_log.jsonl"


def lm_examples(prompts, responses, tokenizer) -> list[LMExample]:
    """What the cold-start SFT trains on each example: the prompt's tokens as context (no
    loss), the response's and EOS as target."""
    if len(prompts) == 0:
        return []
    contexts = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    targets = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [LMExample(c, t + [tokenizer.eos_token_id]) for c, t in zip(contexts, targets)]


def sft_fingerprint(base_dir: Path, examples_dir: Path, cfg: Config) -> str:
    """What a cold-start SFT's result depends on: the base, the examples, the `coldstart`
    settings and, with OpenRLHF, the training processes and ZeRO stage."""
    tc = cfg.train
    inputs = {"base": str(base_dir), "base_weights": model_state(base_dir),
              "examples": [file_sha256(p) for p in list_parts(examples_dir)],
              "coldstart": cfg.coldstart.model_dump(mode="json", exclude={"openrlhf_flags"})}
    if tc.backend == "openrlhf":
        from trainer.openrlhf_shard import world_size

        inputs["openrlhf"] = {"flags": cfg.coldstart.openrlhf_flags, "world": world_size(cfg),
                              "zero_stage": tc.zero_stage, "micro": tc.micro_batch_size}
    return fingerprint(inputs)


def train_sft(base_dir: str | Path, examples_dir: str | Path, out_dir: str | Path, cfg: Config,
              progress: bool = True) -> dict[str, Any]:
    """SFT of the model at `base_dir` on the examples; returns (and saves) the metrics."""
    base_dir, examples_dir, out_dir = Path(base_dir), Path(examples_dir), Path(out_dir)
    c = cfg.coldstart
    fp = sft_fingerprint(base_dir, examples_dir, cfg)
    done = completed(out_dir, fp)
    if done is not None:
        return done["metrics"]
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows = read_pandas(examples_dir, columns=["source", "prompt", "response"])
    limit = model.config.max_position_embeddings
    every = lm_examples(rows["prompt"], rows["response"], tokenizer)
    examples = [e for e in every if len(e.context) + len(e.target) <= limit]
    too_long = len(every) - len(examples)
    if not examples:
        raise ValueError(f"{examples_dir}: no example fits the model's context ({limit} tokens)")
    steps = math.ceil(c.epochs * len(examples) / c.batch_size)
    sched = TrainSchedule(steps=steps, batch_size=c.batch_size, lr=c.lr,
                          warmup_steps=min(20, max(1, steps // 10)), seed=c.seed)
    tmp = staging_dir(out_dir, fp)
    losses = train_lm(model, examples, sched, tokenizer.pad_token_id, desc="coldstart sft",
                      progress=progress, optimizer_in=base_dir / OPTIMIZER,
                      optimizer_out=tmp / OPTIMIZER)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / LOG).write_text("".join(json.dumps({"step": i + 1, "loss": loss}) + "\n"
                                   for i, loss in enumerate(losses)))
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"examples": len(examples), "too_long": too_long,
               "by_source": rows["source"].value_counts().to_dict(), "steps": steps,
               "loss_first": losses[0], "loss_last": sum(tail) / len(tail),
               "seconds": round(time.time() - t0, 2)}
    publish(tmp, out_dir, fp, base=str(base_dir), examples=str(examples_dir), metrics=metrics)
    return metrics


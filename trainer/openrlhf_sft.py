"""The cold-start SFT with OpenRLHF (`train.backend: openrlhf`): OpenRLHF 0.11.2's own
`train_sft` (its SFTDataset, SFTTrainer and SFTLoss, its cosine schedule and DeepSpeed strategy)
in processes started by the launcher the RL rounds use (trainer/openrlhf_shard.py).

    metrics = train_sft(base_dir, examples_dir, out_dir, cfg)     # the driver (any process)
    python -m trainer.openrlhf_sft --args A --log L               # each launched process

The driver writes, in `.OUT.tmp/` beside `out_dir`:
- `sft_examples.parquet`: the examples that fit the model's context (`too_long` counts the
  rest, as the local SFT does), their response ending in the EOS token's text (the local SFT's
  target; OpenRLHF's dataset would otherwise append " " + EOS);
- `openrlhf_args.json`: OpenRLHF's arguments, parsed by `train_sft`'s own parser (every
  default is upstream's) from `coldstart.lr`, `batch_size`, `epochs` and `seed`,
  `train.micro_batch_size`, `zero_stage` and `save_every`, plus `coldstart.openrlhf_flags`;
and `sft.sh` beside `out_dir` (the exact launch command), then runs it. A killed SFT resumes from
the DeepSpeed checkpoint OpenRLHF saves every `train.save_every` steps (`.OUT.tmp/_ds/`). The
finished directory is renamed to `out_dir` with the HF model, `sft_log.jsonl` (the step's
token-mean loss on all ranks) and `_SUCCESS`; the DeepSpeed state is removed (RL starts Adam
afresh). OpenRLHF's trainer steps only on full batches: `not_trained` counts the example
visits its samplers' remainders and its last, partial batch leave out.

Each launched process runs `openrlhf.cli.train_sft.train(args)` with three of its module's
names replaced: `get_strategy` (trainer/openrlhf_rank.py's strategy: CPU seams, torch's AdamW),
`Actor` (fp32 on a CPU; on every device its log-probs through trainer/logprobs.py's chunked
head, never full-vocabulary fp32 logits) and `SFTTrainer` (OpenRLHF's, also writing each
step's loss to `sft_log.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.completion import completed, publish, staging_dir
from pipeline.config import Config
from pipeline.io import read_pandas, write_table_atomic

LOG, DS_DIR, LAUNCH = "sft_log.jsonl", "_ds", "sft.sh"
ARGS, EXAMPLES = "openrlhf_args.json", "sft_examples.parquet"
RANK_MODULE = "trainer.openrlhf_sft"
UNSUPPORTED = {  # OpenRLHF flags the chunked Actor does not implement: (the off value, what)
    ("ds", "packing_samples"): (False, "sample packing"),
    ("ds", "ring_attn_size"): (1, "ring attention"),
    ("ds", "use_liger_kernel"): (False, "Liger kernels"),
    ("ds", "load_in_4bit"): (False, "4-bit weights"),
    ("ds", "tensor_parallel_size"): (1, "tensor parallelism"),
    ("model", "aux_loss_coef"): (0, "the MoE balancing loss"),
}


def planned_steps(examples: int, world: int, micro: int, batch: int, epochs: int) -> int:
    """Optimizer steps OpenRLHF's SFT takes: each rank's sampler drops the remainder of the
    examples over the ranks, its loader a last partial micro-batch, and the trainer a last
    partial batch (accumulation windows run across passes)."""
    micro_batches = examples // world // micro
    return micro_batches * epochs // (batch // micro // world)


def write_examples(examples_dir: Path, base_dir: Path, path: Path) -> dict[str, Any]:
    """The examples that fit the base's context, as OpenRLHF's SFT reads them, to `path`;
    returns their counts (`examples`, `too_long`, `by_source` of all the rows)."""
    from transformers import AutoConfig, AutoTokenizer

    from trainer.sft import lm_examples

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    limit = AutoConfig.from_pretrained(base_dir).max_position_embeddings
    rows = read_pandas(examples_dir, columns=["source", "prompt", "response"])
    # (the local SFT's rule; OpenRLHF's dataset also drops a prompt of max_len - 2 tokens or
    # more, and truncates the rest)
    fits = [len(e.context) + len(e.target) <= limit and len(e.context) < limit - 2
            for e in lm_examples(rows["prompt"], rows["response"], tokenizer)]
    kept = pd.DataFrame({"prompt": rows["prompt"][fits],
                         "response": rows["response"][fits] + tokenizer.eos_token}
                        ).reset_index(drop=True)
    if len(kept) == 0:
        raise ValueError(f"{examples_dir}: no example fits the model's context ({limit} tokens)")
    if not path.exists():
        write_table_atomic(kept, path)
    return {"examples": len(kept), "too_long": len(rows) - len(kept), "max_len": limit,
            "by_source": rows["source"].value_counts().to_dict()}


def sft_args(cfg: Config, base_dir: Path, tmp: Path, max_len: int):
    """OpenRLHF's `train_sft` arguments for this cold start (its own parser)."""
    from trainer.openrlhf_compat import parse_openrlhf

    c, tc = cfg.coldstart, cfg.train
    flags = ["--model.model_name_or_path", str(base_dir), "--data.dataset", str(tmp / EXAMPLES),
             "--data.input_key", "prompt", "--data.output_key", "response",
             "--data.input_template", "", "--data.max_len", str(max_len),
             "--train.micro_batch_size", str(tc.micro_batch_size),
             "--train.batch_size", str(c.batch_size), "--train.max_epochs", str(int(c.epochs)),
             "--train.seed", str(c.seed), "--adam.lr", str(c.lr),
             "--ds.zero_stage", str(tc.zero_stage), "--ds.attn_implementation", "sdpa",
             "--ckpt.output_dir", str(tmp), "--ckpt.path", str(tmp / DS_DIR),
             "--ckpt.save_steps", str(tc.save_every), "--ckpt.max_num", "2",
             "--ckpt.load_enable", *shlex.split(c.openrlhf_flags)]
    return parse_openrlhf("openrlhf.cli.train_sft", flags)


def train_sft(base_dir: str | Path, examples_dir: str | Path, out_dir: str | Path, cfg: Config,
              progress: bool = True) -> dict[str, Any]:
    """The cold-start SFT of `base_dir` on the examples with OpenRLHF (see the module
    docstring); returns (and saves) the metrics. A no-op when `out_dir` is complete."""
    from trainer.openrlhf_compat import require_openrlhf, stub_flash_attn, write_args
    from trainer.openrlhf_shard import run_launched, world_size
    from trainer.sft import sft_fingerprint

    base_dir, examples_dir, out_dir = Path(base_dir), Path(examples_dir), Path(out_dir)
    c, tc = cfg.coldstart, cfg.train
    fp = sft_fingerprint(base_dir, examples_dir, cfg)
    done = completed(out_dir, fp)
    if done is not None:
        return done["metrics"]
    require_openrlhf()
    world = world_size(cfg)
    if c.epochs != int(c.epochs):
        raise ValueError(f"coldstart.epochs={c.epochs}: OpenRLHF's SFT trains whole passes "
                         "(--train.max_epochs); give a whole number")
    if c.batch_size % (tc.micro_batch_size * world):
        raise ValueError(f"coldstart.batch_size={c.batch_size} must be a multiple of "
                         f"train.micro_batch_size x processes = {tc.micro_batch_size} x {world}")
    t0 = time.time()
    tmp = staging_dir(out_dir, fp, resume=True)  # (the same fingerprint: resume in it)
    counts = write_examples(examples_dir, base_dir, tmp / EXAMPLES)
    steps = planned_steps(counts["examples"], world, tc.micro_batch_size, c.batch_size,
                          int(c.epochs))
    if steps == 0:
        raise ValueError(f"{counts['examples']} examples fit the context: too few for one "
                         f"step of coldstart.batch_size={c.batch_size} on {world} process(es)")
    stub_flash_attn()
    write_args(sft_args(cfg, base_dir.resolve(), tmp.resolve(), counts["max_len"]), tmp / ARGS)
    returncode = run_launched(RANK_MODULE, ["--args", str((tmp / ARGS).resolve()),
                                            "--log", str((tmp / LOG).resolve())],
                              tc, out_dir.parent / LAUNCH, "the cold-start SFT", progress)
    log = [json.loads(line) for line in (tmp / LOG).read_text().splitlines()] \
        if (tmp / LOG).exists() else []
    if returncode != 0 or len(log) != steps or not (tmp / "config.json").exists():
        raise RuntimeError(f"the OpenRLHF SFT failed (exit {returncode}, {len(log)} of {steps} "
                           f"steps logged; its output is above); re-run to resume from "
                           f"{tmp / DS_DIR}, or run {out_dir.parent / LAUNCH} by hand")
    losses = [s["loss"] for s in log]
    tail = losses[-max(1, len(losses) // 10):]
    metrics = {"examples": counts["examples"], "too_long": counts["too_long"],
               "by_source": counts["by_source"], "steps": steps,
               "not_trained": counts["examples"] * int(c.epochs) - steps * c.batch_size,
               "loss_first": losses[0], "loss_last": sum(tail) / len(tail),
               "seconds": round(time.time() - t0, 2), "backend": "openrlhf",
               "world_size": world}
    shutil.rmtree(tmp / DS_DIR, ignore_errors=True)
    (tmp / EXAMPLES).unlink()
    publish(tmp, out_dir, fp, base=str(base_dir), examples=str(examples_dir), metrics=metrics)
    return metrics


# -- in each launched process --------------------------------------------------------------

def chunked_actor(pretrain: str, **kwargs):
    """OpenRLHF's Actor as `train_sft` builds it (on a CPU in fp32: its loader takes bf16 or
    fp16 only), whose forward computes the log-probs through a LogProbHead: at most one
    chunk's fp32 logits at a time, where `Actor.forward` makes them for the whole batch."""
    import torch
    from openrlhf.models import Actor

    from trainer.logprobs import LogProbHead, sequence_logprobs
    from trainer.openrlhf_rank import fp32_actor

    actor = Actor(pretrain, **kwargs) if torch.cuda.is_available() else fp32_actor(pretrain)
    head = LogProbHead.install(actor.model)

    def forward(sequences, attention_mask=None, return_output=False, return_logprobs=False,
                **unused):
        # OpenRLHF's SFTTrainer asks for (log-probs of tokens 1..L-1, output)
        logp, _ = sequence_logprobs(actor.model, head, sequences, attention_mask)
        return (logp, {}) if return_output else logp

    actor.forward = forward
    return actor


def logging_trainer(log: Path):
    """OpenRLHF's SFTTrainer that also appends each optimizer step's loss (the token mean
    over the step's examples on all ranks), learning rate and gradient norm to `log`."""
    from openrlhf.trainer.sft_trainer import SFTTrainer

    from trainer.rl import truncate_log

    class LoggingSFTTrainer(SFTTrainer):
        resumed = False

        def save_logs_and_checkpoints(self, args, global_step, step_bar, logs_dict=None,
                                      client_states=None):
            # loss_mean is this rank's share of the step's token mean x the ranks: its mean
            # over the ranks is the step's loss
            loss = self.strategy.all_reduce({"loss": logs_dict["loss_mean"]})["loss"]
            if self.strategy.is_rank_0():
                if not self.resumed:  # a resumed run re-logs from its first step
                    truncate_log(log, global_step - 1)
                    self.resumed = True
                with open(log, "a") as f:
                    f.write(json.dumps({"step": global_step, "loss": float(loss),
                                        "lr": logs_dict["lr"],
                                        "grad_norm": logs_dict["grad_norm"]}) + "\n")
            super().save_logs_and_checkpoints(args, global_step, step_bar, logs_dict,
                                              client_states)

    return LoggingSFTTrainer


def main(argv: list[str] | None = None) -> None:
    """The launched process: `python -m trainer.openrlhf_sft --args A --log L`."""
    import torch

    from trainer.openrlhf_compat import stub_flash_attn
    from trainer.openrlhf_rank import cpu_aware_strategy, load_args

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--args", type=Path, required=True, help="OpenRLHF's arguments, JSON")
    parser.add_argument("--log", type=Path, required=True, help="the per-step loss log")
    parser.add_argument("--local_rank", type=int, default=-1)  # (the DeepSpeed launcher's)
    a = parser.parse_args(argv)
    if a.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    stub_flash_attn()
    args = load_args(a.args, torch.cuda.is_available(), UNSUPPORTED)
    import openrlhf.cli.train_sft as upstream

    upstream.get_strategy = lambda args: cpu_aware_strategy(
        args, args.max_norm, (args.train.micro_batch_size, args.train.batch_size))
    upstream.Actor = chunked_actor
    upstream.SFTTrainer = logging_trainer(a.log)
    upstream.train(args)


if __name__ == "__main__":
    main()

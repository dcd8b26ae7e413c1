"""The local RL trainer (torch + transformers; CPU or one GPU): one round's policy update.

    metrics = train_round(policy_dir, shard_dir, out_dir, cfg)

Reads the policy checkpoint (HF directory; its `optimizer.pt` too, when present) and the round's
assembled training shard (stages/schema.TRAINING). Computes the old log-probs with the policy
as it is, the advantages (GRPO on the on-policy rollouts; decoupled for augmented trajectories),
the segment and OOD masks, then runs `train.epochs` passes of mini-batch updates (gradient
accumulation over micro-batches; the loss is a token mean over the mini-batch). Writes to
`out_dir`: the HF checkpoint + tokenizer, `optimizer.pt`, `train_log.jsonl` (one line per
optimizer step: loss, clip fraction, entropy, grad norm, suppressed share, lr, seconds) and
`_SUCCESS` with the round's mean metrics. `algo.kl_coef > 0` adds the k3 KL to a reference policy
(`make iterate`: the run's initial policy, as OpenRLHF's initial model). Resumable: every
`train.save_every` steps the weights, optimizer and step go to `out_dir/_state.pt`
(atomically); a restart recomputes the old log-probs from the untouched starting checkpoint and
continues at the next step.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.completion import completed, mark_complete
from pipeline.config import Config
from pipeline.io import read_pandas
from pipeline.layout import OPTIMIZER, TRAIN_LOG
from pipeline.util import file_sha256, fingerprint
from trainer.lm import accelerator, mixed_precision
from trainer.objective import (
    ObjectiveConfig,
    group_advantages,
    loss_mask,
    policy_loss,
    segment_masks,
)

STATE, LOG = "_state.pt", TRAIN_LOG
OPENRLHF_ONLY = ("launcher", "num_gpus", "hostfile", "zero_stage", "openrlhf_flags")


def train_fingerprint(policy_dir: Path, shard_dir: Path, reference: Path | None,
                      cfg: Config) -> str:
    """What a complete training depends on: the policy, the reference, the shard's files, the
    `train` section (the local backend: less the keys only OpenRLHF reads) and `algo`."""
    skip = set(OPENRLHF_ONLY) if cfg.train.backend == "local" else set()
    return fingerprint({
        "policy": str(policy_dir), "reference": str(reference),
        "shard": sorted(file_sha256(p) for p in shard_dir.glob("part-*.parquet")),
        "train": cfg.train.model_dump(mode="json", exclude=skip),
        "algo": cfg.algo.model_dump(mode="json")})


@dataclass
class Batch:
    """A round's sequences as padded tensors (B sequences, L = prompt + response positions)."""

    input_ids: torch.Tensor  # (B, L), right-padded
    attention_mask: torch.Tensor  # (B, L)
    response_start: torch.Tensor  # (B,) prompt length
    response_len: torch.Tensor  # (B,)
    trained: torch.Tensor  # (B, T) bool, T = max response length
    corrective: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B,)

    def rows(self, idx: torch.Tensor) -> Batch:
        """The sequences `idx`, cut to the longest of them (the right padding beyond it would
        only cost compute: attention is causal)."""
        width = int((self.response_start[idx] + self.response_len[idx]).max())
        t = int(self.response_len[idx].max())
        return Batch(self.input_ids[idx, :width], self.attention_mask[idx, :width],
                     self.response_start[idx], self.response_len[idx], self.trained[idx, :t],
                     self.corrective[idx, :t], self.advantages[idx])

    def to(self, device: torch.device) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))

    def micro_batches(self, idx: torch.Tensor, size: int) -> list[torch.Tensor]:
        """`idx` in micro-batches of `size` sequences of similar length (sorted by length, so
        that `rows` cuts little padding); their losses add up to the same mini-batch loss."""
        by_length = idx[torch.argsort(self.response_start[idx] + self.response_len[idx],
                                      stable=True)]
        return [by_length[j : j + size] for j in range(0, len(by_length), size)]


def objective_config(cfg: Config) -> ObjectiveConfig:
    return ObjectiveConfig(**cfg.algo.model_dump(exclude={"name"}))


def build_batch(rows, pad_id: int, obj: ObjectiveConfig) -> Batch:
    """Tensors of an assembled shard (a pandas frame): sequences, masks and advantages."""
    prompts = [list(p) for p in rows["prompt_token_ids"]]
    responses = [list(r) for r in rows["response_token_ids"]]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    t_max = max(len(r) for r in responses)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
    augmented = torch.tensor((rows["kind"] == "augmented").to_numpy())
    group = torch.tensor(rows["problem_id"].astype("category").cat.codes.to_numpy(),
                         dtype=torch.long)
    reward = torch.tensor(rows["reward"].to_numpy(), dtype=torch.float32)
    seg = [torch.tensor(rows[c].to_numpy(), dtype=torch.long)
           for c in ("prefix_len", "diagnosis_len", "correction_len")]
    trained, corrective = segment_masks(*seg, augmented, t_max)
    return Batch(ids, attn, torch.tensor([len(p) for p in prompts]),
                 torch.tensor([len(r) for r in responses]), trained, corrective,
                 group_advantages(reward, group, augmented, dae=obj.dae, eps=obj.eps,
                                  aug_weight=obj.aug_weight))


def response_logprobs(model, batch: Batch, with_entropy: bool = False):
    """(B, T) log-probs of the response tokens under `model` (0 past each response), and the
    (B, T) entropy of the next-token distribution when asked."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    t_max = batch.trained.shape[1]
    steps = torch.arange(t_max, device=batch.input_ids.device).unsqueeze(0)
    pos = batch.response_start.unsqueeze(1) + steps  # token positions
    valid = steps < batch.response_len.unsqueeze(1)
    pos = torch.where(valid, pos, torch.ones_like(pos))
    step_logits = logits.gather(1, (pos - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    logp_all = torch.log_softmax(step_logits.float(), dim=-1)
    tokens = batch.input_ids.gather(1, pos)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid if with_entropy else None
    return logp, entropy


@torch.no_grad()
def old_logprobs(model, batch: Batch, micro: int) -> torch.Tensor:
    """(B, T) response log-probs of every sequence under `model`, `micro` at a time."""
    model.eval()
    device = batch.input_ids.device
    out = torch.zeros(batch.trained.shape, device=device)
    for idx in batch.micro_batches(torch.arange(len(batch.advantages), device=device), micro):
        with mixed_precision(device):
            logp = response_logprobs(model, batch.rows(idx))[0]
        out[idx, : logp.shape[1]] = logp
    return out


def mini_batches(n_rows: int, tc) -> list[torch.Tensor]:
    """The round's optimizer steps as row indices: each epoch a permutation seeded by
    `train.seed` + epoch, cut into `train.mini_batch_size` rows (both trainers: the same
    steps in the same order)."""
    order = torch.cat([torch.randperm(n_rows, generator=torch.Generator().manual_seed(
        tc.seed + e)) for e in range(tc.epochs)])
    return [order[i : i + tc.mini_batch_size] for i in range(0, len(order), tc.mini_batch_size)]


def round_metrics(log: Path, rows, t0: float) -> dict[str, Any]:
    """A trained round's metrics (both trainers): the mean of each step's figures in the
    training log, the step, sequence and augmented counts, the wall seconds since `t0`."""
    logs = [json.loads(line) for line in log.read_text().splitlines()]
    metrics = {k: sum(entry[k] for entry in logs) / len(logs)
               for k in ("loss", "clip_fraction", "entropy", "grad_norm", "suppressed_share")}
    metrics.update({"steps": len(logs), "sequences": len(rows),
                    "augmented": int((rows["kind"] == "augmented").sum()),
                    "seconds": round(time.time() - t0, 2)})
    return metrics


def round_start(policy_dir: Path, shard_dir: Path, out_dir: Path, cfg: Config,
                reference: str | Path | None) -> tuple[Path | None, str, dict[str, Any] | None]:
    """What both trainers decide before training a round: the KL reference (`reference`,
    default the policy; None without a KL term), the round's fingerprint, and the metrics of
    `out_dir` when it is already complete for it (None: train)."""
    reference = Path(reference or policy_dir) if objective_config(cfg).kl_coef > 0 else None
    fp = train_fingerprint(policy_dir, shard_dir, reference, cfg)
    done = completed(out_dir, fp)
    return reference, fp, None if done is None else done["metrics"]


def read_shard(shard_dir: Path):
    """The round's training rows (a DataFrame); an empty shard is an error."""
    rows = read_pandas(shard_dir)
    if len(rows) == 0:
        raise ValueError(f"{shard_dir}: the training shard is empty")
    return rows


def train_round(policy_dir: str | Path, shard_dir: str | Path, out_dir: str | Path, cfg: Config,
                progress: bool = True, reference: str | Path | None = None) -> dict[str, Any]:
    """Updates the policy at `policy_dir` on the shard; writes the next checkpoint to
    `out_dir` and returns the round's metrics (see the module docstring). With
    `algo.kl_coef > 0` the KL term is taken against `reference` (`make iterate`: the run's
    initial policy; default: `policy_dir`)."""
    policy_dir, shard_dir, out_dir = Path(policy_dir), Path(shard_dir), Path(out_dir)
    tc, obj = cfg.train, objective_config(cfg)
    reference, fp, done = round_start(policy_dir, shard_dir, out_dir, cfg, reference)
    if done is not None:
        return done
    t0 = time.time()
    torch.manual_seed(tc.seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    device = accelerator()  # (a GPU: fp32 weights and Adam, bf16 autocast)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(device)
    rows = read_shard(shard_dir)
    batch = build_batch(rows, tokenizer.pad_token_id, obj).to(device)
    old = old_logprobs(model, batch, tc.micro_batch_size)
    ref = None
    if reference is not None:
        ref = old if reference == policy_dir else old_logprobs(
            AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).to(device),
            batch, tc.micro_batch_size)
    in_loss, _ = loss_mask(batch.advantages, batch.trained, batch.corrective, old, obj)

    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    if (policy_dir / OPTIMIZER).exists():  # Adam moments carry over between rounds
        optimizer.load_state_dict(torch.load(policy_dir / OPTIMIZER, map_location="cpu"))
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = tc.lr, tc.weight_decay
    steps = [idx.to(device) for idx in mini_batches(len(rows), tc)]
    step = 0
    state = torch.load(out_dir / STATE, map_location="cpu") if (out_dir / STATE).exists() else None
    if state is not None and state["fingerprint"] == fp:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        truncate_log(out_dir / LOG, step)  # steps after the saved state re-run
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LOG).unlink(missing_ok=True)

    model.train()
    for i in tqdm(range(step, len(steps)), initial=step, total=len(steps), desc="train",
                  disable=not progress):
        t = time.perf_counter()
        log = _update(model, optimizer, batch, old, ref, in_loss, steps[i], obj, tc)
        log["seconds"] = round(time.perf_counter() - t, 4)
        with open(out_dir / LOG, "a") as f:
            f.write(json.dumps({"step": i + 1, **log}) + "\n")
        if (i + 1) % tc.save_every == 0 and i + 1 < len(steps):
            _save_state(out_dir, {"fingerprint": fp, "step": i + 1, "model": model.state_dict(),
                                  "optimizer": optimizer.state_dict()})

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    torch.save(optimizer.state_dict(), out_dir / OPTIMIZER)
    metrics = round_metrics(out_dir / LOG, rows, t0)
    mark_complete(out_dir, fp, policy=str(policy_dir), shard=str(shard_dir), metrics=metrics)
    (out_dir / STATE).unlink(missing_ok=True)
    return metrics


def _update(model, optimizer, batch: Batch, old: torch.Tensor, ref: torch.Tensor | None,
            in_loss: torch.Tensor, idx: torch.Tensor, obj: ObjectiveConfig,
            tc) -> dict[str, float]:
    """One optimizer step over the mini-batch `idx`, accumulated over micro-batches."""
    normalizer = max(int(in_loss[idx].sum()), 1)
    optimizer.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "clip": 0.0, "entropy": 0.0, "suppressed": 0.0, "rollout_tokens": 0,
            "corrective": 0}
    for micro in batch.micro_batches(idx, tc.micro_batch_size):
        mb = batch.rows(micro)
        t = mb.trained.shape[1]  # (the micro-batch's longest response)
        with mixed_precision(mb.input_ids.device):
            logp, entropy = response_logprobs(model, mb, with_entropy=True)
        out = policy_loss(logp, old[micro, :t], mb.advantages, mb.trained, mb.corrective, obj,
                          ref_logprobs=None if ref is None else ref[micro, :t],
                          normalizer=normalizer)
        out.loss.backward()
        m = out.metrics
        rollout_tokens = m["loss_tokens"] - int((mb.corrective & in_loss[micro, :t]).sum())
        sums["loss"] += out.loss.item()
        sums["clip"] += m["clip_fraction"] * rollout_tokens
        sums["rollout_tokens"] += rollout_tokens
        sums["entropy"] += float((entropy.detach() * in_loss[micro, :t]).sum())
        sums["suppressed"] += m["suppressed_share"] * m["corrective_tokens"]
        sums["corrective"] += m["corrective_tokens"]
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
    optimizer.step()
    return {"loss": sums["loss"], "clip_fraction": sums["clip"] / max(sums["rollout_tokens"], 1),
            "entropy": sums["entropy"] / normalizer, "grad_norm": float(grad_norm),
            "suppressed_share": sums["suppressed"] / max(sums["corrective"], 1),
            "loss_tokens": normalizer, "lr": optimizer.param_groups[0]["lr"]}


def _save_state(out_dir: Path, state: dict) -> None:
    tmp = out_dir / f".{STATE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_dir / STATE)


def truncate_log(path: Path, step: int) -> None:
    """Keeps the log lines of steps 1..`step` (a resumed run re-runs the rest)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))

"""Supervised causal-LM training on (context, target) token pairs: the loss covers target tokens.

Used for the testbed's pretraining on reference solutions and for the cold-start SFT. Reads token
ids in memory; writes nothing itself (the caller saves the model).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

IGNORE = -100


@dataclass(frozen=True)
class LMExample:
    context: list[int]  # prompt (and any kept prefix): conditioned on, no loss
    target: list[int]  # trained tokens (the caller appends EOS if it wants it learned)


@dataclass(frozen=True)
class TrainSchedule:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def collate(examples: Sequence[LMExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (IGNORE outside targets)."""
    length = max(len(e.context) + len(e.target) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        seq = e.context + e.target
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(e.context) : len(seq)] = torch.tensor(e.target)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def accelerator() -> torch.device:
    """Where the in-process trainers (this one, trainer/rl.py) run: the current CUDA device,
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mixed_precision(device: torch.device):
    """bf16 autocast on a GPU (the weights and Adam's state stay fp32); on the CPU nothing: fp32,
    the testbed's exact numbers."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over target tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )


def cosine_lr(step: int, sched: TrainSchedule) -> float:
    if step < sched.warmup_steps:
        return sched.lr * (step + 1) / sched.warmup_steps
    progress = (step - sched.warmup_steps) / max(1, sched.steps - sched.warmup_steps)
    return sched.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_lm(
    model: torch.nn.Module,
    examples: Sequence[LMExample],
    sched: TrainSchedule,
    pad_id: int,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
    optimizer_in: Path | None = None,
    optimizer_out: Path | None = None,
    groups: Sequence[str] | None = None,
) -> list[float]:
    """Trains `model` in place (moved to `accelerator()`) for `sched.steps` AdamW steps on
    batches drawn without replacement (reshuffled each epoch, seeded); returns the loss of every
    step. `groups` (one name per example): a batch holds one group's examples, the group drawn
    each step in proportion to its size (so long examples do not pad short ones). Adam moments
    in the layout of the RL trainer's `optimizer.pt` (one group over `model.parameters()`, with
    the betas they were accumulated under): `optimizer_in`, when it exists, is continued;
    `optimizer_out` gets them at the end, so that training that starts from this model continues
    them (trainer/rl.py)."""
    if not examples:
        raise ValueError("train_lm needs at least one example")
    rng = random.Random(sched.seed)
    torch.manual_seed(sched.seed)
    device = accelerator()
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": sched.weight_decay}, {"params": no_decay}],
        lr=sched.lr,
        betas=(0.9, 0.95),
    )
    if optimizer_in is not None and optimizer_in.exists():
        load_moments(opt, model, optimizer_in)
    members: dict[str, list[int]] = {}
    for i, name in enumerate(groups if groups is not None else [""] * len(examples)):
        members.setdefault(name, []).append(i)
    names, sizes = list(members), [len(m) for m in members.values()]
    orders: dict[str, list[int]] = {name: [] for name in names}
    losses = []
    model.train()
    bar = tqdm(range(sched.steps), desc=desc, unit="step", mininterval=2.0,
               disable=not progress)
    for step in bar:
        name = names[0] if len(names) == 1 else rng.choices(names, weights=sizes)[0]
        order = orders[name]
        if len(order) < sched.batch_size:
            fresh = list(members[name])
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, orders[name] = order[: sched.batch_size], order[sched.batch_size :]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, sched)
        with mixed_precision(device):
            loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), sched.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step:
            on_step(step, losses[-1])
    model.eval()
    if optimizer_out is not None:
        save_moments(opt, model, optimizer_out)
    return losses


def save_moments(opt: torch.optim.Optimizer, model: torch.nn.Module, path: Path) -> None:
    """`opt`'s per-parameter state, re-keyed as `torch.optim.AdamW(model.parameters())`'s
    state dict, with the betas, eps and weight decay of `opt`'s first group (an optimizer that
    loads the file continues the moments with the decay rates they were accumulated under),
    written to `path`."""
    group = opt.param_groups[0]
    single = torch.optim.AdamW(model.parameters(), betas=group["betas"], eps=group["eps"],
                               weight_decay=group["weight_decay"])
    for p in model.parameters():
        single.state[p] = opt.state[p]
    torch.save(single.state_dict(), path)


def load_moments(opt: torch.optim.Optimizer, model: torch.nn.Module, path: Path) -> None:
    """The inverse of `save_moments`: the state at `path` into `opt`, parameter by parameter."""
    single = torch.optim.AdamW(model.parameters())
    single.load_state_dict(torch.load(path, map_location="cpu"))
    for p in model.parameters():
        opt.state[p] = single.state[p]

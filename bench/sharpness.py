"""How far the testbed base can move before it breaks: held-out greedy accuracy after one step
of a given size, along the gradient of its own correct answers or at random.

    python -m bench.sharpness [--config C] [--model PATH] [--problems 64] [--group 8]

Samples `--group` answers at temperature 1 to each of the first `--problems` training problems
(HF engine, seeded), keeps the correct ones (what a GRPO round reinforces) and takes the
gradient of their mean token NLL. Then, each from the same weights: a random +-eps per
parameter; one sign step `-lr * sign(grad)` (a fresh Adam's first step at that lr); gradient
steps of a given norm. Prints one markdown row per perturbation: its norm, the NLL of the
correct answers after it (lower: the step helped on its own data), held-out greedy accuracy.
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import load_config
from pipeline.engines.base import SamplingParams
from pipeline.engines.hf import HFEngine
from pipeline.layout import testbed_split
from stages.tasks import arith
from testbed.base import build_base, greedy_accuracy
from trainer.lm import LMExample, collate, lm_loss

SIGN_STEPS = (1e-5, 1e-4, 3e-4)
GRAD_NORMS = (0.01, 0.03, 0.1)
RANDOM_EPS = 1e-3


def correct_answers(model, tokenizer, problems: pd.DataFrame, group: int) -> list[LMExample]:
    """The model's correct answers among `group` samples at T = 1 per problem, as examples."""
    engine = HFEngine(model, tokenizer, batch_size=256)
    prompts = [arith.PROMPT_TEMPLATE.format(problem=p) for p in problems["problem"]]
    out = engine.generate(prompts, group, SamplingParams(temperature=1.0, max_tokens=160))
    return [LMExample(list(c.prompt_token_ids), list(c.token_ids))
            for completions, answer in zip(out, problems["answer"]) for c in completions
            if arith.grade(c.text, answer)[0] == "correct"]


def nll(model, examples: list[LMExample], pad_id: int, grad: bool = False) -> float:
    """Mean token NLL of the examples (batches of 32, weighted by tokens); with `grad`, the
    gradient of that mean accumulates in the parameters' .grad."""
    total = sum(len(e.target) for e in examples)
    value = 0.0
    for i in range(0, len(examples), 32):
        part = examples[i : i + 32]
        with torch.set_grad_enabled(grad):
            loss = lm_loss(model, collate(part, pad_id)) * sum(len(e.target) for e in part) / total
        if grad:
            loss.backward()
        value += loss.item()
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--model", default=None, help="default: the testbed base (built if missing)")
    p.add_argument("--problems", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    path = args.model or build_base(cfg.testbed, cfg.testbed.base_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    train = pd.read_parquet(testbed_split(cfg.testbed.base_dir, "train")).head(args.problems)
    heldout = pd.read_parquet(testbed_split(cfg.testbed.base_dir, "heldout"))
    torch.manual_seed(0)
    examples = correct_answers(base, tokenizer, train, args.group)
    if not examples:
        raise SystemExit(f"no correct answer among {args.problems} x {args.group} samples: "
                         "raise --problems or --group")
    pad = tokenizer.pad_token_id
    before = nll(base, examples, pad, grad=True)
    grads = {n: q.grad.clone() for n, q in base.named_parameters()}
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
    params = sum(q.numel() for q in base.parameters())
    print(f"{path}: {params:,} parameters; {len(examples)} correct answers of "
          f"{args.problems} x {args.group}; their NLL {before:.4f}; gradient norm {norm:.3f}\n")
    steps = [("none", lambda n: 0.0),
             (f"random +-{RANDOM_EPS:g}", lambda n: RANDOM_EPS * torch.sign(
                 torch.randn_like(grads[n])))]
    steps += [(f"sign step, lr {lr:g}", lambda n, lr=lr: -lr * torch.sign(grads[n]))
              for lr in SIGN_STEPS]
    steps += [(f"gradient step, norm {c:g}", lambda n, c=c: -c * grads[n] / norm)
              for c in GRAD_NORMS]
    print("| perturbation | its norm | NLL of the correct answers | held-out greedy accuracy |")
    print("|---|---|---|---|")
    for name, delta in steps:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        size = 0.0
        with torch.no_grad():
            for n, q in model.named_parameters():
                d = delta(n)
                q.add_(d)
                size += float((torch.as_tensor(d) ** 2).sum()) if torch.is_tensor(d) else 0.0
        accuracy = greedy_accuracy(HFEngine(model, tokenizer, batch_size=256), heldout)
        print(f"| {name} | {size ** 0.5:.3f} | {nll(model, examples, pad):.4f} | "
              f"{accuracy:.3f} |", flush=True)


if __name__ == "__main__":
    main()

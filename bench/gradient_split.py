"""How much of a TAPO round's update its augmented rows drive: the gradient of the round's loss,
split into the on-policy rollouts and the augmented trajectories, under the policy the round
trained from.

    python -m bench.gradient_split RUN_DIR [--rounds 1,5,10]

Per round K: reads RUN_DIR/config.yaml, the assembled shard RUN_DIR/iter_K/assemble and the
policy named in RUN_DIR/iter_K/round.json. Takes the trainer's loss over the whole shard (its
advantages, OOD mask and token mean) twice, over the rollouts only and over the augmented rows
only (one normalizer: all the shard's loss tokens, so the two gradients sum to the full one).
Prints one markdown row per round: each part's rows, loss tokens, mean |advantage| and
gradient norm, the whole loss's gradient norm, the parts' cosine, and the augmented part's
share of the squared gradient, in total and as the median over parameters.

Then what Adam's second moment sees (medians over parameters): the round's mini-batches as the
trainer takes them (train.mini_batch_size, the same order, the trainer's normalizer), each
one's gradient with and without its augmented rows, decayed into the second moment the policy
carries (its `optimizer.pt`, under the beta2 stored with it) as Adam would over the round (the
weights held fixed, gradients before clipping): the round's share of the second moment after
the round, and how much larger the augmented rows make it (`v with / v without`: Adam's step on
the rest shrinks by its square root).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import markdown_table
from pipeline.config import load_config
from pipeline.io import read_pandas
from pipeline.layout import OPTIMIZER, iter_dir, round_summary
from pipeline.util import read_json
from trainer.objective import loss_mask, policy_loss
from trainer.rl import (
    build_batch,
    mini_batches,
    objective_config,
    old_logprobs,
    response_logprobs,
)

MICRO = 64


def split_gradients(run_dir: Path, iteration: int) -> dict[str, float]:
    """The row of one round (see the module docstring)."""
    cfg = load_config(run_dir / "config.yaml")
    policy = read_json(round_summary(run_dir, iteration))["policy"]
    obj = objective_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    rows = read_pandas(iter_dir(run_dir, iteration) / "assemble")
    batch = build_batch(rows, tokenizer.pad_token_id, obj)
    old = old_logprobs(model, batch, MICRO)
    in_loss, _ = loss_mask(batch.advantages, batch.trained, batch.corrective, old, obj)
    augmented = torch.tensor((rows["kind"] == "augmented").to_numpy())
    if not augmented.any():
        raise ValueError(f"{run_dir} round {iteration}: no augmented row to compare")
    normalizer = int(in_loss.sum())
    row: dict[str, float] = {"round": iteration}
    grads = {}
    for part, rows_in in (("rollouts", ~augmented), ("augmented", augmented)):
        model.zero_grad(set_to_none=False)
        idx = torch.nonzero(rows_in).squeeze(1)
        for micro in batch.micro_batches(idx, MICRO):
            mb = batch.rows(micro)
            logp, _ = response_logprobs(model, mb)
            policy_loss(logp, old[micro, : logp.shape[1]], mb.advantages, mb.trained,
                        mb.corrective, obj, normalizer=normalizer).loss.backward()
        grads[part] = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
        row.update({f"{part} rows": int(rows_in.sum()),
                    f"{part} loss tokens": int(in_loss[rows_in].sum()),
                    f"{part} mean abs A": float(batch.advantages[rows_in].abs().mean()),
                    f"{part} grad norm": float(grads[part].norm())})
    on, aug = grads["rollouts"], grads["augmented"]
    row["full grad norm"] = float((on + aug).norm())
    row["cosine"] = float(torch.nn.functional.cosine_similarity(on, aug, dim=0))
    row["augmented share, total"] = float((aug**2).sum() / ((on**2).sum() + (aug**2).sum()))
    per_parameter = aug**2 / (on**2 + aug**2)
    row["augmented share, median"] = float(per_parameter[~per_parameter.isnan()].median())
    if (Path(policy) / OPTIMIZER).exists():
        row.update(second_moment(model, batch, old, in_loss, augmented, obj, cfg.train,
                                 Path(policy) / OPTIMIZER))
    return row


def gradient(model, batch, old, obj, idx: torch.Tensor, normalizer: int) -> torch.Tensor:
    """The flat gradient of the trainer's loss over rows `idx`, divided by `normalizer`."""
    model.zero_grad(set_to_none=False)
    for micro in batch.micro_batches(idx, MICRO):
        mb = batch.rows(micro)
        logp, _ = response_logprobs(model, mb)
        policy_loss(logp, old[micro, : logp.shape[1]], mb.advantages, mb.trained,
                    mb.corrective, obj, normalizer=normalizer).loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


def second_moment(model, batch, old, in_loss, augmented, obj, tc, moments: Path) -> dict:
    """Adam's second moment over the round, with and without the augmented rows (see the module
    docstring)."""
    state = torch.load(moments, map_location="cpu")
    beta2 = state["param_groups"][0]["betas"][1]
    stored = torch.cat([state["state"][i]["exp_avg_sq"].flatten()
                        for i in range(len(list(model.parameters())))])
    steps = mini_batches(len(augmented), tc)
    with_aug, without = torch.zeros_like(stored), torch.zeros_like(stored)
    for idx in steps:
        normalizer = max(int(in_loss[idx].sum()), 1)
        full = gradient(model, batch, old, obj, idx, normalizer)
        on_policy = idx[~augmented[idx]]
        rest = gradient(model, batch, old, obj, on_policy, normalizer) if len(on_policy) else 0
        with_aug = beta2 * with_aug + (1 - beta2) * full**2
        without = beta2 * without + (1 - beta2) * rest**2
    carried = beta2 ** len(steps) * stored
    return {"beta2": beta2,
            "round's share of v, median": float((with_aug / (carried + with_aug)).median()),
            "v with / without augmented, median": float(
                ((carried + with_aug) / (carried + without)).median())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rounds", default="1", help="comma-separated rounds (default 1)")
    args = p.parse_args()
    rows = [split_gradients(args.run_dir, int(k)) for k in args.rounds.split(",")]
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

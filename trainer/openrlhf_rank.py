"""One process of the OpenRLHF shard trainer (trainer/openrlhf_shard.py launches it, once per
GPU, or once per CPU process on a machine without one):

    python -m trainer.openrlhf_rank --policy P --shard S --out O --config C --args A --fingerprint F

It needs torch, transformers, DeepSpeed and OpenRLHF's model, loss and strategy modules; not
vLLM or Ray: OpenRLHF's arguments come parsed from the driver (`--args`, JSON), and the step
below is ActorPPOTrainer.training_step's non-packing text path (openrlhf/trainer/ray/
ppo_actor.py, whose module imports Ray) with OpenRLHF's own PolicyLoss, k3 KL and
`aggregate_loss`, and the strategy's backward and optimizer step. Each process:

- builds OpenRLHF's `DeepspeedStrategy` (ZeRO stage `train.zero_stage`; bf16 on GPU, fp32 on
  CPU) and its `Actor` (sdpa attention; `--actor.gradient_checkpointing_enable` honoured),
  whose LM head returns log-probs a chunk of positions at a time (trainer/logprobs.py: no
  full-vocabulary fp32 logits), and the KL reference under its own DeepSpeed engine (ZeRO-3
  partitions it like the actor);
- computes, before any update, the old and reference log-probs, each process a share of the
  rows, then the advantages and the per-token loss mask of trainer/objective.py exactly as the
  local trainer does, as each Experience's `advantages` and `action_mask`;
- runs the local trainer's mini-batches in the local trainer's order (`train.seed`), each one
  optimizer step normalized over all its tokens on all ranks (`iter_grad_accum_global_norm`),
  every rank the same number of micro-batches (an empty one where it has no rows left);
- saves a DeepSpeed checkpoint every `train.save_every` steps (`OUT/_ds/`: a killed trainer
  resumes from it), then the HF checkpoint, `train_log.jsonl` and `_SUCCESS`.

CPU seams (OpenRLHF assumes CUDA; each replaces the upstream line named beside it):
`CpuAwareStrategy.setup_distributed` (`torch.cuda.set_device`, `init_device_mesh("cuda")`),
`get_ds_train_config` / `get_ds_eval_config` (bf16 off on CPU; and everywhere `torch_adam`,
which compiles nothing), `all_reduce` (a CPU value moved to the CUDA device; OpenRLHF's SFT
trainer reduces its logs), and `_barrier` for `torch_dist_barrier_and_cuda_sync`
(`torch.cuda.synchronize`). trainer/openrlhf_sft.py uses the same strategy.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline.completion import mark_complete
from pipeline.config import Config, load_config
from pipeline.util import read_json, write_json_atomic
from trainer.logprobs import LogProbHead, sequence_logprobs
from trainer.objective import loss_mask
from trainer.openrlhf_compat import stub_flash_attn
from trainer.openrlhf_shard import DS_DIR, LOG
from trainer.rl import (
    build_batch,
    mini_batches,
    objective_config,
    read_shard,
    round_metrics,
    truncate_log,
)

UNSUPPORTED = {  # OpenRLHF flags this trainer does not implement: (the off value, what)
    ("ds", "packing_samples"): (False, "sample packing"),
    ("train", "dynamic_batch_enable"): (False, "dynamic batches"),
    ("ds", "ring_attn_size"): (1, "ring attention"),
    ("ds", "use_liger_kernel"): (False, "Liger kernels"),
    ("train", "enable_ema"): (False, "an EMA model"),
    ("actor", "entropy_coef"): (None, "an entropy loss (the entropy is logged)"),
    ("actor", "aux_loss_coef"): (0, "the MoE balancing loss"),
    ("rollout", "temperature"): (1.0, "a sampling temperature in the log-probs"),
    ("algo.advantage", "is_correction_level"): ("off", "importance-sampling correction"),
}


def load_args(path: Path, on_gpu: bool, unsupported: dict = UNSUPPORTED) -> SimpleNamespace:
    """OpenRLHF's hierarchical arguments as the driver parsed them (trainer/openrlhf_shard.py
    `openrlhf_args`), refusing the `unsupported` flags this trainer would otherwise ignore."""
    def build(x):
        return SimpleNamespace(**{k: build(v) for k, v in x.items()}) if isinstance(x, dict) \
            else x

    args = build(json.loads(Path(path).read_text()))
    for (section, key), (off, what) in unsupported.items():
        node = args
        for part in section.split("."):
            node = getattr(node, part)
        value = getattr(node, key, off)
        if value != off:
            raise ValueError(f"--{section}.{key}: {what} is not supported by tapo's OpenRLHF "
                             "trainers (they train padded micro-batches through a chunked "
                             "LM head)")
    if args.ds.lora.rank:
        raise ValueError("--ds.lora.rank: LoRA is not supported by tapo's OpenRLHF trainers")
    args.local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if not on_gpu:
        args.ds.param_dtype = "fp32"  # (DeepSpeed without bf16; the Actor: `fp32_actor`)
    return args


def _barrier() -> None:
    """OpenRLHF's `torch_dist_barrier_and_cuda_sync` without the CUDA sync on a CPU machine."""
    torch.distributed.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_aware_strategy(args, max_norm: float, batches: tuple[int, int] | None = None):
    """OpenRLHF's DeepspeedStrategy with CPU seams (used only where there is no GPU) and
    torch's AdamW. `batches`: (micro-batch, global batch) as OpenRLHF's trainers give them
    (the SFT); None: the caller sets each optimizer step's micro-batches (see `_train`)."""
    import deepspeed
    import openrlhf.utils.deepspeed.deepspeed as ds_module
    from openrlhf.utils.deepspeed import DeepspeedStrategy
    from torch.distributed.device_mesh import init_device_mesh

    on_gpu = torch.cuda.is_available()
    ours = batches is None

    class CpuAwareStrategy(DeepspeedStrategy):
        def setup_distributed(self, timeout=None):
            if on_gpu:
                super().setup_distributed()
            else:
                # replaces: torch.cuda.set_device(local_rank); deepspeed.init_distributed(timeout)
                # and init_device_mesh("cuda", ...) (openrlhf/utils/deepspeed/deepspeed.py)
                import transformers

                transformers.set_seed(self.seed)
                deepspeed.init_distributed(dist_backend="gloo")
                self.world_size = torch.distributed.get_world_size()
                self.ds_device_mesh = init_device_mesh("cpu", (self.world_size, 1, 1),
                                                       mesh_dim_names=("dp", "sp", "tp"))
                self.setup_ring_attn(self.ds_device_mesh)
                self.accumulated_gradient = (self.train_batch_size // self.micro_train_batch_size
                                             // self.world_size)
            if ours:
                self.accumulated_gradient = 1  # (set per optimizer step: see `_train`)

        def get_ds_train_config(self, optim_dict=None, *, max_norm=None):
            config = super().get_ds_train_config(optim_dict, max_norm=max_norm)
            if ours:  # micro-batches are ours: see `_train`
                config["train_micro_batch_size_per_gpu"] = 1
                config["train_batch_size"] = getattr(self, "world_size", 1)
                config.pop("gradient_accumulation_steps", None)
            if optim_dict is not None:  # torch's AdamW: DeepSpeed's FusedAdam would compile a
                # CUDA extension with nvcc at the first step (minutes; no nvcc: a crash)
                config.setdefault("optimizer", optim_dict)["params"]["torch_adam"] = True
            if not on_gpu:  # DeepSpeed's CPU accelerator: fp32
                config["bf16"]["enabled"] = False
            return config

        def all_reduce(self, data, op="mean"):
            if on_gpu or isinstance(data, dict):
                return super().all_reduce(data, op)
            # replaces the upstream move of a CPU tensor to torch.cuda.current_device()
            value = data.clone() if isinstance(data, torch.Tensor) else torch.tensor([data])
            if op == "mean":
                value /= self.world_size
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX
                                         if op == "max" else torch.distributed.ReduceOp.SUM)
            return value if isinstance(data, torch.Tensor) else value.item()

        def get_ds_eval_config(self, offload=False):
            config = super().get_ds_eval_config(offload)
            if ours:
                config["train_micro_batch_size_per_gpu"] = 1
                config["train_batch_size"] = getattr(self, "world_size", 1)
            if not on_gpu:
                config["bf16"]["enabled"] = False
            return config

    if not on_gpu:  # replaces torch_dist_barrier_and_cuda_sync in the module that calls it
        ds_module.torch_dist_barrier_and_cuda_sync = _barrier
    micro, batch = batches or (1, 1)
    return CpuAwareStrategy(seed=args.train.seed, max_norm=max_norm,
                            micro_train_batch_size=micro, train_batch_size=batch,
                            zero_stage=args.ds.zero_stage, args=args)


def fp32_actor(path: Path):
    """OpenRLHF's Actor around the HF model loaded in fp32 (its own loader takes bf16 or fp16
    only, and a bf16 round trip would change the weights)."""
    from openrlhf.models import Actor
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    actor = Actor(model, temperature=1.0)
    actor.packing_samples = False
    return actor


def build_actor(args, path: Path, strategy, on_gpu: bool, train: bool):
    """OpenRLHF's Actor as its trainer builds it (bf16 on GPU, fp32 on CPU; gradient
    checkpointing when asked), its LM head replaced by a LogProbHead (`actor.logprob_head`)."""
    from openrlhf.models import Actor

    if not on_gpu:
        actor = fp32_actor(path)
    else:
        ds_config = strategy.get_ds_train_config() if train else strategy.get_ds_eval_config()
        actor = Actor(str(path), attn_implementation=args.ds.attn_implementation,
                      param_dtype=args.ds.param_dtype, ds_config=ds_config,
                      packing_samples=False, temperature=1.0)
    if train and args.actor.gradient_checkpointing_enable:
        actor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": args.actor.gradient_checkpointing_reentrant})
    actor.logprob_head = LogProbHead.install(actor.model)
    return actor


def experiences(rows, batch, in_loss: torch.Tensor, logprobs: list[torch.Tensor] | None,
                ref: list[torch.Tensor] | None, device) -> list:
    """One single-sample Experience per shard row (OpenRLHF's replay-buffer items: unbatched
    tensors): `sequences` = prompt + response ids,
    `action_mask` over positions 1..L-1 marking the response tokens in the loss, `advantages`
    the row's advantage on those tokens, `action_log_probs` the old log-probs."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    out = []
    for i, (p, r) in enumerate(zip(rows["prompt_token_ids"], rows["response_token_ids"])):
        p, r = list(p), list(r)
        seq = torch.tensor(p + r, dtype=torch.long, device=device)
        mask = torch.zeros(len(seq) - 1, dtype=torch.bool, device=device)
        mask[len(p) - 1 :] = in_loss[i, : len(r)].to(device)
        old = torch.zeros(len(seq) - 1, device=device)
        if logprobs is not None:
            old[len(p) - 1 :] = logprobs[i][: len(r)]
        base = None
        if ref is not None:
            base = torch.zeros(len(seq) - 1, device=device)
            base[len(p) - 1 :] = ref[i][: len(r)]
        out.append(Experience(
            sequences=seq, attention_mask=torch.ones_like(seq), action_mask=mask,
            action_log_probs=old, base_action_log_probs=base,
            advantages=(batch.advantages[i] * mask).float(),
            response_length=torch.tensor(len(r)), info={}))
    return out


def action_logprobs(actor, exp) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's log-probs and entropies on its action positions (OpenRLHF's `Actor.forward`
    with an action mask, through the chunked head): two (B, A) tensors, the log-probs zero
    outside the mask."""
    logp, entropy = sequence_logprobs(actor.model, actor.logprob_head, exp.sequences,
                                      exp.attention_mask)
    n = exp.action_mask.shape[1]
    return logp[:, -n:] * exp.action_mask.float(), entropy[:, -n:]


@torch.no_grad()
def response_logprobs(actor, items: list, micro: int, rank: int = 0,
                      world: int = 1) -> list[torch.Tensor]:
    """Per row, the log-probs of its response tokens under `actor`. Rank r computes rows r,
    r + world, ... in micro-batches (every rank the same number of forwards: ZeRO-3 gathers
    parameters collectively) and the ranks exchange their results."""
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch

    actor.eval()
    mine = list(range(rank, len(items), world))
    forwards = math.ceil(math.ceil(len(items) / world) / micro)
    found = {}
    for j in range(forwards):
        idx = mine[j * micro : (j + 1) * micro]
        b = make_experience_batch([items[i] for i in idx] or items[:1])
        logp, _ = sequence_logprobs(actor.model, actor.logprob_head, b.sequences,
                                    b.attention_mask)
        for k, i in enumerate(idx):
            n = int(items[i].response_length)
            start = items[i].sequences.shape[0] - 1 - n
            found[i] = logp[k, start : start + n].float().cpu()
    if world > 1:
        shares = [None] * world
        torch.distributed.all_gather_object(shares, found)
        found = {i: lp for share in shares for i, lp in share.items()}
    return [found[i] for i in range(len(items))]


def training_step(actor, exp, info: dict, policy_loss, kl_coef: float, args, strategy, optim,
                  scheduler) -> dict[str, float]:
    """ActorPPOTrainer.training_step for one micro-batch without packing: OpenRLHF's policy
    loss plus `kl_coef` x its KL loss to the reference, backward, and the strategy's optimizer
    step (DeepSpeed applies it at the accumulation boundary)."""
    from openrlhf.models import aggregate_loss
    from openrlhf.models.utils import compute_approx_kl

    actor.train()
    logp, entropy = action_logprobs(actor, exp)
    loss, clip_ratio, *_ = policy_loss(logp, exp.action_log_probs, exp.advantages,
                                       action_mask=exp.action_mask, **info)
    kl_loss = torch.zeros((), device=logp.device)
    if kl_coef > 0:
        kl = compute_approx_kl(logp, exp.base_action_log_probs,
                               log_probs_old=exp.action_log_probs,
                               kl_estimator=args.algo.kl.estimator,
                               unbiased_gradient=args.algo.kl.unbiased_gradient)
        kl_loss = aggregate_loss(kl, exp.action_mask, **info)
    strategy.backward(loss + kl_coef * kl_loss, actor, optim)
    strategy.optimizer_step(optim, actor, scheduler, name="actor")
    return {"policy_loss": float(loss), "kl": float(kl_loss),
            "entropy": float(aggregate_loss(entropy.detach(), exp.action_mask, **info)),
            "clip": float(clip_ratio), "tokens": float(exp.action_mask.sum()),
            "grad_norm": strategy.get_grad_norm(actor)}


def _policy_loss(args):
    """OpenRLHF's PolicyLoss as ActorPPOTrainer builds it from the arguments."""
    from openrlhf.models import PolicyLoss

    a, adv = args.actor, args.algo.advantage
    return PolicyLoss(clip_eps_low=a.eps_clip_low_high[0], clip_eps_high=a.eps_clip_low_high[1],
                      dual_clip=a.dual_clip, token_level_loss=a.loss_agg_mode == "token-mean",
                      policy_loss_type=a.policy_loss_type,
                      is_correction_level=adv.is_correction_level,
                      is_correction_mode=adv.is_correction_mode,
                      is_correction_gating=adv.is_correction_gating,
                      is_correction_threshold=adv.is_correction_threshold)


def _train(args, cfg: Config, policy_dir: Path, shard_dir: Path, out_dir: Path,
           reference: Path | None, fp: str) -> None:
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch
    from openrlhf.utils.loss_utils import iter_grad_accum_global_norm
    from transformers import AutoTokenizer

    t0 = time.time()
    on_gpu = torch.cuda.is_available()
    strategy = cpu_aware_strategy(args, args.actor.max_norm)
    strategy.setup_distributed()
    rank, world = torch.distributed.get_rank(), strategy.world_size
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tc, obj = cfg.train, objective_config(cfg)
    rows = read_shard(shard_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    batch = build_batch(rows, tokenizer.pad_token_id, obj)  # advantages, segments: as local
    steps = mini_batches(len(rows), tc)  # the local trainer's, in its order

    actor = build_actor(args, policy_dir, strategy, on_gpu, train=True)
    actor_cfg = dict(optim="adam", adam=vars(args.actor.adam), muon=vars(args.actor.muon),
                     lr_scheduler=args.actor.lr_scheduler,
                     lr_warmup_ratio=args.actor.lr_warmup_ratio,
                     min_lr_ratio=args.actor.min_lr_ratio, max_norm=args.actor.max_norm,
                     scheduler_steps=len(steps))
    actor, optim, scheduler = strategy.prepare((actor, actor_cfg))
    engine = actor.model
    previous = policy_dir / DS_DIR
    resume = read_json(out_dir / DS_DIR / "state.json")
    if resume is not None and (resume.get("fingerprint") != fp
                               or not (out_dir / DS_DIR / resume["tag"]).is_dir()):
        resume = None
    if (previous / "latest").exists():  # the previous round's optimizer (and its weights)
        try:
            strategy.load_ckpt(engine, str(previous), load_lr_scheduler_states=False)
        except Exception as e:
            raise RuntimeError(f"cannot load the previous round's DeepSpeed checkpoint "
                               f"{previous} (saved with another number of processes or ZeRO "
                               f"stage?); remove it to start this round's optimizer afresh") from e

    plain = experiences(rows, batch, batch.trained, None, None, device)
    old = response_logprobs(actor, plain, tc.micro_batch_size, rank, world)
    ref = None
    if reference is not None and reference == policy_dir:
        ref = old
    elif reference is not None:  # under its own engine: ZeRO-3 partitions it as the actor
        ref_actor = strategy.prepare(build_actor(args, reference, strategy, on_gpu, False))
        ref = response_logprobs(ref_actor, plain, tc.micro_batch_size, rank, world)
        del ref_actor  # (its engine's memory, before the training's)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    t_max = batch.trained.shape[1]
    old_bt = torch.zeros(len(rows), t_max)
    for i, lp in enumerate(old):
        old_bt[i, : len(lp)] = lp
    in_loss, suppressed = loss_mask(batch.advantages, batch.trained, batch.corrective, old_bt,
                                    obj)
    items = experiences(rows, batch, in_loss, old, ref, device)
    suppressed_share = float(suppressed.sum()) / max(int(batch.corrective.sum()), 1)

    step = 0
    if resume is not None:
        strategy.load_ckpt(engine, str(out_dir / DS_DIR), tag=resume["tag"])
        step = resume["step"]
    if rank == 0:
        truncate_log(out_dir / LOG, step)
    policy_loss, kl_coef = _policy_loss(args), obj.kl_coef
    show = rank == 0 and os.environ.get("TAPO_PROGRESS", "1") == "1"
    for i in range(step, len(steps)):
        idx = steps[i]
        k = max(1, math.ceil(len(idx) / (world * tc.micro_batch_size)))  # micro-batches / rank
        mine = idx[rank::world].tolist()
        micro = [mine[j * len(mine) // k : (j + 1) * len(mine) // k] for j in range(k)]
        batches = [make_experience_batch([items[r] for r in m]) if m else _empty(items[idx[0]])
                   for m in micro]
        t = time.perf_counter()
        engine.set_train_batch_size(k * world)  # k micro-batches a rank (the loss scale)
        totals = {"loss": 0.0, "entropy": 0.0, "clip": 0.0, "tokens": 0.0}
        grad_norm = 0.0
        accumulated = iter_grad_accum_global_norm(batches, strategy, k, lambda e: e.action_mask)
        for j, (exp, info) in enumerate(accumulated):
            # a step without loss tokens (all masked): a zero loss, not 0/0 (as the local
            # trainer's normalizer of at least 1)
            info = {**info, **{key: torch.where(info[key] > 0, info[key], 1.0)
                               for key in ("batch_num_tokens", "global_batch_size")}}
            # DeepSpeed's own boundary counts micro-batches since the first step, which a step
            # of another k than the last ones puts off: step after this step's k-th, always
            engine.set_gradient_accumulation_boundary(j == k - 1)
            m = training_step(actor, exp, info, policy_loss, kl_coef, args, strategy, optim,
                              scheduler)
            scale = float(info["dp_size"]) * k
            totals["loss"] += (m["policy_loss"] + kl_coef * m["kl"]) / scale
            totals["entropy"] += m["entropy"] / scale
            if m["tokens"]:  # (OpenRLHF's clip ratio of a micro-batch without tokens: NaN)
                totals["clip"] += m["clip"] * m["tokens"]
            totals["tokens"] += m["tokens"]
            grad_norm = m["grad_norm"]
        reduced = torch.tensor([totals["loss"], totals["entropy"], totals["clip"],
                                totals["tokens"]], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(reduced)
        if rank == 0:
            reduced = reduced.cpu()
            log = {"step": i + 1, "loss": float(reduced[0]), "entropy": float(reduced[1]),
                   "clip_fraction": float(reduced[2] / max(float(reduced[3]), 1.0)),
                   "grad_norm": grad_norm, "suppressed_share": suppressed_share,
                   "loss_tokens": int(reduced[3]), "lr": scheduler.get_last_lr()[0],
                   "seconds": round(time.perf_counter() - t, 4),
                   **({"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
                      if on_gpu else {})}
            with open(out_dir / LOG, "a") as f:
                f.write(json.dumps(log) + "\n")
            if show:
                print(f"train step {i + 1}/{len(steps)}: loss {log['loss']:.4f}", flush=True)
        if (i + 1) % tc.save_every == 0 or i + 1 == len(steps):
            _save_state(strategy, engine, out_dir, fp, i + 1)

    strategy.save_model(actor, tokenizer, str(out_dir))
    if rank == 0:  # the last DeepSpeed checkpoint stays (the next round's optimizer state)
        last = read_json(out_dir / DS_DIR / "state.json")["tag"]
        for old_tag in (out_dir / DS_DIR).glob("step_*"):
            if old_tag.name != last:
                shutil.rmtree(old_tag)
        metrics = {**round_metrics(out_dir / LOG, rows, t0), "backend": "openrlhf",
                   "world_size": world}
        mark_complete(out_dir, fp, policy=str(policy_dir), shard=str(shard_dir), metrics=metrics)
    _barrier()


def _empty(like):
    """A micro-batch that trains nothing (every rank runs the same number of micro-batches)."""
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch

    exp = make_experience_batch([like])
    exp.action_mask = torch.zeros_like(exp.action_mask)
    exp.advantages = torch.zeros_like(exp.advantages)
    return exp


def _save_state(strategy, engine, out_dir: Path, fp: str, step: int) -> None:
    """A DeepSpeed checkpoint of the weights and optimizer after `step`, then (rank 0) the
    marker that names it; the previous one is removed once the new one is complete."""
    tag = f"step_{step:06d}"
    strategy.save_ckpt(engine, str(out_dir / DS_DIR), tag=tag, max_num=2, max_mem=10**9,
                       client_state={"fingerprint": fp, "step": step})
    if torch.distributed.get_rank() == 0:
        write_json_atomic(out_dir / DS_DIR / "state.json",
                          {"fingerprint": fp, "step": step, "tag": tag})
    _barrier()


def main(argv: list[str] | None = None) -> None:
    """The launched process: `python -m trainer.openrlhf_rank --policy ... --shard ...`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--shard", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="a resolved tapo config")
    parser.add_argument("--args", type=Path, required=True, help="OpenRLHF's arguments, JSON")
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--reference", type=Path, default=None)
    parser.add_argument("--local_rank", type=int, default=-1)  # (the DeepSpeed launcher's)
    a = parser.parse_args(argv)
    if a.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    cfg = load_config(a.config)
    stub_flash_attn()
    args = load_args(a.args, torch.cuda.is_available())
    _train(args, cfg, a.policy, a.shard, a.out, a.reference, a.fingerprint)


if __name__ == "__main__":
    main()

"""The OpenRLHF shard trainer (`train.backend: openrlhf`): one round's training shard, trained
by OpenRLHF 0.11.2's own machinery in processes started by DeepSpeed's launcher.

    metrics = train_round(policy_dir, shard_dir, out_dir, cfg)     # the driver (any process)

The driver writes the exact launch command to `ROUND_DIR/train.sh` (the shard's parent), prints
it, and runs it: `deepspeed --num_gpus N [--hostfile H] --module trainer.openrlhf_shard ...`, one
process on a CPU machine (CI), N GPUs on a node, or many nodes. Each process (`main`):

- builds OpenRLHF's arguments with OpenRLHF's own parser (`openrlhf_args`), its
  `DeepspeedStrategy` (ZeRO stage `train.zero_stage`; bf16 on GPU, fp32 on CPU), its `Actor`
  (sdpa attention) and its `ActorPPOTrainer`, whose `training_step` (OpenRLHF's `PolicyLoss`,
  its k3 KL loss, the strategy's backward and optimizer step) trains every micro-batch;
- computes with the Actor, before any update, the old log-probs, then the advantages and the
  per-token loss mask of trainer/objective.py exactly as the local trainer does (GRPO on the
  rollouts, decoupled advantages for augmented trajectories, the prefix as context, OOD
  suppression, `negative_samples`), as each Experience's `advantages` and `action_mask`;
- runs the local trainer's mini-batches in the local trainer's order (`train.seed`), each one
  optimizer step normalized over all its tokens on all ranks (OpenRLHF's
  `iter_grad_accum_global_norm`). We feed `training_step` ourselves instead of calling
  `ppo_train`: its DataLoader drops a last partial micro-batch (`drop_last=True`) and shuffles
  with the global RNG, where a round's shard has any number of rows and none may be lost;
- saves a DeepSpeed checkpoint every `train.save_every` steps (`OUT/_ds/`; a killed trainer
  resumes from it, old log-probs recomputed from the untouched starting checkpoint), then the HF
  checkpoint (`strategy.save_model`, loadable by vLLM and transformers), `train_log.jsonl` and
  `_SUCCESS`. The final DeepSpeed checkpoint stays in `OUT/_ds/`: the next round loads its
  optimizer state (as the local trainer carries `optimizer.pt`); `tapo iterate` removes it once
  that round has trained (trainer.backends.prune_optimizer_state).

With one fp32 process, one optimizer step gives the local trainer's loss, advantages and loss
mask (tests/test_openrlhf_shard.py). `algo.ood=shaping` needs the current policy's
probabilities inside the loss and is not offered (as in the online adapter).

CPU seams (OpenRLHF assumes CUDA; each replaces the upstream line named beside it):
`CpuAwareStrategy.setup_distributed` (`torch.cuda.set_device`, `init_device_mesh("cuda")`),
`CpuAwareStrategy.get_ds_train_config` (adds `torch_adam` and turns bf16 off on CPU),
`_barrier` in place of `torch_dist_barrier_and_cuda_sync` (`torch.cuda.synchronize`), and
`_no_cuda_device_query` around the trainer's construction (its replay buffer's device).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, load_config, write_resolved
from pipeline.io import read_pandas
from pipeline.layout import DS_STATE, OPTIMIZER, TRAIN_LOG
from pipeline.util import read_json, write_json_atomic
from trainer.backends import require_openrlhf
from trainer.objective import loss_mask
from trainer.rl import build_batch, objective_config, train_fingerprint, truncate_log

SUCCESS, LOG, DS_DIR, LAUNCH = "_SUCCESS", TRAIN_LOG, DS_STATE, "train.sh"
ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")  # DeepSpeed's CPU all-reduce buffers live here


# --- the driver ------------------------------------------------------------------------------


def launch_command(policy_dir: Path, shard_dir: Path, out_dir: Path, config_file: Path,
                   reference: Path | None, fp: str, cfg: Config, port: int) -> list[str]:
    """The launcher command line that trains the shard (`train.launcher`)."""
    tc = cfg.train
    module = ["--policy", str(policy_dir), "--shard", str(shard_dir), "--out", str(out_dir),
              "--config", str(config_file), "--fingerprint", fp,
              *(["--reference", str(reference)] if reference is not None else [])]
    if tc.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                str(tc.num_gpus), "--master_port", str(port), "-m", __name__, *module]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(tc.num_gpus),
            *(["--hostfile", tc.hostfile] if tc.hostfile else []), "--master_port", str(port),
            "--module", __name__, *module]


def train_round(policy_dir: str | Path, shard_dir: str | Path, out_dir: str | Path, cfg: Config,
                progress: bool = True, reference: str | Path | None = None) -> dict[str, Any]:
    """Trains the shard with OpenRLHF in launched processes (see the module docstring); returns
    the round's metrics. A no-op when `out_dir` is complete for the same inputs."""
    policy_dir, shard_dir, out_dir = Path(policy_dir), Path(shard_dir), Path(out_dir)
    obj = objective_config(cfg)
    if obj.ood == "shaping":
        raise ValueError("algo.ood=shaping needs pi inside the loss: train.backend=openrlhf "
                         "offers mask and off (train.backend=local has shaping)")
    reference = Path(reference or policy_dir) if obj.kl_coef > 0 else None
    fp = train_fingerprint(policy_dir, shard_dir, reference, cfg)
    done = read_json(out_dir / SUCCESS)
    if done is not None and done.get("fingerprint") == fp:
        return done["metrics"]
    require_openrlhf()  # here, not in the launched processes, whose error would be in their log
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = write_resolved(cfg, out_dir / "train_config.yaml")
    port = _free_port()
    command = launch_command(policy_dir.resolve(), shard_dir.resolve(), out_dir.resolve(),
                             config_file.resolve(), reference and reference.resolve(), fp, cfg,
                             port)
    script = shard_dir.parent / LAUNCH
    script.write_text("#!/bin/sh\n# the round's training (train.backend=openrlhf)\n"
                      + shlex.join(command) + "\n")
    script.chmod(0o755)
    print(f"training with OpenRLHF: {shlex.join(command)}", file=sys.stderr, flush=True)
    if (policy_dir / OPTIMIZER).exists() and not (policy_dir / DS_DIR / "latest").exists():
        print(f"note: {policy_dir / OPTIMIZER} (Adam moments for the local trainer) is not "
              "read: DeepSpeed starts this round's optimizer afresh", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TAPO_PROGRESS": "1" if progress else "0"}
    try:
        result = subprocess.run(command, env=env)
    finally:
        remove_shm_buffers(port)
    done = read_json(out_dir / SUCCESS)
    if result.returncode != 0 or done is None or done.get("fingerprint") != fp:
        raise RuntimeError(f"the OpenRLHF trainer failed (exit {result.returncode}; its output "
                           f"is above); re-run to resume from {out_dir / DS_DIR}, or run "
                           f"{script} by hand")
    return done["metrics"]


def shm_buffers(port: int | str = "*") -> list[Path]:
    """The shared-memory files of DeepSpeed's CPU all-reduce (one of 69 MB per local rank,
    `deepspeed_allreduce_buffer_<uid>_<addr>_<master port>_<rank>` in /dev/shm) of this user's
    launches on `port` (default: every port)."""
    return sorted(SHM.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def remove_shm_buffers(port: int) -> None:
    """Removes the launch's all-reduce buffers: DeepSpeed never unlinks them, so every CPU
    training round would leave them in memory (/dev/shm is RAM) until the machine restarts."""
    for path in shm_buffers(port):
        path.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- inside each launched process ------------------------------------------------------------


def stub_flash_attn() -> None:
    """Lets OpenRLHF import where flash-attn cannot be installed (a machine without CUDA): its
    models import `flash_attn.bert_padding` at module level but call it only when packing
    samples, which the shard trainer never does. A no-op where flash-attn is installed."""
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("flash_attn") is not None:
        return

    def unavailable(*args, **kwargs):
        raise RuntimeError("flash-attn is not installed: sample packing needs it")

    for name in ("flash_attn", "flash_attn.bert_padding", "flash_attn.utils",
                 "flash_attn.utils.distributed"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        sys.modules.setdefault(name, module)
    for attr in ("pad_input", "unpad_input", "index_first_axis", "rearrange"):
        setattr(sys.modules["flash_attn.bert_padding"], attr, unavailable)
    sys.modules["flash_attn.utils.distributed"].all_gather = unavailable


def openrlhf_args(cfg: Config, policy_dir: Path, on_gpu: bool):
    """OpenRLHF's own arguments (its `train_ppo_ray` parser, so every default is upstream's),
    set from the tapo config: the optimizer, clip range, batch sizes and KL of the local
    trainer, plus `train.openrlhf_flags`."""
    import argparse as _argparse
    import runpy

    from openrlhf.utils.config import hierarchize

    tc, algo = cfg.train, cfg.algo
    kl = (["--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef",
           str(algo.kl_coef)] if algo.kl_coef > 0 else ["--algo.kl.init_coef", "0"])
    flags = ["--actor.model_name_or_path", str(policy_dir), "--ds.zero_stage",
             str(tc.zero_stage), "--ds.param_dtype", "bf16", "--ds.attn_implementation", "sdpa",
             "--actor.adam.lr", str(tc.lr), "--actor.adam.betas", "0.9", "0.999",
             "--actor.adam.weight_decay", str(tc.weight_decay), "--actor.max_norm",
             str(tc.max_grad_norm), "--actor.lr_scheduler", "constant",
             "--actor.eps_clip_low_high", str(algo.clip_low), str(algo.clip_high),
             "--actor.entropy_coef", "0", "--train.micro_batch_size", str(tc.micro_batch_size),
             "--train.batch_size", str(tc.mini_batch_size), "--train.max_epochs",
             str(tc.epochs), "--train.seed", str(tc.seed), "--rollout.n_samples_per_prompt",
             str(cfg.rollout.group_size), "--algo.advantage.estimator", "group_norm", *kl,
             *shlex.split(tc.openrlhf_flags)]

    class Parsed(Exception):
        pass

    original = _argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise Parsed(original(self, flags))

    _argparse.ArgumentParser.parse_args = parse
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    except Parsed as parsed:
        args = hierarchize(parsed.args[0])
    finally:
        _argparse.ArgumentParser.parse_args = original
    args.local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if not on_gpu:
        args.ds.param_dtype = "fp32"  # (DeepSpeed without bf16; the Actor: `fp32_actor`)
    return args


def _barrier() -> None:
    """OpenRLHF's `torch_dist_barrier_and_cuda_sync` without the CUDA sync on a CPU machine."""
    torch.distributed.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cpu_aware_strategy(args):
    """OpenRLHF's DeepspeedStrategy, with CPU seams (used only where there is no GPU)."""
    import deepspeed
    import openrlhf.trainer.ray.ppo_actor as ppo_actor
    import openrlhf.utils.deepspeed.deepspeed as ds_module
    from openrlhf.utils.deepspeed import DeepspeedStrategy
    from torch.distributed.device_mesh import init_device_mesh

    on_gpu = torch.cuda.is_available()

    class CpuAwareStrategy(DeepspeedStrategy):
        def setup_distributed(self, timeout=None):
            if on_gpu:
                return super().setup_distributed()
            # replaces: torch.cuda.set_device(local_rank); deepspeed.init_distributed(timeout)
            # and init_device_mesh("cuda", ...) (openrlhf/utils/deepspeed/deepspeed.py)
            import transformers

            transformers.set_seed(self.seed)
            deepspeed.init_distributed(dist_backend="gloo")
            self.world_size = torch.distributed.get_world_size()
            self.ds_device_mesh = init_device_mesh("cpu", (self.world_size, 1, 1),
                                                   mesh_dim_names=("dp", "sp", "tp"))
            self.setup_ring_attn(self.ds_device_mesh)
            self.accumulated_gradient = 1  # (set per optimizer step: see `_train`)

        def get_ds_train_config(self, optim_dict=None, *, max_norm=None):
            config = super().get_ds_train_config(optim_dict, max_norm=max_norm)
            config["train_micro_batch_size_per_gpu"] = 1  # micro-batches are ours: see `_train`
            config["train_batch_size"] = self.world_size if hasattr(self, "world_size") else 1
            config.pop("gradient_accumulation_steps", None)
            if not on_gpu:  # DeepSpeed's CPU accelerator: torch's AdamW, fp32
                config["bf16"]["enabled"] = False
                if optim_dict is not None:
                    config.setdefault("optimizer", optim_dict)["params"]["torch_adam"] = True
            return config

    if not on_gpu:  # replaces torch_dist_barrier_and_cuda_sync in the modules that call it
        ds_module.torch_dist_barrier_and_cuda_sync = _barrier
        ppo_actor.torch_dist_barrier_and_cuda_sync = _barrier
    return CpuAwareStrategy(seed=args.train.seed, max_norm=args.actor.max_norm,
                            micro_train_batch_size=1, train_batch_size=1,
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


def _actor(args, path: Path, strategy, on_gpu: bool):
    """OpenRLHF's Actor as its trainer builds it: bf16 on GPU, fp32 on CPU."""
    from openrlhf.models import Actor

    if not on_gpu:
        return fp32_actor(path)
    return Actor(str(path), attn_implementation=args.ds.attn_implementation,
                 param_dtype=args.ds.param_dtype, ds_config=strategy.get_ds_train_config(),
                 packing_samples=False, temperature=1.0)


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


@torch.no_grad()
def response_logprobs(model, items: list, micro: int) -> list[torch.Tensor]:
    """Per row, the log-probs of its response tokens under `model` (an OpenRLHF Actor)."""
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch

    model.eval()
    out = []
    for lo in range(0, len(items), micro):
        chunk = items[lo : lo + micro]
        b = make_experience_batch(chunk)
        full = torch.ones_like(b.action_mask)  # every position: we cut the response out
        lp = model(b.sequences, full, attention_mask=b.attention_mask)
        for j, item in enumerate(chunk):
            n = int(item.response_length)
            start = item.sequences.shape[0] - 1 - n
            out.append(lp[j, start : start + n].float().cpu())
    return out


def _train(args, cfg: Config, policy_dir: Path, shard_dir: Path, out_dir: Path,
           reference: Path | None, fp: str) -> None:
    from openrlhf.trainer.ppo_utils.experience import make_experience_batch
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer
    from openrlhf.utils.loss_utils import iter_grad_accum_global_norm
    from transformers import AutoTokenizer

    t0 = time.time()
    on_gpu = torch.cuda.is_available()
    strategy = cpu_aware_strategy(args)
    strategy.setup_distributed()
    rank, world = torch.distributed.get_rank(), strategy.world_size
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    tc, obj = cfg.train, objective_config(cfg)
    rows = read_pandas(shard_dir)
    if len(rows) == 0:
        raise ValueError(f"{shard_dir}: the training shard is empty")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    batch = build_batch(rows, tokenizer.pad_token_id, obj)  # advantages, segments: as local
    order = torch.cat([torch.randperm(len(rows), generator=torch.Generator().manual_seed(
        tc.seed + e)) for e in range(tc.epochs)])
    steps = [order[i : i + tc.mini_batch_size] for i in range(0, len(order), tc.mini_batch_size)]

    actor = _actor(args, policy_dir, strategy, on_gpu)
    actor_cfg = dict(optim="adam", adam=vars(args.actor.adam), muon=vars(args.actor.muon),
                     lr_scheduler=args.actor.lr_scheduler, lr_warmup_ratio=0.0,
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
    old = response_logprobs(actor, plain, tc.micro_batch_size)
    ref = None
    if reference is not None:
        ref = old if reference == policy_dir else response_logprobs(
            _actor(args, reference, strategy, on_gpu).to(device), plain, tc.micro_batch_size)
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
    with _no_cuda_device_query(on_gpu):
        trainer = ActorPPOTrainer(strategy, actor, ema_model=None, actor_optim=optim,
                                  actor_scheduler=scheduler,
                                  micro_train_batch_size=tc.micro_batch_size,
                                  tokenizer=tokenizer)
    kl_ctl = obj.kl_coef
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
            # DeepSpeed's own boundary counts micro-batches since the first step, which a step
            # of another k than the last ones puts off: step after this step's k-th, always
            engine.set_gradient_accumulation_boundary(j == k - 1)
            status = trainer.training_step(exp, kl_ctl, i, info)
            m, scale = status["metrics"], float(info["dp_size"]) * k
            totals["loss"] += (float(m["policy_loss"]) + kl_ctl * float(m.get("kl", 0.0))) / scale
            totals["entropy"] += float(m.get("entropy_loss", 0.0)) / scale
            totals["clip"] += float(m["ppo_clip_ratio"]) * status["num_action_tokens"]
            totals["tokens"] += status["num_action_tokens"]
            grad_norm = float(m.get("actor_grad_norm", grad_norm))
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
        logs = [json.loads(line) for line in (out_dir / LOG).read_text().splitlines()]
        metrics = {key: sum(log[key] for log in logs) / len(logs)
                   for key in ("loss", "clip_fraction", "entropy", "grad_norm",
                               "suppressed_share")}
        metrics.update({"steps": len(logs), "sequences": len(rows),
                        "augmented": int((rows["kind"] == "augmented").sum()),
                        "seconds": round(time.time() - t0, 2), "backend": "openrlhf",
                        "world_size": world})
        write_json_atomic(out_dir / SUCCESS, {"fingerprint": fp, "policy": str(policy_dir),
                                              "shard": str(shard_dir), "metrics": metrics})
    _barrier()


@contextlib.contextmanager
def _no_cuda_device_query(on_gpu: bool):
    """On CPU, `torch.cuda.current_device()` answers 0 while the trainer is built: replaces
    the query in NaiveReplayBuffer.__init__ (openrlhf/trainer/ppo_utils/replay_buffer.py:40),
    whose device the shard trainer never uses (it feeds `training_step` itself)."""
    if on_gpu:
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = original


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
    """The launched process: `python -m trainer.openrlhf_shard --policy ... --shard ...`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--shard", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="a resolved tapo config")
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--reference", type=Path, default=None)
    parser.add_argument("--local_rank", type=int, default=-1)  # (the DeepSpeed launcher's)
    a = parser.parse_args(argv)
    if a.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(a.local_rank))
    cfg = load_config(a.config)
    stub_flash_attn()
    args = openrlhf_args(cfg, a.policy, torch.cuda.is_available())
    _train(args, cfg, a.policy, a.shard, a.out, a.reference, a.fingerprint)


if __name__ == "__main__":
    main()

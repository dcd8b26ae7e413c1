"""The OpenRLHF shard trainer (`train.backend: openrlhf`): one round's training shard, trained
by OpenRLHF 0.11.2's own machinery in processes started by DeepSpeed's launcher.

    metrics = train_round(policy_dir, shard_dir, out_dir, cfg)     # the driver (any process)

This module is the driver. It parses OpenRLHF's arguments with OpenRLHF's own parser
(`openrlhf_args`: every default is upstream's) into `OUT/openrlhf_args.json`, writes the exact
launch command to `ROUND_DIR/train.sh` (the shard's parent), prints it, and runs it:
`deepspeed --num_gpus N [--hostfile H] --module trainer.openrlhf_rank ...`, one process on a
CPU machine (CI), N GPUs on a node, or many nodes. What each launched process does is in
trainer/openrlhf_rank.py: it needs neither vLLM nor Ray, which only the driver imports.

We feed OpenRLHF's loss ourselves instead of calling `ppo_train`: its DataLoader drops a last
partial micro-batch (`drop_last=True`) and shuffles with the global RNG, where a round's shard
has any number of rows and none may be lost. The final DeepSpeed checkpoint stays in `OUT/_ds/`:
the next round loads its optimizer state (as the local trainer carries `optimizer.pt`);
`tapo iterate` removes it once that round has trained (trainer.backends.prune_optimizer_state).

With one fp32 process, each optimizer step gives the local trainer's loss, advantages and loss
mask (tests/test_openrlhf_shard.py). `algo.ood=shaping` needs the current policy's
probabilities inside the loss and is not offered (as in the online adapter).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.completion import completed
from pipeline.config import Config, TrainConfig, write_resolved
from pipeline.layout import DS_STATE, OPTIMIZER, TRAIN_LOG
from trainer.openrlhf_compat import parse_openrlhf, require_openrlhf, stub_flash_attn, write_args
from trainer.rl import round_start

LOG, DS_DIR, LAUNCH = TRAIN_LOG, DS_STATE, "train.sh"
ARGS = "openrlhf_args.json"  # OpenRLHF's parsed arguments, read by each rank
RANK_MODULE = "trainer.openrlhf_rank"
ROOT = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")  # DeepSpeed's CPU all-reduce buffers live here


def launch_command(module: str, module_args: list[str], tc: TrainConfig,
                   port: int) -> list[str]:
    """The launcher command line (`train.launcher`) that runs `python -m module module_args` in
    every training process."""
    if tc.launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                str(tc.num_gpus), "--master_port", str(port), "-m", module, *module_args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(tc.num_gpus),
            *(["--hostfile", tc.hostfile] if tc.hostfile else []), "--master_port", str(port),
            "--module", module, *module_args]


def run_launched(module: str, module_args: list[str], tc: TrainConfig, script: Path,
                 what: str, progress: bool) -> int:
    """Writes the launch command to `script` (a shell script to re-run by hand), prints it, runs
    it with this repository on PYTHONPATH, removes DeepSpeed's shared-memory buffers after, and
    returns its exit status."""
    port = master_port(tc.hostfile)
    command = launch_command(module, module_args, tc, port)
    script.write_text(f"#!/bin/sh\n# {what} (train.backend=openrlhf)\n"
                      + shlex.join(command) + "\n")
    script.chmod(0o755)
    print(f"{what} with OpenRLHF: {shlex.join(command)}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "TAPO_PROGRESS": "1" if progress else "0"}
    try:
        return subprocess.run(command, env=env).returncode
    finally:
        remove_shm_buffers(port)


def train_round(policy_dir: str | Path, shard_dir: str | Path, out_dir: str | Path, cfg: Config,
                progress: bool = True, reference: str | Path | None = None) -> dict[str, Any]:
    """Trains the shard with OpenRLHF in launched processes (see the module docstring); returns
    the round's metrics. A no-op when `out_dir` is complete for the same inputs."""
    policy_dir, shard_dir, out_dir = Path(policy_dir), Path(shard_dir), Path(out_dir)
    if cfg.algo.ood == "shaping":
        raise ValueError("algo.ood=shaping needs pi inside the loss: train.backend=openrlhf "
                         "offers mask and off (train.backend=local has shaping)")
    reference, fp, done = round_start(policy_dir, shard_dir, out_dir, cfg, reference)
    if done is not None:
        return done
    require_openrlhf()  # here, not in the launched processes, whose error would be in their log
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = write_resolved(cfg, out_dir / "train_config.yaml")
    stub_flash_attn()
    write_args(openrlhf_args(cfg, policy_dir), out_dir / ARGS)
    if (policy_dir / OPTIMIZER).exists() and not (policy_dir / DS_DIR / "latest").exists():
        print(f"note: {policy_dir / OPTIMIZER} (Adam moments for the local trainer) is not "
              "read: DeepSpeed starts this round's optimizer afresh", file=sys.stderr, flush=True)
    module_args = ["--policy", str(policy_dir.resolve()), "--shard", str(shard_dir.resolve()),
                   "--out", str(out_dir.resolve()), "--config", str(config_file.resolve()),
                   "--args", str((out_dir / ARGS).resolve()), "--fingerprint", fp,
                   *(["--reference", str(reference.resolve())] if reference is not None else [])]
    script = shard_dir.parent / LAUNCH
    returncode = run_launched(RANK_MODULE, module_args, cfg.train, script,
                              "the round's training", progress)
    done = completed(out_dir, fp)
    if returncode != 0 or done is None:
        raise RuntimeError(f"the OpenRLHF trainer failed (exit {returncode}; its output "
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


def hostfile_hosts(path: str) -> list[tuple[str, int]]:
    """(host, slots) of each line of a DeepSpeed hostfile (`host slots=N`, # comments)."""
    hosts = []
    for line in Path(path).read_text().splitlines():
        fields = line.split("#")[0].split()
        if fields:
            slots = [int(f.removeprefix("slots=")) for f in fields[1:] if f.startswith("slots=")]
            hosts.append((fields[0], slots[0] if slots else 1))
    if not hosts:
        raise ValueError(f"train.hostfile {path}: no `host slots=N` line")
    return hosts


def world_size(cfg: Config) -> int:
    """Training processes in all: the hostfile's slots, or `train.num_gpus` on this machine."""
    tc = cfg.train
    return sum(s for _, s in hostfile_hosts(tc.hostfile)) if tc.hostfile else tc.num_gpus


FREE_PORT = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"


def master_port(hostfile: str) -> int:
    """A free port on the master: this machine, or with a hostfile its first host (where
    DeepSpeed's launcher puts rank 0), asked over ssh as the launcher itself reaches it."""
    master = hostfile_hosts(hostfile)[0][0] if hostfile else "localhost"
    if master in ("localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()):
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]
    try:
        out = subprocess.run(["ssh", "-o", "BatchMode=yes", master, "python3", "-c",
                              shlex.quote(FREE_PORT)], capture_output=True, text=True,
                             timeout=60)
        error = out.stderr.strip() if out.returncode != 0 else ""
    except (OSError, subprocess.TimeoutExpired) as e:
        error = str(e)
    if error:
        raise RuntimeError(f"cannot reach the master {master} (the hostfile's first host) over "
                           f"ssh to pick a free port: {error}")
    return int(out.stdout.strip())


def openrlhf_args(cfg: Config, policy_dir: Path):
    """OpenRLHF's own arguments (its `train_ppo_ray` parser, so every default is upstream's),
    set from the tapo config: the optimizer, clip range, batch sizes and KL of the local
    trainer, plus `train.openrlhf_flags`."""
    tc, algo = cfg.train, cfg.algo
    kl = (["--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef",
           str(algo.kl_coef)] if algo.kl_coef > 0 else ["--algo.kl.init_coef", "0"])
    flags = ["--actor.model_name_or_path", str(policy_dir), "--ds.zero_stage",
             str(tc.zero_stage), "--ds.param_dtype", "bf16", "--ds.attn_implementation", "sdpa",
             "--actor.adam.lr", str(tc.lr), "--actor.adam.betas", "0.9", "0.999",
             "--actor.adam.weight_decay", str(tc.weight_decay), "--actor.max_norm",
             str(tc.max_grad_norm), "--actor.lr_scheduler", "constant",
             "--actor.eps_clip_low_high", str(algo.clip_low), str(algo.clip_high),
             "--actor.lr_warmup_ratio", "0", "--train.micro_batch_size", str(tc.micro_batch_size),
             "--train.batch_size", str(tc.mini_batch_size), "--train.max_epochs",
             str(tc.epochs), "--train.seed", str(tc.seed), "--rollout.n_samples_per_prompt",
             str(cfg.rollout.group_size), "--algo.advantage.estimator", "group_norm", *kl,
             *shlex.split(tc.openrlhf_flags)]
    return parse_openrlhf("openrlhf.cli.train_ppo_ray", flags)



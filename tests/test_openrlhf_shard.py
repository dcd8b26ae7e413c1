"""The OpenRLHF shard trainer (train.backend=openrlhf) on CPU: DeepSpeed's launcher, one fp32
process, OpenRLHF's Actor, PolicyLoss and DeepSpeed strategy for real (only flash-attn, which
cannot install without CUDA, is stubbed: the trainer never packs samples)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("openrlhf")
pytest.importorskip("deepspeed")

from bench.gpu_check import kill_after_saved_step  # noqa: E402
from pipeline.config import write_resolved  # noqa: E402
from pipeline.io import read_pandas  # noqa: E402
from trainer import openrlhf_rank, openrlhf_shard  # noqa: E402
from trainer.backends import train_round  # noqa: E402
from trainer.objective import loss_mask  # noqa: E402
from trainer.openrlhf_compat import stub_flash_attn  # noqa: E402
from trainer.rl import build_batch, objective_config, old_logprobs  # noqa: E402

ROOT = openrlhf_shard.ROOT


def test_experiences_carry_the_local_advantages_and_loss_mask(shard):
    """In the trainer's own Experiences (OpenRLHF's Actor computing the old log-probs), every
    response token has the local trainer's advantage and the local trainer's loss mask,
    OOD-suppressed corrective tokens included."""
    stub_flash_attn()
    cfg, policy, shard_dir = shard
    obj = objective_config(cfg)
    rows = read_pandas(shard_dir)
    tok = AutoTokenizer.from_pretrained(policy)
    batch = build_batch(rows, tok.pad_token_id, obj)
    local_old = old_logprobs(AutoModelForCausalLM.from_pretrained(policy), batch, 8)
    local_mask, suppressed = loss_mask(batch.advantages, batch.trained, batch.corrective,
                                       local_old, obj)
    assert suppressed.any()  # (the shard has OOD corrective tokens: the mask matters)

    actor = openrlhf_rank.build_actor(None, policy, None, on_gpu=False, train=False)
    plain = openrlhf_rank.experiences(rows, batch, batch.trained, None, None, "cpu")
    old = openrlhf_rank.response_logprobs(actor, plain, 8)
    old_bt = torch.zeros_like(local_old)
    for i, lp in enumerate(old):
        old_bt[i, : len(lp)] = lp
    assert torch.allclose(old_bt, local_old, atol=1e-5)
    mask, _ = loss_mask(batch.advantages, batch.trained, batch.corrective, old_bt, obj)
    assert torch.equal(mask, local_mask)
    items = openrlhf_rank.experiences(rows, batch, mask, old, None, "cpu")
    for i, (item, p) in enumerate(zip(items, rows["prompt_token_ids"])):
        n = int(item.response_length)
        start = len(p) - 1  # action position j predicts token j + 1
        assert not item.action_mask[:start].any()
        assert torch.equal(item.action_mask[start : start + n], local_mask[i, :n])
        expected = batch.advantages[i] * local_mask[i, :n]
        assert torch.equal(item.advantages[start : start + n], expected.float())
        assert torch.allclose(item.action_log_probs[start : start + n], local_old[i, :n],
                              atol=1e-5)


def test_openrlhf_flags_are_honoured_or_refused(shard, tmp_path):
    """`train.openrlhf_flags` reach each rank through the driver's parsed arguments:
    gradient checkpointing is switched on in the trained Actor (not parsed and dropped), and a
    flag the shard trainer does not implement (sample packing) is an error, not ignored."""
    stub_flash_attn()
    cfg, policy, _ = shard

    def rank_args(flags):
        flagged = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"openrlhf_flags": flags})})
        path = tmp_path / "openrlhf_args.json"
        path.write_text(json.dumps(openrlhf_shard.openrlhf_args(flagged, policy), default=vars))
        return openrlhf_rank.load_args(path, on_gpu=False)

    for flags, expected in (("--actor.gradient_checkpointing_enable", True), ("", False)):
        actor = openrlhf_rank.build_actor(rank_args(flags), policy, None, on_gpu=False,
                                          train=True)
        assert actor.model.is_gradient_checkpointing is expected
    with pytest.raises(ValueError, match="sample packing is not supported"):
        rank_args("--ds.packing_samples")


def test_driver_parses_openrlhfs_arguments_without_ray(shard, tmp_path):
    """A machine with the training stack but no Ray or vLLM (bench/gpu_check.sh's) parses the
    same OpenRLHF arguments as one with them."""
    cfg, policy, _ = shard
    config = write_resolved(cfg, tmp_path / "cfg.yaml")
    code = ("import json, sys\n"
            "{block}"
            "from pipeline.config import load_config\n"
            "from trainer.openrlhf_compat import stub_flash_attn\n"
            "from trainer.openrlhf_shard import openrlhf_args\n"
            "stub_flash_attn()\n"
            f"args = openrlhf_args(load_config({str(config)!r}), {str(policy)!r})\n"
            "print(json.dumps(args, default=vars))\n")
    parsed = []
    for block in ("", "sys.modules['ray'] = sys.modules['vllm'] = None\n"):
        out = subprocess.run([sys.executable, "-c", code.format(block=block)], cwd=tmp_path,
                             capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr[-2000:]
        args = json.loads(out.stdout.strip().splitlines()[-1])
        del args["logger"]["wandb"]["run_name"]  # (OpenRLHF's default: the minute it parsed)
        parsed.append(args)
    assert parsed[0] == parsed[1] and parsed[1]["actor"]["adam"]["lr"] == cfg.train.lr


def test_shaping_is_refused_before_anything_runs(tmp_path):
    """algo.ood=shaping needs the current policy inside the loss, which OpenRLHF's PolicyLoss
    does not take: the driver says so before reading a model or launching."""
    from pipeline.config import load_config

    cfg = load_config(None, ["train.backend=openrlhf", "algo.ood=shaping"])
    with pytest.raises(ValueError, match="shaping needs pi inside the loss"):
        openrlhf_shard.train_round(tmp_path / "none", tmp_path / "none", tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_master_port_is_picked_on_the_hostfiles_first_host(tmp_path):
    """With a hostfile the rendezvous port is free on its first host (rank 0's), not on the
    driver: a local first host binds here, a remote one is asked over ssh (an unreachable one
    is an error naming it)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nlocalhost slots=2\nnode-b slots=8  # the second\n")
    assert openrlhf_shard.hostfile_hosts(str(hostfile)) == [("localhost", 2), ("node-b", 8)]
    assert 0 < openrlhf_shard.master_port(str(hostfile)) < 65536
    hostfile.write_text("no-such-host.invalid slots=8\n")
    with pytest.raises(RuntimeError, match="no-such-host.invalid"):
        openrlhf_shard.master_port(str(hostfile))
    hostfile.write_text("# empty\n")
    with pytest.raises(ValueError, match="no `host slots=N` line"):
        openrlhf_shard.hostfile_hosts(str(hostfile))


def test_another_openrlhf_version_is_refused_before_the_launch(shard, tmp_path, monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.12.0" if name == "openrlhf" else real(name))
    cfg, policy, shard_dir = shard
    remote = cfg.model_copy(update={"train": cfg.train.model_copy(update={"backend": "openrlhf"})})
    with pytest.raises(ImportError, match=r"openrlhf==0\.11\.2, found 0\.12\.0"):
        train_round(policy, shard_dir, tmp_path / "out", remote, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a DeepSpeed launch a case, about 1 min
@pytest.mark.parametrize("kl_coef, zero_stage", [(0.0, 2), (0.5, 3)])
def test_steps_give_the_local_trainers_losses(shard, tmp_path, kl_coef, zero_stage):
    """Two optimizer steps over the shard, fp32, one process under DeepSpeed's launcher: each
    step's loss equals the local trainer's (to 1e-4: the first before any update, the second
    after one update by each); the checkpoint is an HF model, the exact command is in the
    round's train.sh, the DeepSpeed checkpoint stays for the next round's optimizer. With a KL
    loss, under ZeRO-3, as from round 2 on: the policy is a trained model and the reference the
    base, partitioned under its own engine; the KL term counts from step 1. Both start a fresh
    Adam: the policy is without its moments, which only the local trainer reads."""
    cfg, base, shard_dir = shard
    policy, reference = tmp_path / "policy", None
    if kl_coef:  # round 1's model (a large step away from the base), the base as reference
        fast = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e-3})})
        train_round(base, shard_dir, tmp_path / "round1", fast, progress=False)
        base, reference = tmp_path / "round1", base
    shutil.copytree(base, policy, ignore=shutil.ignore_patterns("optimizer.pt"))
    n = len(read_pandas(shard_dir, columns=["kind"]))
    two_steps = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"mini_batch_size": (n + 1) // 2,
                                              "micro_batch_size": 8}),
        "algo": cfg.algo.model_copy(update={"kl_coef": kl_coef})})
    local = train_round(policy, shard_dir, tmp_path / "local", two_steps, progress=False,
                        reference=reference)
    buffers = openrlhf_shard.shm_buffers()
    remote_cfg = two_steps.model_copy(update={"train": two_steps.train.model_copy(
        update={"backend": "openrlhf", "zero_stage": zero_stage})})
    remote = train_round(policy, shard_dir, tmp_path / "openrlhf", remote_cfg, progress=False,
                         reference=reference)
    assert local["steps"] == remote["steps"] == 2 and remote["backend"] == "openrlhf"
    assert openrlhf_shard.shm_buffers() == buffers  # its /dev/shm all-reduce buffer: removed
    logs = [[json.loads(line) for line in (tmp_path / d / "train_log.jsonl").read_text()
             .splitlines()] for d in ("local", "openrlhf")]
    for a, b in zip(*logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and a["loss"] != 0
        assert b["loss_tokens"] == a["loss_tokens"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    if not kl_coef:
        assert remote["suppressed_share"] > 0  # (the base: OOD corrective tokens to mask)
    else:
        no_kl = two_steps.model_copy(update={"algo": cfg.algo})
        train_round(policy, shard_dir, tmp_path / "no_kl", no_kl, progress=False)
        first = json.loads((tmp_path / "no_kl" / "train_log.jsonl").read_text().splitlines()[0])
        assert logs[1][0]["loss"] - first["loss"] > 1e-4  # the KL term, from step 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "openrlhf")
    assert not all(torch.equal(a, b) for a, b in zip(
        model.state_dict().values(),
        AutoModelForCausalLM.from_pretrained(policy).state_dict().values()))  # it moved
    script = (shard_dir.parent / "train.sh").read_text()
    assert "deepspeed.launcher.runner --num_gpus 1" in script and "trainer.openrlhf_rank" in script
    assert (tmp_path / "openrlhf" / "_ds" / "latest").exists()
    assert len(list((tmp_path / "openrlhf" / "_ds").glob("step_*"))) == 1  # the last one only
    again = train_round(policy, shard_dir, tmp_path / "openrlhf", remote_cfg, progress=False,
                        reference=reference)
    assert again == remote  # complete: a no-op


@pytest.mark.slow
def test_killed_trainer_resumes_from_its_deepspeed_checkpoint(shard, tmp_path):
    """SIGKILL the launcher's process group after a saved step; the re-run resumes from the
    DeepSpeed checkpoint and ends with the weights of an uninterrupted run, each step logged
    once."""
    cfg, policy, shard_dir = shard
    overrides = ["train.backend=openrlhf", "train.mini_batch_size=16",
                 "train.micro_batch_size=8", "train.save_every=2"]
    cfg_path = write_resolved(cfg, tmp_path / "cfg.yaml")

    def command(out):
        return [sys.executable, "-m", "tapo", "train", "--policy", str(policy), "--shard",
                str(shard_dir), "--out", str(out), "--config", str(cfg_path), *overrides]

    assert subprocess.run(command(tmp_path / "whole"), capture_output=True).returncode == 0
    kill_after_saved_step(command(tmp_path / "killed"),
                          tmp_path / "killed" / "_ds" / "state.json", 2, timeout_s=600)
    assert not (tmp_path / "killed" / "_SUCCESS").exists()
    assert subprocess.run(command(tmp_path / "killed"), capture_output=True).returncode == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "killed").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    whole = json.loads((tmp_path / "whole" / "_SUCCESS").read_text())["metrics"]["steps"]
    assert steps == list(range(1, whole + 1)) and whole > 2


@pytest.mark.slow
def test_iterate_two_rounds_with_openrlhf(small_base, tmp_path):
    """`make iterate TRAINER=openrlhf` on the small config: two rounds, each trained by
    OpenRLHF under DeepSpeed; round 2 samples from round 1's HF checkpoint."""
    from tapo.flows.iterate import iterate

    cfg = small_base("train.backend=openrlhf", "rollout.problems_per_round=8")
    table = iterate(tmp_path / "run", 2, cfg, progress=False)
    assert list(table["round"]) == [1, 2]
    summary = json.loads((tmp_path / "run" / "iter_0002" / "round.json").read_text())
    assert summary["policy"] == str(tmp_path / "run" / "models" / "iter_0001")
    for k in (1, 2):
        done = json.loads((tmp_path / "run" / "models" / f"iter_{k:04d}" / "_SUCCESS")
                          .read_text())
        assert done["metrics"]["backend"] == "openrlhf"
        assert (tmp_path / "run" / f"iter_{k:04d}" / "train.sh").exists()
    # the DeepSpeed state round 2 started from is gone; round 2's own stays for round 3
    assert not (tmp_path / "run" / "models" / "iter_0001" / "_ds").exists()
    assert (tmp_path / "run" / "models" / "iter_0002" / "_ds" / "latest").exists()


@pytest.mark.slow
def test_two_processes_train_like_one(shard, tmp_path, monkeypatch):
    """`train.num_gpus=2` on CPU: two DeepSpeed processes (gloo, ZeRO-2 partitions the
    optimizer), each with half of every mini-batch and of the old log-prob pass, the loss
    normalized over both: the same step losses and grad norms as one process. The launched
    processes cannot import Ray or vLLM (a sitecustomize blocks them): a training node needs
    neither."""
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('ray', 'vllm'):\n    sys.modules[name] = None\n")
    monkeypatch.setenv("PYTHONPATH", str(blocker))
    cfg, policy, shard_dir = shard
    logs, buffers = [], openrlhf_shard.shm_buffers()
    for n in (1, 2):
        ncfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
            "backend": "openrlhf", "num_gpus": n, "mini_batch_size": 32,
            "micro_batch_size": 8})})
        metrics = train_round(policy, shard_dir, tmp_path / f"p{n}", ncfg, progress=False)
        assert metrics["world_size"] == n
        assert openrlhf_shard.shm_buffers() == buffers  # each rank's buffer removed
        logs.append([json.loads(line) for line in
                     (tmp_path / f"p{n}" / "train_log.jsonl").read_text().splitlines()])
    assert len(logs[0]) == len(logs[1]) > 1
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss_tokens"] == a["loss_tokens"]


@pytest.mark.slow  # three DeepSpeed launches, about 1.5 min
def test_a_shorter_last_step_applies_its_whole_gradient(shard, tmp_path):
    """5 sequences, mini-batches of 3, micro-batches of 1: steps of 3 and then 2 micro-batches.
    DeepSpeed counts micro-batches across steps, so without an explicit boundary its step 2
    would step after 1 micro-batch (4 % 2 == 0) and never apply the other: the final model's
    log-probs would differ from the local trainer's, which the test compares on every token.
    With two processes, step 1 gives one of them an empty micro-batch (2 rows and 1): the same
    model again, and every logged figure finite (OpenRLHF's clip ratio of an empty micro-batch
    is NaN)."""
    from pipeline.io import write_table_atomic

    cfg, base, shard_dir = shard
    policy = tmp_path / "policy"
    shutil.copytree(base, policy, ignore=shutil.ignore_patterns("optimizer.pt"))
    rows = read_pandas(shard_dir)
    rollouts = rows[rows["kind"] == "rollout"]
    mixed = rollouts.groupby("problem_id")["reward"].transform("nunique") > 1
    group = rollouts[mixed & (rollouts["problem_id"] == rollouts[mixed]["problem_id"].iloc[0])]
    rows = group.sort_values("reward", kind="stable").iloc[[0, 1, 2, -2, -1]]  # right and wrong
    five = tmp_path / "five"
    write_table_atomic(rows, five / "part-00000.parquet")
    steps = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"mini_batch_size": 3, "micro_batch_size": 1, "lr": 1e-3})})
    train_round(policy, five, tmp_path / "local", steps, progress=False)
    for n in (1, 2):
        remote = train_round(policy, five, tmp_path / f"openrlhf{n}", steps.model_copy(update={
            "train": steps.train.model_copy(update={"backend": "openrlhf", "num_gpus": n})}),
            progress=False)
        assert remote["steps"] == 2 and remote["world_size"] == n
        log = (tmp_path / f"openrlhf{n}" / "train_log.jsonl").read_text()
        assert all(math.isfinite(v) for line in log.splitlines()
                   for v in json.loads(line).values()), log
    tok = AutoTokenizer.from_pretrained(policy)
    batch = build_batch(rows, tok.pad_token_id, objective_config(cfg))
    logp = {d: old_logprobs(AutoModelForCausalLM.from_pretrained(tmp_path / d), batch, 5)
            for d in ("policy", "local", "openrlhf1", "openrlhf2")}
    moved = (logp["local"] - logp["policy"]).abs().max()
    assert moved > 1e-2  # the updates are large enough to see
    for d in ("openrlhf1", "openrlhf2"):
        assert (logp[d] - logp["local"]).abs().max() < moved / 100, d

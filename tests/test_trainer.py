"""The local trainer and `iterate` on the small testbed: real steps, a real kill, real resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import write_resolved
from pipeline.io import read_pandas
from tapo.flows.iterate import iterate, read_metrics
from tapo.flows.round import run_round
from trainer.objective import policy_loss
from trainer.rl import _update, build_batch, objective_config, old_logprobs, response_logprobs


def test_one_step_lowers_the_loss_on_its_batch(shard):
    cfg, policy, shard_dir = shard
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 3e-4})})
    rows = read_pandas(shard_dir)
    model = AutoModelForCausalLM.from_pretrained(policy)
    obj = objective_config(cfg)
    batch = build_batch(rows, 0, obj)
    old = old_logprobs(model, batch, 16)
    # the segments: augmented rows train only diagnosis + correction, rollouts every token
    aug = torch.tensor((rows["kind"] == "augmented").to_numpy())
    assert (batch.trained[aug].sum(1) == torch.tensor(
        (rows.diagnosis_len + rows.correction_len)[aug.numpy()].to_numpy())).all()

    def loss():
        with torch.no_grad():
            logp, _ = response_logprobs(model, batch)
        return policy_loss(logp, old, batch.advantages, batch.trained, batch.corrective,
                           obj).loss.item()

    before = loss()
    assert before == pytest.approx(-float((batch.advantages.unsqueeze(1) * _in_loss(
        batch, old, obj)).sum() / _in_loss(batch, old, obj).sum()), abs=1e-5)  # ratio 1
    in_loss = _in_loss(batch, old, obj)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)  # a fresh Adam's first
    # step moves every weight by lr; 1e-3 overshoots the small base (docs/results.md, sharpness)
    log = _update(model, optimizer, batch, old, None, in_loss, torch.arange(len(rows)), obj,
                  cfg.train)
    assert log["grad_norm"] > 0 and log["loss_tokens"] == int(in_loss.sum())
    model.eval()
    assert loss() < before


def _in_loss(batch, old, obj):
    from trainer.objective import loss_mask

    return loss_mask(batch.advantages, batch.trained, batch.corrective, old, obj)[0]


def test_train_round_writes_checkpoint_log_and_is_a_noop_when_done(shard, tmp_path):
    cfg, policy, shard_dir = shard
    metrics = _train(cfg, policy, shard_dir, tmp_path / "ckpt", "train.mini_batch_size=32")
    out = tmp_path / "ckpt"
    assert (out / "config.json").exists() and (out / "optimizer.pt").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, metrics["steps"] + 1))
    assert metrics["steps"] == -(-metrics["sequences"] // 32)
    for key in ("loss", "clip_fraction", "entropy", "grad_norm", "suppressed_share"):
        assert key in metrics and key in log[0]
    assert 0 <= metrics["suppressed_share"] <= 1 and metrics["entropy"] > 0
    # round 1 continues the base's pretraining Adam moments (the testbed base saves them)
    moments = [{int(s["step"]) for s in torch.load(Path(d) / "optimizer.pt")["state"].values()}
               for d in (policy, out)]
    assert len(moments[0]) == 1 and moments[1] == {next(iter(moments[0])) + metrics["steps"]}
    # ... under the betas pretraining accumulated them with (not a default AdamW group's)
    betas = [tuple(torch.load(Path(d) / "optimizer.pt")["param_groups"][0]["betas"])
             for d in (policy, out)]
    assert betas == [(0.9, 0.95), (0.9, 0.95)]
    new = AutoModelForCausalLM.from_pretrained(out).state_dict()
    old = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    assert any(not torch.equal(new[k], old[k]) for k in new)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert _train(cfg, policy, shard_dir, out, "train.mini_batch_size=32") == metrics
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def _train(cfg, policy, shard_dir, out, *overrides):
    from pipeline.config import load_config
    from trainer.rl import train_round

    write_resolved(cfg, out.parent / "cfg.yaml")
    return train_round(policy, shard_dir, out, load_config(out.parent / "cfg.yaml", overrides),
                       progress=False)


@pytest.mark.slow  # about 25 s
def test_resume_after_kill_inside_training(shard, tmp_path):
    """SIGKILL a training run between two saved states (save_every=3); the restart ends with the
    weights of an uninterrupted run, and the log holds steps 1..N once each."""
    cfg, policy, shard_dir = shard
    overrides = ["train.mini_batch_size=8", "train.micro_batch_size=2", "train.save_every=3"]
    whole = _train(cfg, policy, shard_dir, tmp_path / "whole", *overrides)
    cfg_path = tmp_path / "cfg.yaml"
    cmd = [sys.executable, "-m", "tapo", "train", "--policy", str(policy), "--shard",
           str(shard_dir), "--out", str(tmp_path / "killed"), "--config", str(cfg_path),
           *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines())
                                          >= 4):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len(log.read_text().splitlines())
    saved = torch.load(tmp_path / "killed" / "_state.pt")["step"]
    assert saved % 3 == 0 and logged > saved  # killed inside an interval: steps to redo
    assert not (tmp_path / "killed" / "_SUCCESS").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "killed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, whole["steps"] + 1))  # each step once


def test_iterate_two_rounds_tapo_and_grpo_and_resume(small_base, tmp_path):
    """Rounds chain from `policy.path` (round 1 only) to models/iter_0001; a resumed run reports
    each round's own line and keeps the seconds each stage measured."""
    base = small_base().testbed.base_dir + "/model"
    cfg = small_base(f"policy.path={base}")
    shown = []
    table = iterate(tmp_path / "tapo", 2, cfg, progress=False, on_round=shown.append)
    assert list(table["round"]) == [1, 2] and set(table["algo"]) == {"tapo"}
    assert [row["round"] for row in shown] == [1, 2]
    assert (table["accepted"] > 0).any()
    for column in ("pass_rate", "loss", "clip_fraction", "reflection_rate", "seconds_sample",
                   "seconds_train", "suppressed_share"):
        assert table[column].notna().all()
    assert (table["seconds_sample"] > 0).all()
    run = tmp_path / "tapo"
    summaries = [json.loads((run / f"iter_000{k}" / "round.json").read_text()) for k in (1, 2)]
    assert summaries[0]["policy"] == base
    assert summaries[1]["policy"] == str(run / "models" / "iter_0001")  # not policy.path again
    trained = [json.loads((run / "models" / f"iter_000{k}" / "_SUCCESS").read_text())["policy"]
               for k in (1, 2)]
    assert trained == [base, str(run / "models" / "iter_0001")]

    # killed between stages of round 2: its construct and everything after it re-run
    for path in ("iter_0002/construct/__stage/SUCCESS.json",
                 "iter_0002/assemble/__stage/SUCCESS.json", "models/iter_0002/_SUCCESS"):
        (run / path).unlink()
    shown.clear()
    again = iterate(run, 2, cfg, progress=False, on_round=shown.append)
    assert [row["round"] for row in shown] == [1, 2]
    assert shown[0]["pass_rate"] == table["pass_rate"][0]  # round 1's own line, not round 2's
    pd.testing.assert_frame_equal(again.drop(columns=["seconds_construct", "seconds_assemble",
                                                      "seconds_train"]),
                                  table.drop(columns=["seconds_construct", "seconds_assemble",
                                                      "seconds_train"]))  # measured seconds kept
    assert len(read_metrics(run)) == 2

    grpo = iterate(tmp_path / "grpo", 2, small_base("algo.name=grpo"), progress=False)
    assert list(grpo["accepted"]) == [0, 0] and set(grpo["algo"]) == {"grpo"}
    first = read_pandas(tmp_path / "grpo" / "iter_0001" / "problems")["problem_id"]
    assert list(first) == list(read_pandas(run / "iter_0001" / "problems")[
        "problem_id"])  # the same data on the same schedule


def test_kl_to_the_reference_policy(shard, tmp_path):
    """algo.kl_coef > 0 trains (it crashed: no ref_logprobs). The first step's loss, at ratio
    1, is the plain loss plus kl_coef x the mean k3 to the reference: 0 when the reference is
    the policy itself, positive against another checkpoint."""
    from trainer.rl import train_round

    cfg, policy, shard_dir = shard
    one_step = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"mini_batch_size": 10_000, "micro_batch_size": 64, "lr": 1e-2})})
    with_kl = one_step.model_copy(update={"algo": one_step.algo.model_copy(
        update={"kl_coef": 0.5})})
    plain = train_round(policy, shard_dir, tmp_path / "plain", one_step, progress=False)
    same = train_round(policy, shard_dir, tmp_path / "same", with_kl, progress=False)
    assert same["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    other = train_round(policy, shard_dir, tmp_path / "other", with_kl, progress=False,
                        reference=tmp_path / "plain")
    assert other["loss"] > plain["loss"] + 1e-4  # `plain` took one step at lr 1e-2


def test_round_k_needs_the_previous_checkpoint(small_base, tmp_path):
    with pytest.raises(FileNotFoundError, match="train round 2 first"):
        run_round(tmp_path / "run", 3, small_base(), progress=False)

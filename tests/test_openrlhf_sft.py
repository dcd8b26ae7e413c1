"""The cold-start SFT through OpenRLHF's train_sft (train.backend=openrlhf) on CPU: DeepSpeed's
launcher, OpenRLHF's SFTDataset, SFTTrainer, SFTLoss and DeepSpeed strategy for real, on the
small testbed's reference solutions."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

pytest.importorskip("openrlhf")
pytest.importorskip("deepspeed")

from bench.gpu_check import kill_after_saved_step, response_nll, solution_examples  # noqa: E402
from pipeline.config import write_resolved  # noqa: E402
from pipeline.io import part_name, write_table_atomic  # noqa: E402
from stages import schema  # noqa: E402
from trainer import openrlhf_rank, openrlhf_sft  # noqa: E402
from trainer.backends import train_sft  # noqa: E402
from trainer.openrlhf_compat import stub_flash_attn, write_args  # noqa: E402
from trainer.openrlhf_shard import shm_buffers  # noqa: E402

ROOT = openrlhf_sft.Path(__file__).resolve().parent.parent


def _examples(cfg, tmp_path, n=8):
    """n reference-solution examples and one too long for the small base's context."""
    solution_examples(cfg, _base(cfg), tmp_path / "ex", n)
    rows = pd.read_parquet(tmp_path / "ex" / part_name(0))
    long = pd.DataFrame([{"example_id": "long/sft", "source": "sft", "problem_id": "long",
                          "prompt": "9 + " * 3000, "response": "x"}])
    write_table_atomic(pd.concat([rows, long]), tmp_path / "ex" / part_name(0),
                       schema=schema.SFT_EXAMPLES)
    return tmp_path / "ex"


def _base(cfg):
    from stages.common import policy_path

    return policy_path(cfg)


def test_examples_fit_and_end_as_the_local_sft_target(small_base, tmp_path):
    """What OpenRLHF's dataset will read: the examples that fit (the too-long one counted),
    each prompt + response tokenizing to the local SFT's context + target + EOS."""
    cfg = small_base("train.backend=openrlhf")
    base = _base(cfg)
    counts = openrlhf_sft.write_examples(_examples(cfg, tmp_path), base, tmp_path / "x.parquet")
    assert (counts["examples"], counts["too_long"]) == (8, 1)
    assert counts["by_source"] == {"direct": 8, "sft": 1}
    kept, source = pd.read_parquet(tmp_path / "x.parquet"), pd.read_parquet(tmp_path / "ex")
    tok = AutoTokenizer.from_pretrained(base)
    for (p, r), (_, s) in zip(kept[["prompt", "response"]].values, source.iterrows()):
        assert r == s["response"] + tok.eos_token
        ids = tok(p + r, add_special_tokens=False)["input_ids"]
        assert ids == (tok(s["prompt"], add_special_tokens=False)["input_ids"]
                       + tok(s["response"], add_special_tokens=False)["input_ids"]
                       + [tok.eos_token_id])


def test_arguments_come_from_train_sfts_own_parser(small_base, tmp_path):
    cfg = small_base("train.backend=openrlhf", "coldstart.lr=0.002", "coldstart.batch_size=8",
                     "coldstart.openrlhf_flags=--model.gradient_checkpointing_enable")
    stub_flash_attn()
    args = openrlhf_sft.sft_args(cfg, _base(cfg), tmp_path, 512)
    assert (args.data.input_key, args.data.output_key, args.data.input_template) == \
        ("prompt", "response", "")
    assert (args.adam.lr, args.train.batch_size, args.data.max_len) == (0.002, 8, 512)
    assert args.model.gradient_checkpointing_enable and args.ckpt.load_enable
    assert args.lr_scheduler == "cosine_with_min_lr"  # upstream's default, kept
    path = tmp_path / "args.json"
    write_args(args, path)
    loaded = openrlhf_rank.load_args(path, False, openrlhf_sft.UNSUPPORTED)
    assert loaded.ds.param_dtype == "fp32"  # on a CPU
    packed = json.loads(path.read_text())
    packed["ds"]["packing_samples"] = True
    path.write_text(json.dumps(packed))
    with pytest.raises(ValueError, match="packing"):
        openrlhf_rank.load_args(path, False, openrlhf_sft.UNSUPPORTED)


@pytest.mark.parametrize("override, message", [
    ("coldstart.epochs=1.5", "whole number"),
    ("coldstart.batch_size=6", "multiple of train.micro_batch_size x processes"),
    ("coldstart.batch_size=64", "too few for one step"),
])
def test_a_cold_start_that_cannot_run_says_why_before_launching(small_base, tmp_path,
                                                                 override, message):
    cfg = small_base("train.backend=openrlhf", "train.micro_batch_size=4", override)
    with pytest.raises(ValueError, match=message):
        train_sft(_base(cfg), _examples(cfg, tmp_path), tmp_path / "model", cfg,
                  progress=False)
    assert not (tmp_path / "model").exists() and not (tmp_path / "sft.sh").exists()


def test_planned_steps_match_openrlhfs_sampler_loader_and_windows():
    # 11 examples, 1 process, micro 2, batch 4, 2 passes: 5 micro-batches a pass, windows of 2
    # across passes: 5 steps (a 27 s run here logged 5)
    assert openrlhf_sft.planned_steps(11, 1, 2, 4, 2) == 5
    # 2 processes: the sampler keeps 5 a rank, the loader 2 micro-batches, windows of 1
    assert openrlhf_sft.planned_steps(11, 2, 2, 4, 2) == 4


@pytest.mark.slow  # about 2 minutes: four launches
def test_openrlhf_sft_trains_the_token_mean_and_resumes(small_base, tmp_path):
    """8 examples, a batch of 8 (micro 2), 6 passes: every step is the token mean over all 8,
    so the first step's logged loss is the base's NLL computed here independently, and one
    process and two (ZeRO-2) end with the same weights. Killed after a saved step and run
    again, it ends with the uninterrupted run's weights and a log without repeated steps."""
    overrides = ["train.backend=openrlhf", "coldstart.batch_size=8", "coldstart.epochs=6",
                 "coldstart.lr=0.0003", "train.micro_batch_size=2", "train.save_every=1"]
    cfg = small_base(*overrides)
    base, examples = _base(cfg), _examples(cfg, tmp_path)
    kept = tmp_path / "kept"
    rows = pd.read_parquet(examples)
    write_table_atomic(rows[rows["source"] == "direct"], kept / part_name(0),
                       schema=schema.SFT_EXAMPLES)
    nll = response_nll(base, kept)

    one = train_sft(base, examples, tmp_path / "one" / "model", cfg, progress=False)
    assert (one["examples"], one["too_long"], one["steps"], one["not_trained"]) == (8, 1, 6, 0)
    assert one["loss_first"] == pytest.approx(nll, abs=1e-4)
    assert response_nll(tmp_path / "one" / "model", kept) < 0.8 * nll
    done = sorted(p.name for p in (tmp_path / "one" / "model").iterdir())
    assert "_ds" not in done and "sft_examples.parquet" not in done and "_SUCCESS" in done
    assert (tmp_path / "one" / "sft.sh").read_text().count("trainer.openrlhf_sft") == 1
    assert not (tmp_path / "one" / ".model.tmp").exists()

    two = train_sft(base, examples, tmp_path / "two" / "model",
                    small_base(*overrides, "train.num_gpus=2"), progress=False)
    assert two["world_size"] == 2 and two["loss_first"] == pytest.approx(nll, abs=1e-4)
    a = load_file(tmp_path / "one" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4

    config = write_resolved(cfg, tmp_path / "config.yaml")
    out = tmp_path / "killed" / "model"
    run = (f"from pipeline.config import load_config; from trainer.backends import train_sft; "
           f"train_sft({str(base)!r}, {str(examples)!r}, {str(out)!r}, "
           f"load_config({str(config)!r}), progress=False)")
    buffers = set(shm_buffers())
    kill_after_saved_step([sys.executable, "-c", run], out.with_name(".model.tmp") / "_ds" /
                          "latest", None, timeout_s=300)
    assert set(shm_buffers()) == buffers  # the killed launch's all-reduce buffer: removed
    logged = (out.with_name(".model.tmp") / "sft_log.jsonl").read_text().splitlines()
    assert 1 <= len(logged) < 6 and not out.exists()
    subprocess.run([sys.executable, "-c", run], check=True, cwd=ROOT, capture_output=True)
    c = load_file(out / "model.safetensors")
    assert max(float((a[k] - c[k]).abs().max()) for k in a) < 1e-6
    steps = [json.loads(line)["step"] for line in (out / "sft_log.jsonl").read_text()
             .splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

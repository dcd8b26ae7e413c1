"""The GPU check (bench/gpu_check.sh runs it): what only a CUDA machine can show, in one
prepared run of a few minutes, as one JSON of figures in OUT/gpu_check.json.

    python -m bench.gpu_check [--out runs/gpu_check] [--cpu]

1. `zero2_round`: a small-testbed round (hf engine, bf16) trained by `train.backend=openrlhf` in
   bf16 under ZeRO-2: median step time, peak GPU memory, and each step's loss against the same
   shard trained by the local trainer in fp32 on the CPU (`CUDA_VISIBLE_DEVICES=`), both from
   the base without its Adam moments (the local trainer would continue them).
2. `zero3_kl`: two rounds (`tapo iterate`) under ZeRO-3 with `algo.kl_coef` 0.05: round 2 takes
   its KL against the run's initial policy through a partitioned reference.
3. `memory`: bench.memory on a randomly initialised Qwen3-shaped 1.7B model at 16k response
   tokens, with and without gradient checkpointing, against trainer/memory.py's estimate.
4. `resume`: the openrlhf trainer killed (SIGKILL) after a saved step and run again ends with
   the weights of an uninterrupted run.
5. `coldstart_sft`: the cold-start SFT through OpenRLHF's train_sft (trainer/openrlhf_sft.py) in
   bf16 under ZeRO-2 on the testbed's reference solutions: its first step's loss against the
   base's token-mean loss on the same examples computed in fp32 on the CPU, and its last.

Each part records its error instead of stopping the others. `--cpu` runs the same parts on a
machine without a GPU (fp32, the memory probe on the small shape): the check of the check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from pipeline.config import load_config, write_resolved

SMALL = "configs/testbed-small.yaml"


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]


def _pipeline(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tapo", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, **kwargs)


def _small_testbed(out: Path, on_gpu: bool, *overrides: str):
    """The small testbed with its base installed under OUT (a round never builds it), sampled
    by the hf engine (bf16 on a GPU), every candidate selected, trained by the openrlhf
    backend; plus `overrides`."""
    from testbed.base import build_base

    cfg = load_config(SMALL, [f"testbed.base_dir={out / 'base'}", "engine.backend=hf",
                              *(["engine.dtype=bfloat16"] if on_gpu else []),
                              "select.p_high=1", "train.backend=openrlhf", *overrides])
    build_base(cfg.testbed, cfg.testbed.base_dir)
    return cfg


def kill_after_saved_step(command: list[str], state: Path, step: int | None,
                          timeout_s: float) -> None:
    """Starts `command` (a training of the openrlhf backend) in its own process group and
    SIGKILLs the group once its DeepSpeed state (`state`, `_ds/state.json`) names `step` or a
    later one, or with `step` None once `state` exists (or after `timeout_s`); then removes the
    /dev/shm all-reduce buffer the killed launch leaves (its driver never gets to)."""
    from trainer.openrlhf_shard import shm_buffers

    before = set(shm_buffers())
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline and not (state.exists() and (step is None or json.loads(
            state.read_text())["step"] >= step)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for left in set(shm_buffers()) - before:
        left.unlink(missing_ok=True)


def zero2_round(out: Path, on_gpu: bool) -> dict:
    from tapo.flows.round import run_round
    from trainer.backends import train_round

    cfg = _small_testbed(out, on_gpu, "rollout.problems_per_round=64", "train.zero_stage=2")
    summary = run_round(out / "run", 1, cfg, progress=False)
    shard = out / "run" / "iter_0001" / "assemble"
    policy = out / "policy"  # the base without its Adam moments: a fresh Adam on both sides
    shutil.copytree(summary["policy"], policy, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("optimizer.pt"))
    t = time.time()
    train_round(policy, shard, out / "openrlhf", cfg, progress=False)
    wall = time.time() - t
    config = write_resolved(cfg, out / "config.yaml")
    ref = _pipeline("train", "--policy", str(policy), "--shard", str(shard), "--out",
                    str(out / "cpu_fp32"), "--config", str(config), "train.backend=local",
                    env={"CUDA_VISIBLE_DEVICES": ""})
    if ref.returncode != 0:
        raise RuntimeError(f"the CPU reference run failed: {ref.stderr[-2000:]}")
    gpu, cpu = _log(out / "openrlhf"), _log(out / "cpu_fp32")
    return {"rows": summary["training_rows"], "steps": len(gpu), "train_wall_s": round(wall, 1),
            "median_step_s": statistics.median(x["seconds"] for x in gpu[1:] or gpu),
            "peak_gpu_gib": max(x.get("peak_gpu_gib", 0.0) for x in gpu),
            "loss": [x["loss"] for x in gpu], "loss_cpu_fp32": [x["loss"] for x in cpu],
            "max_abs_loss_diff": max(abs(a["loss"] - b["loss"]) for a, b in zip(gpu, cpu))}


def zero3_kl(out: Path, on_gpu: bool) -> dict:
    from tapo.flows.iterate import iterate

    cfg = _small_testbed(out, on_gpu, "rollout.problems_per_round=32", "train.zero_stage=3",
                         "algo.kl_coef=0.05")
    t = time.time()
    table = iterate(out / "run", 2, cfg, progress=False)
    logs = [_log(out / "run" / "models" / f"iter_{k:04d}") for k in (1, 2)]
    return {"rounds": len(table), "wall_s": round(time.time() - t, 1),
            "loss": [[x["loss"] for x in log] for log in logs],
            "peak_gpu_gib": max(x.get("peak_gpu_gib", 0.0) for log in logs for x in log)}


def memory(out: Path, on_gpu: bool) -> dict:
    args = ["--device", "cuda", "--shape", "1.7b", "--tokens", "16384"] if on_gpu else \
        ["--device", "cpu", "--shape", "small", "--tokens", "1024,4096"]
    probe = subprocess.run([sys.executable, "-m", "bench.memory", *args,
                            "--full-logits-up-to", "0"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(probe.stderr[-2000:])
    lines = [json.loads(line) for line in probe.stdout.splitlines() if line.startswith("{")]
    return {"cases": [x for x in lines if "summary" not in x],
            "summary": next(x["summary"] for x in lines if "summary" in x)}


def resume(out: Path, on_gpu: bool) -> dict:
    shard = out.parent / "zero2_round" / "run" / "iter_0001" / "assemble"
    config = out.parent / "zero2_round" / "config.yaml"
    policy = str(out.parent / "zero2_round" / "policy")
    flags = ["train.backend=openrlhf", "train.mini_batch_size=16", "train.micro_batch_size=8",
             "train.save_every=1"]

    def command(d: str) -> list[str]:
        return [sys.executable, "-m", "tapo", "train", "--policy", policy, "--shard",
                str(shard), "--out", str(out / d), "--config", str(config), *flags]

    subprocess.run(command("whole"), capture_output=True, check=True)
    state = out / "killed" / "_ds" / "state.json"
    kill_after_saved_step(command("killed"), state, 1, timeout_s=300)
    killed_at = json.loads(state.read_text())["step"]
    subprocess.run(command("killed"), capture_output=True, check=True)
    from safetensors.torch import load_file

    a = load_file(out / "whole" / "model.safetensors")
    b = load_file(out / "killed" / "model.safetensors")
    steps = [x["step"] for x in _log(out / "killed")]
    return {"killed_after_step": killed_at, "steps_logged": steps,
            "max_abs_weight_diff": max(float((a[k].float() - b[k].float()).abs().max())
                                       for k in a)}


def solution_examples(cfg, model_dir: Path, out_dir: Path, n: int) -> Path:
    """`n` cold-start examples (schema.SFT_EXAMPLES, source `direct`) from the testbed's
    train split: the task's prompt (rendered for the model at `model_dir`) and the reference
    solution; a stage directory."""
    import pandas as pd

    from pipeline.engines.base import render_prompt
    from pipeline.io import part_name, write_table_atomic
    from stages import schema
    from stages.common import load_tokenizer
    from stages.tasks.base import get_task
    from testbed.base import testbed_problems

    problems = pd.read_parquet(testbed_problems(cfg.testbed, "train")).head(n)
    task, tokenizer = get_task(cfg.task), load_tokenizer(str(model_dir))
    write_table_atomic(pd.DataFrame({
        "example_id": problems["problem_id"] + "/direct", "source": "direct",
        "problem_id": problems["problem_id"],
        "prompt": [render_prompt(task.prompt(p), tokenizer) for p in problems["problem"]],
        "response": problems["solution"]}), out_dir / part_name(0), schema=schema.SFT_EXAMPLES)
    return out_dir


def response_nll(model_dir: Path, examples: Path) -> float:
    """The token-mean negative log-likelihood of the examples' responses (and EOS) under the
    model, in fp32 on the CPU, with the local SFT's tokens (trainer/sft.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.io import read_pandas
    from trainer.lm import collate, lm_loss
    from trainer.sft import lm_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = read_pandas(examples)
    batch = collate(lm_examples(rows["prompt"], rows["response"], tokenizer),
                    tokenizer.pad_token_id)
    with torch.no_grad():
        return float(lm_loss(model, batch))


def coldstart_sft(out: Path, on_gpu: bool) -> dict:
    from pipeline.layout import testbed_model
    from trainer.backends import train_sft

    cfg = _small_testbed(out, on_gpu, "coldstart.batch_size=16", "coldstart.epochs=4",
                         "train.micro_batch_size=8", "train.save_every=1000")
    base = testbed_model(cfg.testbed.base_dir)
    examples = solution_examples(cfg, base, out / "examples", 16)
    t = time.time()
    metrics = train_sft(base, examples, out / "model", cfg, progress=False)
    log = [json.loads(line) for line in (out / "model" / "sft_log.jsonl").read_text()
           .splitlines()]
    return {"steps": metrics["steps"], "wall_s": round(time.time() - t, 1),
            "loss": [x["loss"] for x in log], "base_nll_cpu_fp32": response_nll(base, examples),
            "after_nll_cpu_fp32": response_nll(out / "model", examples)}


PARTS = (zero2_round, zero3_kl, memory, resume, coldstart_sft)  # (resume: zero2_round's shard)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or "runs/gpu_check"))
    parser.add_argument("--cpu", action="store_true", help="run on a machine without a GPU")
    parser.add_argument("--only", nargs="+", choices=[p.__name__ for p in PARTS],
                        help="run these parts only")
    a = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not a.cpu:
        sys.exit("bench.gpu_check: no CUDA device (--cpu runs the check of the check)")
    a.out.mkdir(parents=True, exist_ok=True)
    figures = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
               "torch": torch.__version__, "dtype": "bf16" if on_gpu else "fp32"}
    t0 = time.time()
    for part in (p for p in PARTS if not a.only or p.__name__ in a.only):
        t = time.time()
        try:
            figures[part.__name__] = part(a.out / part.__name__, on_gpu)
        except Exception:
            figures[part.__name__] = {"error": traceback.format_exc(limit=4)[-3000:]}
        figures[part.__name__]["seconds"] = round(time.time() - t, 1)
        print(f"gpu_check: {part.__name__} done in {time.time() - t:.0f} s", flush=True)
        (a.out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    figures["seconds"] = round(time.time() - t0, 1)
    (a.out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

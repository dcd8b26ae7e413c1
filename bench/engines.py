"""Engine throughput vs the raw dependency, on the same prompts, in the same run: our `vllm`
engine and our whole `sample` stage (parquet in and out) vs a bare `LLM.generate`, our `hf`
engine vs a bare `model.generate` loop; and the per-round engine overhead: a new vLLM engine on
a round's checkpoint vs loading the checkpoint into the running engine.

    python -m bench.engines [--config C] [--n 8] [--problems 200]

Reads the testbed base model (build it with `make base`); prints one JSON line per comparison
with both sides and the ratio (goal: throughput at least 0.95; per-round overhead <= 10 s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import load_config
from pipeline.engines import kept_engine, release_engine
from pipeline.engines.base import SamplingParams
from pipeline.engines.hf import HFEngine
from pipeline.engines.vllm import VLLMEngine, vllm_available
from pipeline.io import read_pandas
from pipeline.layout import testbed_model, testbed_split
from pipeline.problems import write_problems
from pipeline.runner import run_stage
from stages.sample import Sample
from stages.tasks import task_of

MAX_TOKENS = 160


def best_of_interleaved(ours, raw, rounds: int = 3) -> tuple[float, float]:
    """Tokens/s of each side, best of `rounds`, the two sides alternating (raw first), so
    neither profits alone from warm caches (e.g. vLLM's prefix cache on the same prompts)."""
    best = [0.0, 0.0]
    for _ in range(rounds):
        for side, fn in ((1, raw), (0, ours)):
            t0 = time.perf_counter()
            tokens = fn()
            best[side] = max(best[side], tokens / (time.perf_counter() - t0))
    return best[0], best[1]


def bench_vllm(model_dir, prompts, n, engine_cfg) -> dict:
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    eng = VLLMEngine(model_dir, max_model_len=engine_cfg.max_model_len,
                     gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                     dtype=engine_cfg.dtype)
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, logprobs=True)
    raw_params = VSamplingParams(n=n, temperature=1.0, max_tokens=MAX_TOKENS, logprobs=0)
    raw_prompts = [TokensPrompt(prompt_token_ids=eng.tokenizer(p, add_special_tokens=False)
                                ["input_ids"]) for p in prompts]
    eng.generate(prompts[:8], n, params)  # warm up

    def ours():
        return sum(c.length for g in eng.generate(prompts, n, params) for c in g)

    def raw():
        outs = eng.llm.generate(raw_prompts, raw_params, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    return report("vllm", *best_of_interleaved(ours, raw))


def bench_sample_stage(cfg, model_dir, count, n, tmp: Path) -> dict:
    """The sample stage (run_stage: shards in, rollout rows out) vs a bare LLM.generate of the
    same prompts on the same engine (the stage's kept engine): `count` training problems."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    cfg = cfg.model_copy(update={
        "engine": cfg.engine.model_copy(update={"backend": "vllm"}),
        "policy": cfg.policy.model_copy(update={"path": str(model_dir)}),
        "rollout": cfg.rollout.model_copy(update={"group_size": n, "temperature": 1.0,
                                                  "top_p": 1.0, "max_tokens": MAX_TOKENS})})
    write_problems(testbed_split(cfg.testbed.base_dir, "train"), tmp / "problems", 0, count,
                   cfg.run.seed, cfg.rollout.shard_size)
    engine = kept_engine(cfg.engine, model_dir, seed=cfg.run.seed)
    task = task_of(cfg)
    problems = read_pandas(tmp / "problems", columns=["problem"])["problem"]
    raw_prompts = [TokensPrompt(prompt_token_ids=engine.tokenizer(task.prompt(p),
                                                                  add_special_tokens=False)
                                ["input_ids"]) for p in problems]
    raw_params = VSamplingParams(n=n, temperature=1.0, max_tokens=MAX_TOKENS)

    def ours():
        shutil.rmtree(tmp / "sample", ignore_errors=True)
        run_stage(Sample, cfg, tmp / "problems", tmp / "sample", progress=False)
        return int(read_pandas(tmp / "sample", columns=["response_len"])["response_len"].sum())

    def raw():
        outs = engine.llm.generate(raw_prompts, raw_params, use_tqdm=False)
        return sum(len(o.token_ids) for r in outs for o in r.outputs)

    ours()  # warm up
    return report("sample_stage", *best_of_interleaved(ours, raw))


def bench_reload(model_dir, cfg, tmp: Path) -> dict:
    """Seconds a new round's checkpoint costs the engine: building a new vLLM engine on it vs
    loading it into the running one (engines.kept_engine), the same run. The checkpoint is
    the base with its weights perturbed (what a round's training gives: same architecture)."""
    checkpoint = perturbed_checkpoint(model_dir, tmp / "checkpoint")
    engine_cfg = cfg.engine.model_copy(update={"backend": "vllm"})
    release_engine()
    kept_engine(engine_cfg, model_dir, seed=cfg.run.seed)
    t = time.perf_counter()
    kept_engine(engine_cfg, checkpoint, seed=cfg.run.seed)
    load = time.perf_counter() - t
    release_engine()
    t = time.perf_counter()
    fresh = VLLMEngine(checkpoint, max_model_len=engine_cfg.max_model_len,
                       gpu_memory_utilization=engine_cfg.gpu_memory_utilization,
                       dtype=engine_cfg.dtype, seed=cfg.run.seed)
    build = time.perf_counter() - t
    fresh.close()
    return {"bench": "engine_per_round", "new_engine_s": round(build, 2),
            "load_into_running_s": round(load, 3), "ratio": round(load / build, 4)}


def perturbed_checkpoint(model_dir, out: Path, scale: float = 0.01) -> Path:
    """The model at `model_dir` with seeded noise (times `scale`) on every weight, its tied head
    included, saved to `out` with its tokenizer: what a round's training makes of a checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def bench_hf(model_dir, prompts, n, batch_size) -> dict:
    eng = HFEngine(model_dir, batch_size=batch_size)
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS)
    tok, model = eng.tokenizer, eng.model

    def bare():
        flat = [p for p in prompts for _ in range(n)]
        count = 0
        tok.padding_side = "left"
        for start in range(0, len(flat), batch_size):
            enc = tok(flat[start : start + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=True,
                                     temperature=1.0, top_p=None, top_k=0,
                                     pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1] :]
            count += int(((new != tok.pad_token_id) & (new != tok.eos_token_id)).sum())
            count += int((new == tok.eos_token_id).any(dim=1).sum())  # the EOS we keep
        return count

    def ours():
        return sum(c.length for g in eng.generate(prompts, n, params) for c in g)

    eng.generate(prompts[:4], 2, params)  # warm up
    return report("hf", *best_of_interleaved(ours, bare))


def report(backend: str, ours: float, raw: float) -> dict:
    return {"bench": f"engine_{backend}", "tapo_tokens_per_s": round(ours, 1),
            "raw_tokens_per_s": round(raw, 1), "ratio": round(ours / raw, 3)}


def main() -> None:
    """Prints one JSON line per backend."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args()
    cfg = load_config(args.config)
    model = str(testbed_model(cfg.testbed.base_dir))
    heldout = pd.read_parquet(testbed_split(cfg.testbed.base_dir, "heldout")).head(args.problems)
    task = task_of(cfg)
    prompts = [task.prompt(p) for p in heldout["problem"]]
    if vllm_available():
        print(json.dumps(bench_vllm(model, prompts, args.n, cfg.engine)), flush=True)
        release_engine()
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(bench_sample_stage(cfg, model, args.problems, args.n, Path(tmp))),
                  flush=True)
            print(json.dumps(bench_reload(model, cfg, Path(tmp))), flush=True)
        release_engine()
    print(json.dumps(bench_hf(model, prompts[:50], args.n, cfg.engine.batch_size)))


if __name__ == "__main__":
    main()

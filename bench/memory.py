"""The trainer's memory curve: peak memory of one training step against response length, on a
randomly initialised Qwen3-shaped model with the real vocabulary (151,936), with and without
gradient checkpointing, through the shard trainer's LM head (trainer/logprobs.py) and, for
comparison, through OpenRLHF's `Actor.forward` (full-vocabulary fp32 logits).

    python -m bench.memory [--tokens 1024,4096,16384] [--device cpu|cuda] [--shape small|1.7b]

Each case runs in a fresh process (CPU: the peak resident set, reset before the step; CUDA:
`max_memory_allocated`). Prints one JSON line per case (peak, estimate of trainer/memory.py
for the same shape, bytes per token) and then the summary: the slope in bytes per token
(linear in tokens?), how far the estimate is from the measurement, and the estimate for
Qwen3-8B at 16k tokens on 8 GPUs under ZeRO-3 with checkpointing (goal: under 80 GB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trainer.memory import ModelShape, train_rank_bytes

SHAPES = {  # Qwen3's layout (GQA) at two sizes, and Qwen3-8B's published shape (tapo plan's)
    "small": ModelShape(layers=4, hidden=128, intermediate=384, heads=4, kv_heads=2, head_dim=32,
                        vocab=151936, tied=False),
    "1.7b": ModelShape(layers=28, hidden=2048, intermediate=6144, heads=16, kv_heads=8,
                       head_dim=128, vocab=151936, tied=True),
    "8b": ModelShape.from_config_json(Path(__file__).parent.parent / "configs" / "shapes"
                                      / "qwen3-8b.json"),
}
PROMPT = 256  # prompt tokens before the response


def measure(shape: str, tokens: int, checkpointing: bool, path: str, device: str) -> dict:
    """One training step (forward, a policy-gradient loss, backward, AdamW step) on one
    sequence of PROMPT + `tokens` tokens: its peak memory in bytes above the state before it."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainer.logprobs import LogProbHead, sequence_logprobs

    s = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        tie_word_embeddings=s.tied, max_position_embeddings=PROMPT + tokens + 1,
        use_cache=False, attn_implementation="sdpa")).to(device=device, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)
    seq = torch.randint(0, s.vocab, (1, PROMPT + tokens), device=device)
    attention = torch.ones_like(seq)
    head = None
    if path == "chunked":
        head = LogProbHead.install(model)
    else:
        from trainer.openrlhf_compat import stub_flash_attn

        stub_flash_attn()
        from openrlhf.models import Actor

        actor = Actor(model, temperature=1.0)
        actor.packing_samples = False

    def step():
        if head is not None:
            logp, _ = sequence_logprobs(model, head, seq, attention)
        else:
            logp = actor(seq, torch.ones(1, seq.shape[1] - 1, dtype=torch.bool, device=device),
                         attention_mask=attention)
        (-logp[:, PROMPT:].mean()).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to now
            f.write("5")
        step()
        peak = _rss("VmHWM") - before
    return {"shape": shape, "path": path, "tokens": tokens, "checkpointing": checkpointing,
            "device": device, "dtype": str(dtype).removeprefix("torch."), "peak_bytes": peak}


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def estimate(shape: str, tokens: int, checkpointing: bool, dtype_bytes: int, world: int = 1,
             zero_stage: int = 0, states: bool = False) -> int:
    """trainer/memory.py's estimate; `states=False` leaves out the model states the measured
    step already held before it (weights; its gradients and AdamW moments are counted)."""
    s = SHAPES[shape]
    total = train_rank_bytes(s, PROMPT + tokens, world, zero_stage, checkpointing, dtype_bytes)
    return total if states else total - dtype_bytes * s.parameters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1024,4096,16384")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="small", choices=["small", "1.7b"])
    parser.add_argument("--full-logits-up-to", type=int, default=4096,
                        help="also run OpenRLHF's full-logit Actor.forward up to this length")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # (one case, in its own process)
    a = parser.parse_args(argv)
    if a.case:
        path, tokens, ckpt = a.case.split(":")
        print(json.dumps(measure(a.shape, int(tokens), ckpt == "1", path, a.device)))
        return

    dtype_bytes = 2 if a.device == "cuda" else 4
    lengths = [int(t) for t in a.tokens.split(",")]
    rows = []
    cases = [("chunked", t, c) for c in (False, True) for t in lengths]
    cases += [("full", t, False) for t in lengths if t <= a.full_logits_up_to]
    for path, tokens, ckpt in cases:
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--device", a.device,
                              "--shape", a.shape, "--case", f"{path}:{tokens}:{int(ckpt)}"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            row = {"path": path, "tokens": tokens, "checkpointing": ckpt,
                   "error": out.stderr.strip().splitlines()[-1]}
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["estimate_bytes"] = estimate(a.shape, tokens, ckpt, dtype_bytes)
            row["gib"] = round(row["peak_bytes"] / 2**30, 3)
            row["bytes_per_token"] = round(row["peak_bytes"] / tokens)
        rows.append(row)
        print(json.dumps(row), flush=True)

    summary = {}
    for ckpt in (False, True):
        curve = [r for r in rows if r["path"] == "chunked" and r["checkpointing"] == ckpt
                 and "peak_bytes" in r]
        if len(curve) >= 2:
            (t0, p0), (t1, p1) = ((r["tokens"], r["peak_bytes"]) for r in (curve[-2], curve[-1]))
            slope = (p1 - p0) / (t1 - t0)
            summary[f"slope_bytes_per_token_ckpt{int(ckpt)}"] = round(slope)
            summary[f"estimate_over_measured_ckpt{int(ckpt)}"] = round(
                curve[-1]["estimate_bytes"] / curve[-1]["peak_bytes"], 2)
        if len(curve) >= 3:  # linear: the slope between the first two equals the last two
            (t0, p0), (t1, p1) = ((r["tokens"], r["peak_bytes"]) for r in (curve[0], curve[1]))
            summary[f"slope_ratio_ckpt{int(ckpt)}"] = round(slope / ((p1 - p0) / (t1 - t0)), 2)
    full = {r["tokens"]: r["peak_bytes"] for r in rows if r["path"] == "full" and "peak_bytes" in r}
    chunked = {r["tokens"]: r["peak_bytes"] for r in rows
               if r["path"] == "chunked" and not r["checkpointing"] and "peak_bytes" in r}
    for t in sorted(set(full) & set(chunked)):
        summary[f"full_logits_over_chunked_{t}"] = round(full[t] / chunked[t], 2)
    for ckpt in (True, False):
        gb = estimate("8b", 16384, ckpt, 2, world=8, zero_stage=3, states=True) / 1e9
        summary[f"qwen3_8b_16k_8gpu_zero3_ckpt{int(ckpt)}_gb"] = round(gb, 1)
    summary["fits_80gb_with_checkpointing"] = summary["qwen3_8b_16k_8gpu_zero3_ckpt1_gb"] < 80
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()

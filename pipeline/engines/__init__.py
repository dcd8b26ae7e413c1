"""Generation engines (hf, vllm, openai) behind one interface; see base.Engine."""

from __future__ import annotations

from pathlib import Path

from pipeline.engines.base import (
    Completion,
    Engine,
    Prompt,
    SamplingParams,
    encode_prompt,
    render_prompt,
)

__all__ = ["Completion", "Engine", "Prompt", "SamplingParams", "encode_prompt", "make_engine",
           "render_prompt", "resolve_backend"]


def resolve_backend(backend: str) -> str:
    """`auto` is vllm when vLLM is installed, else hf."""
    if backend != "auto":
        return backend
    from pipeline.engines.vllm import vllm_available

    return "vllm" if vllm_available() else "hf"


def make_engine(cfg, model: str | Path, seed: int = 0) -> Engine:
    """The engine that `cfg` (an EngineConfig) names, serving the model at `model`."""
    backend = resolve_backend(cfg.backend)
    if backend == "hf":
        from pipeline.engines.hf import HFEngine

        return HFEngine(model, batch_size=cfg.batch_size)
    if backend == "vllm":
        from pipeline.engines.vllm import VLLMEngine

        return VLLMEngine(model, max_model_len=cfg.max_model_len,
                          gpu_memory_utilization=cfg.gpu_memory_utilization, dtype=cfg.dtype,
                          seed=seed)
    if backend == "openai":
        from pipeline.engines.openai import OpenAIEngine

        if not cfg.base_urls:
            raise ValueError("engine.backend=openai needs engine.base_urls=[http://host:port/v1]")
        tokenizer = None
        if Path(model).is_dir():  # a local copy renders chat prompts as the server would
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model))
        return OpenAIEngine(cfg.base_urls, cfg.served_model or str(model),
                            concurrency=cfg.concurrency, timeout_s=cfg.timeout_s,
                            retries=cfg.retries, tokenizer=tokenizer)
    raise ValueError(f"unknown engine backend {backend!r}")

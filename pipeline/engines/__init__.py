"""Generation engines (hf, vllm, openai) behind one interface; see base.Engine."""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.engines.base import (
    Completion,
    Engine,
    Prompt,
    SamplingParams,
    encode_prompt,
    render_prompt,
)

__all__ = ["Completion", "Engine", "Prompt", "SamplingParams", "encode_prompt", "kept_engine",
           "make_engine", "release_engine", "render_prompt", "resolve_backend"]

log = logging.getLogger(__name__)


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
                          seed=seed, tensor_parallel_size=cfg.tensor_parallel_size,
                          enforce_eager=cfg.enforce_eager)
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


_kept: dict[str, Any] = {}  # this process's engine: key (settings), model, state, engine


def kept_engine(cfg, model: str | Path, seed: int = 0) -> Engine:
    """The engine `cfg` (an EngineConfig) names, serving `model`, kept by this process across
    stages and rounds (one engine at a time). A new model, or new weights at the same path, for
    the same settings is loaded into the running engine where the engine can (`load`: vllm, a
    fraction of a second); otherwise, or when the load fails, a new engine is built and the log
    says why. `release_engine()` frees it; it is closed at exit."""
    from pipeline.util import model_state

    model = Path(model)
    key = json.dumps([resolve_backend(cfg.backend), cfg.model_dump(mode="json"), seed])
    state = model_state(model) if model.is_dir() else str(model)
    engine = _kept.get("engine")
    if engine is not None and getattr(engine, "closed", False):  # (another engine was built)
        release_engine()
        engine = None
    if engine is not None and _kept["key"] == key:
        if (_kept["model"], _kept["state"]) == (model, state):
            return engine
        if not hasattr(engine, "load"):
            reason = f"the {engine.name} engine cannot load new weights"
        else:
            try:
                engine.load(model)
                _kept.update(model=model, state=state)
                log.info("engine: loaded %s into the running %s engine", model, engine.name)
                return engine
            except Exception as e:  # any failure to load: a new engine is the safe path
                reason = f"loading into the running engine failed: {e}"
    else:
        reason = "the engine settings changed" if engine is not None else ""
    if engine is not None:
        log.info("engine: building a new %s engine for %s (%s)", cfg.backend, model, reason)
        release_engine()
    engine = make_engine(cfg, model, seed=seed)
    _kept.update(key=key, model=model, state=state, engine=engine)
    atexit.unregister(release_engine)  # (registered last, it runs first at exit: before the
    atexit.register(release_engine)    # engine's own finalizers, which then find it closed)
    return engine


def release_engine() -> None:
    """Closes this process's kept engine, if any, freeing its memory."""
    engine = _kept.pop("engine", None)
    _kept.clear()
    close = getattr(engine, "close", None)
    if close is not None:
        close()

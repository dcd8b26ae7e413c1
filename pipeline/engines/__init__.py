"""Generation engines (hf, vllm, openai) behind one interface; see base.Engine."""

from pipeline.engines.base import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams"]

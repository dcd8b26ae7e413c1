"""The generation-engine interface: one call, prompts in, completion records out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]
Prompt = str | list[dict[str, str]]  # plain text, or chat messages [{"role", "content"}]


def render_prompt(prompt: Prompt, tokenizer: Any) -> str:
    """Plain text as is; chat messages through the tokenizer's chat template (with the
    generation prompt). A chat prompt for a model without a chat template is an error."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat messages need a model with a chat template, and this model has "
                         "none: give the task a plain prompt template instead")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    logprobs: bool = False  # per-token log-probs of the sampled tokens (raw model distribution)
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """One sampled continuation of one prompt. `token_ids` are the sampled ids, ending in the
    EOS id when the model stopped by itself; `text` is their decoding without special tokens."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = field(default=None)

    @property
    def length(self) -> int:
        return len(self.token_ids)


class Engine(Protocol):
    name: str

    def generate(
        self, prompts: list[Prompt], n: int, params: SamplingParams
    ) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order; chat prompts are rendered with
        the model's chat template (render_prompt)."""
        ...

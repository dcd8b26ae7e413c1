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


def encode_prompt(prompt: Prompt, tokenizer: Any) -> tuple[str, list[int]]:
    """(text, token ids) of a prompt as the engines feed it to the model: chat messages through
    the chat template, whose text holds the special tokens (no more are added); plain text with
    the tokenizer's own special tokens (a BOS for Llama tokenizers, as vLLM adds to a text
    prompt; none for the testbed's)."""
    text = render_prompt(prompt, tokenizer)
    return text, list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])


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
    EOS id when the model stopped by itself; `text` is their decoding without special tokens;
    `prompt_token_ids` are the prompt's ids exactly as the engine fed them to the model."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float] | None = field(default=None)
    prompt_token_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.token_ids)


class Engine(Protocol):
    name: str
    per_request_seed: bool  # whether `seeds` are honoured (else params.seed seeds a batch)

    def generate(
        self, prompts: list[Prompt], n: int, params: SamplingParams,
        seeds: list[list[int]] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order; prompts are encoded with
        encode_prompt. `seeds[i][k]` seeds sample k of prompt i where the engine supports
        per-request seeds (vLLM, an OpenAI-compatible server); elsewhere sampling is seeded by
        `params.seed` (hf: per batch)."""
        ...

"""The generation-engine interface: one call, prompts in, completion records out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


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
        self, prompts: list[str], n: int, params: SamplingParams
    ) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order."""
        ...

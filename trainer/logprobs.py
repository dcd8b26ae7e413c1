"""Token log-probs without full-vocabulary logits: the language-model head applied a chunk of
positions at a time.

    head = LogProbHead.install(hf_model)          # replaces hf_model.lm_head (same weight)
    logp, entropy = sequence_logprobs(hf_model, head, sequences, attention_mask)

A (B, T) log-prob needs the (B, T, V) logits only transiently: with a 152k vocabulary, 16k
tokens of fp32 logits are 9.7 GB, and autograd keeps them (and their log-softmax) until the
backward. Here each chunk of positions is projected, upcast to fp32 and reduced to its label's
log-prob (and its entropy, without gradient, for the log), under activation checkpointing: the
backward recomputes the chunk's logits, so at most one chunk's fp32 logits exist at a time
(CHUNK_BYTES, 0.6 GB: 1,024 positions at V = 151,936). A batch that fits in one chunk (a small
vocabulary) is computed once, without the recomputation. The values
equal OpenRLHF's `Actor.forward` (bf16 head, fp32 log-softmax) to float rounding.

The head stays a module the HF model calls (`lm_head`, the same Parameter under the same
name), so DeepSpeed's ZeRO-3 hooks gather its weight as they gather the Linear's, checkpoints
keep their key, and tied embeddings stay tied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 1024 * 151_936 * 4  # one chunk's fp32 logits: 1,024 positions of Qwen3's vocabulary


def chunk_positions(vocab: int) -> int:
    """Positions a chunk holds at this vocabulary size."""
    return max(1, CHUNK_BYTES // (4 * vocab))

SCALED_LOGITS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk: hidden (N, H), labels (N,) -> log-probs (N,) and entropy (N, no gradient)."""
    logits = F.linear(hidden, weight).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   temperature: float = 1.0, chunk: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels) and the entropy at every position: hidden (B, T, H), weight (V, H),
    labels (B, T) -> two (B, T) fp32 tensors; at most `chunk` positions' logits (default:
    `chunk_positions(V)`) live at once, in the forward and (recomputed) in the backward."""
    b, t, h = hidden.shape
    chunk = chunk or chunk_positions(weight.shape[0])
    recompute = b * t > chunk  # (one chunk: nothing to save by recomputing)
    flat_h, flat_y = hidden.reshape(b * t, h), labels.reshape(b * t)
    logps, entropies = [], []
    for lo in range(0, b * t, chunk):
        args = (flat_h[lo : lo + chunk], weight, flat_y[lo : lo + chunk], temperature)
        if recompute and torch.is_grad_enabled() and (hidden.requires_grad
                                                       or weight.requires_grad):
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps).view(b, t), torch.cat(entropies).view(b, t)


class LogProbHead(torch.nn.Module):
    """The HF model's `lm_head` that returns, in place of logits, a (B, T, 2) tensor of each
    position's label log-prob and entropy. The labels are set (`head.labels`) for each call."""

    def __init__(self, weight: torch.nn.Parameter, temperature: float = 1.0,
                 chunk: int | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.temperature, self.chunk = temperature, chunk
        self.labels: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            raise RuntimeError("LogProbHead: set .labels (the next tokens) before the forward")
        logp, entropy = token_logprobs(hidden, self.weight, self.labels, self.temperature,
                                       self.chunk)
        return torch.stack([logp, entropy], dim=-1)

    @classmethod
    def install(cls, model: torch.nn.Module, temperature: float = 1.0,
                chunk: int | None = None) -> LogProbHead:
        """Replaces `model.lm_head` (a bias-free Linear, as in Llama/Qwen) by a LogProbHead on
        the same Parameter; returns it."""
        linear = model.lm_head
        if isinstance(linear, cls):
            return linear
        config = getattr(model, "config", None)
        for key, plain in SCALED_LOGITS.items():  # logits the model changes after the head
            if getattr(config, key, plain) not in (plain, None):
                raise ValueError(f"LogProbHead: the model's {key}={getattr(config, key)} "
                                 "changes the logits after the head, which this head skips")
        if getattr(linear, "bias", None) is not None:
            raise ValueError("LogProbHead: the model's lm_head has a bias")
        head = cls(linear.weight, temperature, chunk)
        model.lm_head = head
        return head


def sequence_logprobs(model: torch.nn.Module, head: LogProbHead, sequences: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) left- or right-padded sequences -> (B, L-1) log-probs of tokens 1..L-1 and the
    entropy before each, as OpenRLHF's `Actor.forward` computes them without sample packing
    (positions from the attention mask). `model` is the HF model or its DeepSpeed engine."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    head.labels = torch.roll(sequences, shifts=-1, dims=1)
    try:
        out = model(sequences, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False)
    finally:
        head.labels = None
    both = out["logits"]
    return both[:, :-1, 0], both[:, :-1, 1]

"""Peak memory of one training rank, estimated from the model's shape: what `tapo plan` prints
and `bench.memory` checks against measured peaks.

    shape = ModelShape.from_config_json(path)        # an HF config.json (Qwen3, Llama, ...)
    gib = train_rank_bytes(shape, tokens=16384, world=8, zero_stage=3, checkpointing=True) / 2**30

The terms (bytes; P parameters, T tokens in the micro-batch, L layers, H hidden, I MLP width):
- model states: weights and gradients in the compute dtype, AdamW's fp32 master copy and two
  moments (12 bytes a parameter), the parts ZeRO partitions divided by the world size;
- activations: with gradient checkpointing, each layer's input (T x H) plus one layer's
  working set; without, every layer's working set (`layer_bytes_per_token`);
- the LM head (trainer/logprobs.py): the final hidden states and one chunk's fp32 logits,
  their log-softmax and its gradient (3 x chunk x V x 4), never T x V.
Attention is counted as flash/sdpa attention (no T x T matrix).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer.logprobs import chunk_positions


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config_json(cls, path: str | Path) -> ModelShape:
        """The shape in an HF `config.json` (a file, or a model directory holding one)."""
        path = Path(path)
        c = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        heads = c["num_attention_heads"]
        return cls(layers=c["num_hidden_layers"], hidden=c["hidden_size"],
                   intermediate=c["intermediate_size"], heads=heads,
                   kv_heads=c.get("num_key_value_heads", heads),
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                   vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def parameters(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate + 2 * h
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h


def layer_bytes_per_token(s: ModelShape, dtype_bytes: int) -> int:
    """What autograd keeps for one decoder layer, per token: the two norms' inputs and
    outputs, q, k, v, the attention output and its projection, the MLP's gate, up, activation,
    product and down projection (about 8 H + 4 I + 2 kv-width values)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return dtype_bytes * (6 * s.hidden + q + 2 * kv + q + 4 * s.intermediate + s.hidden)


def train_rank_bytes(s: ModelShape, tokens: int, world: int, zero_stage: int,
                     checkpointing: bool, dtype_bytes: int = 2) -> int:
    """Estimated peak bytes of one rank's training step on a micro-batch of `tokens` tokens."""
    p = s.parameters
    master = 12 if dtype_bytes == 2 else 8  # fp32 training keeps no separate master copy
    weights = dtype_bytes * p / (world if zero_stage >= 3 else 1)
    grads = dtype_bytes * p / (world if zero_stage >= 2 else 1)
    optimizer = master * p / (world if zero_stage >= 1 else 1)
    per_layer = layer_bytes_per_token(s, dtype_bytes) * tokens
    if checkpointing:
        activations = s.layers * tokens * s.hidden * dtype_bytes + per_layer
    else:
        activations = s.layers * per_layer
    chunk = min(chunk_positions(s.vocab), tokens)
    head = 2 * tokens * s.hidden * dtype_bytes + 3 * chunk * s.vocab * 4
    return int(weights + grads + optimizer + activations + head)


def engine_bytes(s: ModelShape, max_tokens: int, sequences: int, dtype_bytes: int = 2) -> int:
    """A vLLM engine's weights plus the KV cache for `sequences` sequences of `max_tokens`."""
    kv = 2 * s.layers * s.kv_heads * s.head_dim * dtype_bytes
    return int(dtype_bytes * s.parameters + kv * max_tokens * sequences)

"""trainer/logprobs.py: chunked LM-head log-probs equal OpenRLHF's Actor (values and
gradients) and never produce a full-vocabulary tensor for the whole sequence."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from trainer.logprobs import LogProbHead, chunk_positions, sequence_logprobs

VOCAB, LENGTH, CHUNK = 4096, 192, 48  # CHUNK > hidden 32 (the head grad: V x 32)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def tiny_qwen3(tied: bool) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        tie_word_embeddings=tied)).float()


@pytest.mark.parametrize("tied, chunk", [(True, CHUNK), (False, CHUNK), (False, None)])
def test_chunked_head_equals_openrlhf_actor(tied, chunk):
    """In chunks with recomputation, and (chunk=None: a 4,096 vocabulary fits 37,984 positions
    in one chunk) in one pass."""
    pytest.importorskip("openrlhf")
    from trainer.openrlhf_compat import stub_flash_attn

    stub_flash_attn()
    from openrlhf.models import Actor

    model = tiny_qwen3(tied)
    seq = torch.randint(0, VOCAB, (2, LENGTH))
    attention = torch.ones_like(seq)
    attention[1, :7] = 0  # left padding
    action_mask = torch.ones(2, LENGTH - 1, dtype=torch.bool)
    actor = Actor(model, temperature=1.0)
    actor.packing_samples = False
    expected = actor(seq, action_mask, attention_mask=attention)
    expected.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    keys = list(model.state_dict())

    head = LogProbHead.install(model, chunk=chunk)
    logp, entropy = sequence_logprobs(model, head, seq, attention)
    assert torch.allclose(logp, expected, atol=1e-5)
    logp.sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-5), name
    assert list(model.state_dict()) == keys  # same checkpoint keys (lm_head.weight)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert entropy.dtype == torch.float32 and (entropy > 0).all()


def test_no_full_vocabulary_tensor_in_forward_or_backward():
    """The largest tensor of a forward and backward is one chunk's logits (CHUNK x V), not the
    sequence's (LENGTH x V); without the head the full logits appear."""
    model = tiny_qwen3(tied=False)
    seq = torch.randint(0, VOCAB, (1, LENGTH))
    attention = torch.ones_like(seq)
    with LargestTensor() as plain:
        model(seq, attention_mask=attention).logits.float().log_softmax(-1).sum().backward()
    assert plain.largest >= LENGTH * VOCAB
    head = LogProbHead.install(model, chunk=CHUNK)
    with LargestTensor() as chunked:
        logp, _ = sequence_logprobs(model, head, seq, attention)
        logp.sum().backward()
    assert chunked.largest <= CHUNK * VOCAB


def test_head_refuses_a_call_without_labels():
    model = tiny_qwen3(tied=False)
    LogProbHead.install(model)
    with pytest.raises(RuntimeError, match="set .labels"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_chunk_size_follows_the_vocabulary():
    assert chunk_positions(151_936) == 1024 and chunk_positions(4096) == 37_984

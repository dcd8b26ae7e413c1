"""The `hf` engine: transformers `generate`, batched and seeded; CPU or GPU.

Reads a model directory (or takes a loaded model and tokenizer); writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from pipeline.engines.base import Completion, Prompt, SamplingParams, encode_prompt
from pipeline.engines.logs import engine_output


class HFEngine:
    name = "hf"
    per_request_seed = False  # `generate` draws from one torch generator: seeded per batch

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 64,
        device: str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if isinstance(model, (str, Path)):
            with engine_output():  # (transformers' loading bars)
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
                model = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype)
        if tokenizer is None:
            raise ValueError("HFEngine needs a tokenizer when given a loaded model")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @torch.inference_mode()
    def generate(
        self, prompts: list[Prompt], n: int, params: SamplingParams,
        seeds: list[list[int]] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions per prompt. Sampling is seeded per batch (`params.seed` + the batch
        index; per-request `seeds` are not supported by transformers' generate and are
        ignored), so the same prompts, n, params and batch size give the same completions."""
        encoded = [encode_prompt(p, self.tokenizer)[1] for p in prompts]
        flat = [ids for ids in encoded for _ in range(n)]
        out: list[Completion] = []
        for b, start in enumerate(range(0, len(flat), self.batch_size)):
            out.extend(self._batch(flat[start : start + self.batch_size], params, params.seed + b))
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _batch(self, encoded: list[list[int]], params: SamplingParams,
               seed: int) -> list[Completion]:
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):  # left padding
            ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e) :] = 1
        greedy = params.temperature <= 0
        torch.manual_seed(seed)
        result = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=params.max_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else 0,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            output_logits=params.logprobs,
            return_dict_in_generate=True,
        )
        new = result.sequences[:, width:].cpu()
        logps = None
        if params.logprobs:
            logits = torch.stack(result.logits, dim=1).float().log_softmax(-1).cpu()
            logps = logits.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        completions = []
        for i in range(len(encoded)):
            tokens = new[i].tolist()
            finish = "length"
            if self.eos_id in tokens:  # kept, as vLLM keeps it: the trainer learns to stop
                tokens = tokens[: tokens.index(self.eos_id) + 1]
                finish = "stop"
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(s and s in text for s in params.stop):
                text, tokens, finish = self._cut_at_stop(tokens, params.stop)
            completions.append(
                Completion(
                    text=text,
                    token_ids=tokens,
                    finish_reason=finish,
                    logprobs=logps[i, : len(tokens)].tolist() if logps is not None else None,
                    prompt_token_ids=encoded[i],
                )
            )
        return completions

    def _cut_at_stop(self, tokens: list[int], stops: tuple[str, ...]):
        """As vLLM: the text ends before the first stop string; the tokens run through the one
        that completes it (found by binary search over decoded prefixes)."""

        def decoded(k: int) -> str:
            return self.tokenizer.decode(tokens[:k], skip_special_tokens=True)

        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if any(s and s in decoded(mid) for s in stops):
                hi = mid
            else:
                lo = mid + 1
        text = decoded(lo)
        return text[: min(text.find(s) for s in stops if s and s in text)], tokens[:lo], "stop"

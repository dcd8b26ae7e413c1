"""The `openai` engine: any OpenAI-compatible completions server (`vllm serve`, or several),
through the `openai` client (what vLLM's own docs use for its server).

Requests go to `{base_url}/completions`, one per prompt (with `seeds`: one per sample, n = 1,
carrying its seed), spread round-robin over the base URLs, at most `concurrency` in flight (the
client's async API under a semaphore: no threads). The client retries a request `retries` times,
with exponential backoff and jitter (and a server's Retry-After), on a connection error, a
time-out and 408/409/429/5xx answers; any other answer (400, ...) fails at once. Token ids are
asked for with vLLM's `return_token_ids` extension (the response's and the prompt's, as the
server tokenized it); a server without it yields empty response token ids, and prompt ids from
the local tokenizer (encode_prompt) when there is one. Reads nothing local; writes nothing.
"""

from __future__ import annotations

import asyncio
from itertools import cycle
from typing import Any

from openai import AsyncOpenAI, OpenAIError

from pipeline.engines.base import Completion, Prompt, SamplingParams, encode_prompt, render_prompt


class OpenAIEngineError(RuntimeError):
    """A request that still failed after every retry, or an answer of the wrong shape."""


class OpenAIEngine:
    name = "openai"
    per_request_seed = True

    def __init__(
        self,
        base_urls: str | list[str],
        model: str,
        concurrency: int = 8,
        timeout_s: float = 300.0,
        retries: int = 4,
        api_key: str = "EMPTY",
        tokenizer=None,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("the openai engine needs at least one base URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.model, self.concurrency = model, concurrency
        self.timeout_s, self.retries, self.api_key = timeout_s, retries, api_key
        self.tokenizer = tokenizer  # renders chat prompts; plain prompts need none

    def generate(
        self, prompts: list[Prompt], n: int, params: SamplingParams,
        seeds: list[list[int]] | None = None,
    ) -> list[list[Completion]]:
        urls = cycle(range(len(self.base_urls)))
        texts = [render_prompt(p, self.tokenizer) for p in prompts]
        if seeds is None:
            jobs = [(next(urls), self._body(t, n, params, params.seed)) for t in texts]
        else:
            jobs = [(next(urls), self._body(t, 1, params, s))
                    for t, row in zip(texts, seeds, strict=True) for s in row]
        answers = asyncio.run(self._send(jobs))
        per_prompt = len(answers) // max(len(prompts), 1)
        out = []
        for i, prompt in enumerate(prompts):
            mine = answers[i * per_prompt : (i + 1) * per_prompt]
            out.append([c for a in mine for c in self._completions(a, n // len(mine), params,
                                                                    prompt)])
        return out

    async def _send(self, jobs: list[tuple[int, dict]]) -> list[dict[str, Any]]:
        """Every job's answer (as a dict), in order; at most `concurrency` in flight."""
        clients = [AsyncOpenAI(base_url=u, api_key=self.api_key, max_retries=self.retries,
                               timeout=self.timeout_s) for u in self.base_urls]
        bound = asyncio.Semaphore(self.concurrency)

        async def one(url: int, body: dict) -> dict[str, Any]:
            async with bound:
                try:
                    answer = await clients[url].completions.create(**body)
                except OpenAIError as e:
                    raise OpenAIEngineError(
                        f"{self.base_urls[url]}/completions failed (after up to "
                        f"{self.retries} retries): {type(e).__name__}: {e}") from e
            return answer.model_dump()

        try:
            return await asyncio.gather(*(one(url, body) for url, body in jobs))
        finally:
            for client in clients:
                await client.close()

    def _body(self, prompt: str, n: int, params: SamplingParams, seed: int) -> dict:
        greedy = params.temperature <= 0
        body = {
            "model": self.model,
            "prompt": prompt,
            "n": n,
            "temperature": 0.0 if greedy else params.temperature,
            "top_p": 1.0 if greedy else params.top_p,
            "max_tokens": params.max_tokens,
            "seed": seed,
            "extra_body": {"return_token_ids": True, "skip_special_tokens": True},
        }
        if params.logprobs:
            body["logprobs"] = 0
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _completions(self, answer: dict, n: int, params: SamplingParams,
                     prompt: Prompt) -> list[Completion]:
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index") or 0)
        if len(choices) != n:
            raise OpenAIEngineError(f"asked for {n} choices, got {len(choices)}")
        out = []
        for c in choices:
            prompt_ids = c.get("prompt_token_ids") or answer.get("prompt_token_ids")
            if not prompt_ids and self.tokenizer is not None:
                prompt_ids = encode_prompt(prompt, self.tokenizer)[1]
            logprobs = None
            if params.logprobs and c.get("logprobs"):
                logprobs = [float(x) for x in c["logprobs"].get("token_logprobs") or []]
            out.append(
                Completion(
                    text=c.get("text") or "",
                    token_ids=list(c.get("token_ids") or []),
                    finish_reason="length" if c.get("finish_reason") == "length" else "stop",
                    logprobs=logprobs,
                    prompt_token_ids=list(prompt_ids or []),
                )
            )
        return out

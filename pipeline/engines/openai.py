"""The `openai` engine: any OpenAI-compatible completions server (`vllm serve`, or several).

Requests go to `POST {base_url}/completions`, one per prompt, at most `concurrency` at a time,
spread round-robin over the given base URLs. A request that fails to connect, times out or gets
a 5xx/429 answer is retried with exponential backoff, `retries` times, then raises. Token ids are
asked for with vLLM's `return_token_ids` extension (the response's and the prompt's, as the
server tokenized it); a server without it yields empty response token ids, and prompt ids from
the local tokenizer (encode_prompt) when there is one. With `seeds`, every sample is its own
request (n = 1) carrying its seed.
Reads nothing local; writes nothing.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import cycle

from pipeline.engines.base import Completion, Prompt, SamplingParams, encode_prompt, render_prompt

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


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
        backoff_s: float = 0.5,
        api_key: str = "EMPTY",
        tokenizer=None,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("the openai engine needs at least one base URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.model, self.concurrency = model, concurrency
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.api_key = api_key
        self.tokenizer = tokenizer  # renders chat prompts; plain prompts need none

    def generate(
        self, prompts: list[Prompt], n: int, params: SamplingParams,
        seeds: list[list[int]] | None = None,
    ) -> list[list[Completion]]:
        urls = cycle(self.base_urls)
        texts = [render_prompt(p, self.tokenizer) for p in prompts]
        if seeds is None:
            jobs = [(next(urls), self._body(t, n, params, params.seed)) for t in texts]
        else:
            jobs = [(next(urls), self._body(t, 1, params, s))
                    for t, row in zip(texts, seeds, strict=True) for s in row]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(lambda job: self._post(*job), jobs))
        per_prompt = len(answers) // max(len(prompts), 1)
        out = []
        for i, prompt in enumerate(prompts):
            mine = answers[i * per_prompt : (i + 1) * per_prompt]
            out.append([c for a in mine for c in self._completions(a, n // len(mine), params,
                                                                    prompt)])
        return out

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
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if params.logprobs:
            body["logprobs"] = 0
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    def _post(self, base_url: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                f"{base_url}/completions",
                data=data,
                headers={"Content-Type": "application/json",
                         "Authorization": f"Bearer {self.api_key}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                last_error = f"HTTP {e.code}: {e.read()[:300]!r}"
                if e.code not in RETRY_STATUS:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last_error = f"{type(e).__name__}: {e}"
            except json.JSONDecodeError as e:
                last_error = f"answer is not JSON: {e}"
        raise OpenAIEngineError(f"{base_url}/completions failed after retries: {last_error}")

    def _completions(self, answer: dict, n: int, params: SamplingParams,
                     prompt: Prompt) -> list[Completion]:
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
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

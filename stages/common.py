"""What several stages share: the policy's path and tokenizer, the task's prompt, the engine,
the token boundary of a kept prefix, and seeded tie-breaking."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.engines import Engine, Prompt, SamplingParams, kept_engine
from stages.tasks.base import task_of


def policy_path(cfg: Config) -> Path:
    """The model being trained: `policy.path` (a round sets it to the round's policy)."""
    if not cfg.policy.path:
        raise ValueError("policy.path is empty: give the model directory (tapo round and "
                         "iterate set it to the round's policy)")
    return Path(cfg.policy.path)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"no model directory at {path} (the testbed base: `tapo base`; "
                                "or set policy.path)")
    return AutoTokenizer.from_pretrained(path)


def instruction_prompt(text: str, tokenizer: Any) -> Prompt:
    """An instruction to a model as the engines take it: a user turn when the model has a chat
    template, else the plain text and a newline. `render_prompt(...)` of it is the exact text
    the model reads (what the cold start's IF examples are trained on)."""
    if getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": text}]
    return text + "\n"


def require_rule_task(config: Config, section: str) -> None:
    """`SECTION.method=rule` uses the task's exact step checker: a task without one needs
    `llm`."""
    if getattr(config, section).method == "rule" and not task_of(config).has_step_checker:
        raise ValueError(f"{section}.method=rule needs a task with an exact step checker (arith); "
                         f"task {config.task.name!r} needs {section}.method=llm")


class EngineHolder:
    """The engine for `model` on first use (a stage that never generates never loads a model):
    this process's kept engine (engines.kept_engine), or one `set` by the caller."""

    def __init__(self, cfg: Config, model: str | Path):
        self.cfg, self.model = cfg, Path(model)
        self._engine: Engine | None = None

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = kept_engine(self.cfg.engine, self.model, seed=self.cfg.run.seed)
        return self._engine

    def set(self, engine: Engine) -> None:
        self._engine = engine

    def close(self) -> None:
        """Lets go of the engine; a kept engine stays for the next stage or round."""
        self._engine = None


def ask(engine: EngineHolder, instructions: list[str], temperature: float, max_tokens: int,
        seed: int) -> list[str]:
    """One answer of the holder's model to each instruction (instruction_prompt); the answers'
    text, in order."""
    tokenizer = load_tokenizer(str(engine.model))
    prompts = [instruction_prompt(text, tokenizer) for text in instructions]
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    return [g[0].text for g in engine.get().generate(prompts, 1, params)]


def prefix_boundary(tokenizer: Any, token_ids: list[int], text: str, chars: int) -> tuple[int, int]:
    """(n_tokens, n_chars) of the longest run of the rollout's own tokens whose decoding is a
    prefix of `text[:chars]`; n_chars <= chars (a token straddling the boundary is left out, and
    so are special tokens at the end).
    Binary search over decoded prefixes on the length of their decoding less trailing U+FFFD (a
    prefix that cuts a multi-byte character through decodes to a replacement character, so a
    plain "is a prefix" test is not monotonic), then back to the last clean prefix. Raises
    ValueError when the ids do not decode to `text`.
    """

    def decoded(n: int) -> str:
        return tokenizer.decode(token_ids[:n], skip_special_tokens=True)

    if decoded(len(token_ids)) != text:
        raise ValueError("the response's token ids do not decode to its text")
    lo, hi = 0, len(token_ids)  # invariant: the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(decoded(mid).rstrip("\ufffd")) <= chars:
            lo = mid
        else:
            hi = mid - 1
    while lo and not (len(d := decoded(lo)) <= chars and text.startswith(d)):
        lo -= 1  # a multi-byte character cut through, or a straddling token
    special = set(tokenizer.all_special_ids)
    while lo and token_ids[lo - 1] in special:  # the prefix never ends in EOS
        lo -= 1
    return lo, len(decoded(lo))


def valid_unique(rows: list[dict[str, Any]], key: Callable[[dict], Any],
                 valid: Callable[[dict], bool], out: Any, bad: tuple[str, str],
                 duplicate: str) -> list[dict[str, Any]]:
    """The rows that are `valid` and whose `key` was not seen before, in order; the others go to
    `out` (a StageOutput) as `bad` (reason, detail) or as `duplicate`."""
    seen: set[Any] = set()
    kept = []
    for row in rows:
        if not valid(row):
            out.drop(row, *bad)
        elif (k := key(row)) in seen:
            out.drop(row, duplicate, f"repeats an earlier row: {str(k)[:200]}")
        else:
            seen.add(k)
            kept.append(row)
    return kept


def tiebreak(seed: int, key: str) -> int:
    """A seeded, stable pseudo-random rank for `key` (same seed and key, same number)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")

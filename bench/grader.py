"""Grader throughput vs calling math-verify directly, on the same (answer, reference) pairs.

For each MATH-500 and GSM8K problem: the reference answer as written, an equivalent rewrite
(spacing, \\dfrac, a decimal for simple fractions) and a wrong answer (the next problem's).
Both sides must give identical verdicts; prints items/s of each and the ratio.

    python -m bench.grader
"""

from __future__ import annotations

import json
import re
import time

from pipeline.grader import Grader
from pipeline.grader_check import DATA, load_jsonl

_SIMPLE_FRAC = re.compile(r"^\\frac\{(\d+)\}\{(\d+)\}$")


def rewrite(answer: str) -> str:
    """An equivalent form of `answer` (what a model might write instead)."""
    m = _SIMPLE_FRAC.match(answer.strip())
    if m and int(m.group(2)) in (2, 4, 5, 8, 10, 20, 25):
        return str(int(m.group(1)) / int(m.group(2)))
    return " " + answer.replace("\\frac", "\\dfrac").replace(",", ", ") + " "


def pairs() -> list[tuple[str, str]]:
    refs = [r["answer"] for r in load_jsonl(DATA / "math500.jsonl")]
    refs += [r["answer"] for r in load_jsonl(DATA / "gsm8k_test.jsonl")]
    out = []
    for i, ref in enumerate(refs):
        out += [(ref, ref), (rewrite(ref), ref), (refs[(i + 1) % len(refs)], ref)]
    return out


def plain_math_verify(items: list[tuple[str, str]]) -> list[bool]:
    from math_verify import parse, verify

    return [verify(parse(f"\\boxed{{{r}}}"), parse(f"\\boxed{{{a}}}")) for a, r in items]


def main() -> None:
    """Prints a JSON line: items, seconds and items/s of both, the ratio, verdict agreement."""
    items = pairs()
    t0 = time.perf_counter()
    plain = plain_math_verify(items)
    t_plain = time.perf_counter() - t0
    with Grader("math", workers=2, timeout_s=5.0) as grader:
        grader.grade(["\\boxed{x}"], ["y"])  # start the workers outside the timing
        t0 = time.perf_counter()
        ours = grader.grade([f"\\boxed{{{a}}}" for a, _ in items], [r for _, r in items])
        t_ours = time.perf_counter() - t0
    same = sum((v.label == "correct") == p for v, p in zip(ours, plain))
    differ = [(a, r, v.label, p) for (a, r), v, p in zip(items, ours, plain)
              if (v.label == "correct") != p]
    print(json.dumps({
        "bench": "grader", "items": len(items),
        "math_verify_items_per_s": round(len(items) / t_plain, 1),
        "tapo_grader_items_per_s": round(len(items) / t_ours, 1),
        "ratio": round(t_plain / t_ours, 2),
        "identical_verdicts": f"{same}/{len(items)}",
        "differences": differ[:10],
    }))


if __name__ == "__main__":
    main()

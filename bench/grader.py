"""Grader throughput vs calling math-verify directly, on the same (answer, reference) pairs.

For each MATH-500 and GSM8K problem: the reference answer as written, an equivalent rewrite
(spacing, \\dfrac, a decimal for simple fractions) and a wrong answer (the next problem's).
All must give identical verdicts; prints items/s of each and the ratios: plain math-verify in
this process (no time-out at all); our grader (fast path, then chunks to 2 worker processes with
a hard per-item time-out); the same fast path with a pebble ProcessPool of 2 workers doing the
rest, one task per item under pebble's per-task time-out (the library that would replace our
hand-made pool; pipeline/grader.py keeps ours while this shows it faster).

    python -m bench.grader
"""

from __future__ import annotations

import json
import re
import time

from pipeline.grader import Grader
from stages.tasks import get_task
from tapo.flows.grader_check import DATA, load_jsonl

MATH = get_task("math")

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


WARM_S = 3.0  # after the first item: every worker of both pools has started


def _verify(answer: str, reference: str) -> tuple[str, str]:
    from stages.tasks import math as math_task

    return math_task.verify_answer(answer, reference)


def pebble_grade(items: list[tuple[str, str]], workers: int = 2,
                 timeout_s: float = 5.0) -> tuple[list[str], float]:
    """Labels by our fast path, the rest by a pebble pool (a task past its time-out has its
    worker killed and replaced by pebble); and the seconds it took, workers already up."""
    import multiprocessing
    from concurrent.futures import TimeoutError as FutureTimeout

    from pebble import ProcessExpired, ProcessPool

    from pipeline.grader import fast_grade
    from stages.tasks.base import extract_boxed

    labels: list[str] = []
    with ProcessPool(max_workers=workers, context=multiprocessing.get_context("spawn")) as pool:
        pool.schedule(_verify, ("1", "1")).result()
        time.sleep(WARM_S)
        t0 = time.perf_counter()
        futures = {}
        for i, (a, r) in enumerate(items):
            v = fast_grade(MATH, f"\\boxed{{{a}}}", r)
            labels.append(v.label if v else "")
            if v is None:
                futures[i] = pool.schedule(_verify, (extract_boxed(f"\\boxed{{{a}}}"), r),
                                           timeout=timeout_s)
        for i, future in futures.items():
            try:
                labels[i] = future.result()[0]
            except FutureTimeout:
                labels[i] = "timeout"
            except ProcessExpired:
                labels[i] = "error"
        return labels, time.perf_counter() - t0


def main() -> None:
    """Prints a JSON line: items, seconds and items/s of both, the ratio, verdict agreement."""
    items = pairs()
    t0 = time.perf_counter()
    plain = plain_math_verify(items)
    t_plain = time.perf_counter() - t0
    with Grader(MATH, workers=2, timeout_s=5.0) as grader:
        grader.grade(["\\boxed{x}"], ["y"])  # start the workers outside the timing
        time.sleep(WARM_S)
        t0 = time.perf_counter()
        ours = grader.grade([f"\\boxed{{{a}}}" for a, _ in items], [r for _, r in items])
        t_ours = time.perf_counter() - t0
    pebble_labels, t_pebble = pebble_grade(items)
    same = sum((v.label == "correct") == p == (q == "correct")
               for v, p, q in zip(ours, plain, pebble_labels))
    differ = [(a, r, v.label, p) for (a, r), v, p in zip(items, ours, plain)
              if (v.label == "correct") != p]
    print(json.dumps({
        "bench": "grader", "items": len(items),
        "math_verify_items_per_s": round(len(items) / t_plain, 1),
        "tapo_grader_items_per_s": round(len(items) / t_ours, 1),
        "pebble_pool_items_per_s": round(len(items) / t_pebble, 1),
        "ratio": round(t_plain / t_ours, 2),
        "ratio_vs_pebble": round(t_pebble / t_ours, 2),
        "identical_verdicts": f"{same}/{len(items)}",
        "differences": differ[:10],
    }))


if __name__ == "__main__":
    main()

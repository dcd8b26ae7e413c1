"""Checks the math grader on real data: every reference solution must grade correct against its
own reference answer (MATH-500; GSM8K, whose `#### x` line is read as the final answer), and
AIME / HMMT reference answers must round-trip (`\\boxed{answer}` grades correct).

    python -m tapo.flows.grader_check [--limit N] [--out report.md]

Reads data/*.jsonl; prints (and optionally writes) the agreement and every disagreement.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.grader import Grader
from stages.tasks import get_task

DATA = Path(__file__).resolve().parents[2] / "data"
_GSM8K_FINAL = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Item:
    source: str
    id: str
    response: str
    reference: str


def load_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k_response(solution: str) -> str:
    """The solution with its `#### x` final-answer line written as `\\boxed{x}`."""
    return _GSM8K_FINAL.sub(lambda m: f"\\boxed{{{m.group(1).replace(',', '')}}}", solution)


def check_items(limit: int | None = None) -> list[Item]:
    items = []
    for row in load_jsonl(DATA / "math500.jsonl")[:limit]:
        items.append(Item("math500", row["id"], row["solution"], row["answer"]))
    for row in load_jsonl(DATA / "gsm8k_test.jsonl")[:limit]:
        items.append(Item("gsm8k", row["id"], gsm8k_response(row["solution"]), row["answer"]))
    for name in ("aime2024", "aime2025", "hmmt2025_feb"):
        for row in load_jsonl(DATA / f"{name}.jsonl")[:limit]:
            items.append(Item(name, row["id"], f"\\boxed{{{row['answer']}}}", row["answer"]))
    return items


def run_check(limit: int | None = None, workers: int = 2, timeout_s: float = 5.0) -> dict:
    items = check_items(limit)
    with Grader(get_task("math"), workers=workers, timeout_s=timeout_s) as grader:
        verdicts = grader.grade([i.response for i in items], [i.reference for i in items])
    per_source: dict[str, list[int]] = {}
    disagreements = []
    for item, v in zip(items, verdicts):
        counts = per_source.setdefault(item.source, [0, 0])
        counts[1] += 1
        if v.label == "correct":
            counts[0] += 1
        else:
            disagreements.append({"source": item.source, "id": item.id, "label": v.label,
                                  "reason": v.reason, "extracted": v.answer,
                                  "reference": item.reference})
    agree = sum(c[0] for c in per_source.values())
    return {"agreement": agree / len(items), "agree": agree, "total": len(items),
            "per_source": {k: {"agree": a, "total": t} for k, (a, t) in per_source.items()},
            "disagreements": disagreements}


def render(report: dict) -> str:
    lines = [f"Grader agreement: {report['agree']}/{report['total']} "
             f"= {100 * report['agreement']:.2f}%", "", "| source | agree | total |",
             "|---|---|---|"]
    lines += [f"| {k} | {v['agree']} | {v['total']} |" for k, v in report["per_source"].items()]
    lines += ["", f"Disagreements ({len(report['disagreements'])}):", ""]
    lines += [f"- {d['source']} {d['id']}: {d['label']} ({d['reason']}); extracted "
              f"{d['extracted']!r}, reference {d['reference']!r}" for d in report["disagreements"]]
    return "\n".join(lines)


def main() -> None:
    """Grades the bundled reference solutions; prints the agreement table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="rows per file")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    text = render(run_check(args.limit, args.workers))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

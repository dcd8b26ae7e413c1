"""How well testbed models locate a failure and construct the trajectory themselves.

    python -m bench.judges MODEL_DIR [MODEL_DIR ...] [--config C] [--split heldout|train]

For each model, `testbed.base.measure_judges` (the HF engine, greedy) on a judge example of
every problem of the config's held-out split (configs/testbed.yaml's by default: 200 problems,
a fresh misreading, slip or copy error each): one markdown row per model with the share of
exact locations (and by error kind), and of construct answers in both tags, starting with the
expected line, with the expected diagnosis, and grading correct. A base built with judges
records the same figures in build.json (`judges`). `--split train`: on the judge phase's own
examples instead (those of the first pretraining problems, about as many as the held-out
split; the config must have a `judge_share`), so that a gap between the two splits tells
memorizing from not learning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import markdown_table
from pipeline.config import load_config
from pipeline.engines.hf import HFEngine
from stages.tasks import arith
from testbed.base import measure_judges


def judge_row(model_dir: Path, cfg, split: str = "heldout") -> dict:
    """The markdown row of one model on `split` (heldout or train): measure_judges flattened."""
    if split == "train" and not cfg.judge_share:
        raise ValueError("--split train needs a config with testbed.judge_share > 0")
    engine = HFEngine(model_dir, batch_size=100)
    if split == "train":
        pretrain = arith.generate_split("pretrain", cfg.n_pretrain, cfg.seed, cfg.arith)
        first = pretrain[: round(cfg.n_heldout / cfg.judge_share)]
        scores = measure_judges(engine, first, cfg, share=cfg.judge_share)
    else:
        heldout = arith.generate_split("heldout", cfg.n_heldout, cfg.seed, cfg.arith)
        scores = measure_judges(engine, heldout, cfg)
    by_kind = scores.pop("locate_exact_by_kind")
    return {"model": str(model_dir), "split": split,
            **{k: v for k, v in scores.items() if k != "problems"},
            **{f"locate_{k}": v for k, v in sorted(by_kind.items())},
            "problems": scores["problems"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    args = p.parse_args()
    cfg = load_config(args.config).testbed
    print(markdown_table([judge_row(m, cfg, args.split) for m in args.models]))


if __name__ == "__main__":
    main()

"""The cold-start set at the paper's size, built on the testbed: wall time, rows/s per stage
and peak memory, for a tenth of the size and the full size.

    python -m bench.coldstart [--config C] [--sizes 4500,45000] [--out DIR] [key=value ...]

For each size S, a fresh process (so its peak memory is its own) builds the set the way
`make coldstart` does (sample -> classify -> select -> locate -> construct -> examples, with
`coldstart.size=S`; the SFT is not part of it) from a pool of S testbed training problems (the
testbed's own generator, its `train` split: disjoint from pretraining and held-out problems),
and prints one JSON line: seconds and rows in/s per stage, examples per source, and the peak
resident memory of the driver and of its largest child (the vLLM engine process). Stages stream
shard by shard; the whole-input one (examples: it draws the mixture) reads its input at once.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.chain import run_chain
from pipeline.config import load_config
from pipeline.engines import release_engine
from pipeline.io import write_table_atomic
from pipeline.problems import write_problems
from stages.tasks import arith
from tapo.flows.chains import COLDSTART
from tapo.flows.coldstart import base_model, sampling_config, source_counts
from testbed.base import build_base, problem_rows


def build_one(size: int, config: str | None, overrides: list[str], out: Path) -> dict:
    """Builds the set of `size` examples anew under `out` (pool: `size` problems); returns the
    figures."""
    cfg = load_config(config, [*overrides, f"coldstart.size={size}"])
    build_base(cfg.testbed, cfg.testbed.base_dir)
    shutil.rmtree(out, ignore_errors=True)
    pool = out / "pool.parquet"
    problems = arith.generate_split("train", size, cfg.testbed.seed, cfg.testbed.arith)
    write_table_atomic(problem_rows(problems, "train"), pool)
    scfg = sampling_config(cfg, base_model(cfg))
    t = time.time()
    problems_stats = write_problems(pool, out / "problems", 0, None, cfg.coldstart.seed,
                                    cfg.rollout.shard_size)
    runs = run_chain(COLDSTART, scfg, out, progress=False, until="examples")
    seconds = time.time() - t
    release_engine()  # (its process ends: its peak memory is counted as a child's)
    counts = source_counts({"problems": problems_stats} | {n: r.result.stats
                                                            for n, r in runs.items()},
                           out / "examples")
    return {
        "bench": "coldstart_scale", "size": size, "problems": size,
        "base": str(base_model(cfg)), "seconds": round(seconds, 1),
        "examples": {s: c["kept"] for s, c in counts["examples"].items()},
        "stages": {n: {"rows_in": r.result.stats["rows_in"], "rows_out": r.result.stats["rows_out"],
                       "seconds": round(r.seconds, 1),
                       "rows_in_per_s": round(r.result.stats["rows_in"] / r.seconds, 1)}
                   for n, r in runs.items()},
        "peak_rss_mb": {"driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                        "largest_child": resource.getrusage(
                            resource.RUSAGE_CHILDREN).ru_maxrss // 1024},
    }


def main() -> None:
    """Prints one JSON line per size, each from its own process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--sizes", default="4500,45000")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-coldstart"))
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args()
    if args.one is not None:  # the child: one size
        result = build_one(args.one, args.config, args.overrides, args.out / f"size-{args.one}")
        print(json.dumps(result), flush=True)
        return
    for size in (int(s) for s in args.sizes.split(",")):
        subprocess.run([sys.executable, "-m", "bench.coldstart", "--one", str(size), "--out",
                        str(args.out), *(["--config", args.config] if args.config else []),
                        *args.overrides], check=True)


if __name__ == "__main__":
    main()

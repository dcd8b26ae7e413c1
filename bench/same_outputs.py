"""The outputs of a testbed round, a 2-round `iterate` and a cold start, as a manifest of
hashes: run before and after a refactor that must not change results, then compare.

    python -m bench.same_outputs run OUT            # runs the three, writes OUT/manifest.json
    python -m bench.same_outputs compare A B        # exit 1 when a shard or weight differs

On the small testbed (configs/testbed-small.yaml, its shipped base), the hf engine, one
worker and one thread, so the figures are exact on one machine. The manifest holds every
parquet part (kept and excluded rows) and every weight and optimizer file under the three run
directories, by path; metadata (timings, logs) is left out. A directory of excluded rows is
compared under its present name (`__excluded`, was `excluded`), so the move is no difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

CONFIG = "configs/testbed-small.yaml"
HASHED = ("*.parquet", "*.safetensors", "optimizer.pt")
RENAMED = {"excluded": "__excluded"}  # earlier names of a path component


ROOT = Path(__file__).resolve().parent.parent


def tapo(*args: str) -> None:
    """One `tapo` command of this checkout (`python -m tapo` in its root), one thread."""
    command = [sys.executable, "-m", "tapo", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def run(out: Path) -> dict[str, str]:
    """Runs the three flows under `out`; returns (and writes) the manifest."""
    out = out.resolve()
    common = ["--config", CONFIG, f"testbed.base_dir={out / 'base'}", "engine.backend=hf",
              "runner.workers=1", "grader.workers=1", "rollout.problems_per_round=32"]
    tapo("base", *common)
    tapo("round", str(out / "round"), "--iteration", "1", *common)
    tapo("iterate", str(out / "iterate"), "--rounds", "2", *common)
    tapo("coldstart", str(out / "coldstart"), *common, f"policy.coldstart={out / 'cs-model'}",
         "coldstart.size=120", "coldstart.epochs=1")
    manifest = hashes(out, ["round", "iterate", "coldstart", "cs-model"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def hashes(out: Path, dirs: list[str]) -> dict[str, str]:
    """sha256 of every hashed file under `out/DIR` for each of `dirs`, by normalised path."""
    found = {}
    for d in dirs:
        for pattern in HASHED:
            for path in (out / d).rglob(pattern):
                parts = [RENAMED.get(p, p) for p in path.relative_to(out).parts]
                found["/".join(parts)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def compare(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The paths whose hashes differ or that only one side has."""
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("out", type=Path)
    p = sub.add_parser("compare")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        manifest = run(args.out)
        print(f"{len(manifest)} files hashed: {args.out / 'manifest.json'}")
        return 0
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (args.a, args.b))
    differ = compare(a, b)
    print(f"{len(a)} and {len(b)} files; {len(differ)} differ"
          + "".join(f"\n  {p}" for p in differ))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

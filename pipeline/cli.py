"""The `tapo` command line (also `python -m pipeline`).

    tapo stage NAME --in DIR --out DIR [--config C] [--workers N] [section.key=value ...]
    tapo status RUN_DIR
    tapo base [--config C] [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs one command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="tapo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stage", help="run one stage over a directory of shards")
    p.add_argument("name", help="a registered stage name or package.module:Class")
    p.add_argument("--in", dest="in_dir", required=True, type=Path)
    p.add_argument("--out", dest="out_dir", required=True, type=Path)
    _config_args(p)
    p.add_argument("--workers", type=int, default=None, help="worker processes (runner.workers)")

    p = sub.add_parser("status", help="completion, row counts and drops of a run's stages")
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("base", help="build the testbed base model (no-op when up to date)")
    _config_args(p)

    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if hasattr(args, "overrides"):
        args.overrides = args.overrides + extra
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"stage": cmd_stage, "status": cmd_status, "base": cmd_base}[args.command](args)
    except ConfigError as e:
        print(f"tapo: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        print(f"tapo: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML (default configs/testbed.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value")


def cmd_stage(args: argparse.Namespace) -> int:
    from pipeline.runner import load_stage_class, run_stage

    cfg = load_config(args.config, args.overrides)
    stage_cls = load_stage_class(args.name)
    result = run_stage(stage_cls, cfg, args.in_dir, args.out_dir, workers=args.workers)
    state = "already complete, nothing to do" if result.skipped else "done"
    print(f"{stage_cls.name}: {state}: {json.dumps(result.stats)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import render_status

    print(render_status(args.run_dir))
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    from pipeline.testbed import build_base

    cfg = load_config(args.config, args.overrides)
    model_dir = build_base(cfg.testbed, cfg.testbed.base_dir)
    build = json.loads((model_dir.parent / "build.json").read_text())
    print(f"base model: {model_dir}")
    print(f"held-out: {json.dumps(build['heldout'])}")
    print(f"seconds: {json.dumps(build['seconds'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

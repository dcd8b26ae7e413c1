"""`make eval`: n samples per problem of a model on benchmarks; Pass@k, DSR, ERR, length.

    table = evaluate(model, ["aime24", "testbed"], cfg, out_dir)

For each benchmark, writes OUT/<bench>/{problems,sample,classify}/ (the sample and classify
stages: resumable, every response kept and graded), then OUT/metrics.parquet (one row per
benchmark), OUT/results.md (the same as a markdown table) and OUT/pass_at_k.png.

Metrics (PAPER.md, our reading), over the graded responses of each benchmark:
- pass@k = mean over problems of the unbiased estimator 1 - C(n-c, k) / C(n, k), for
  k = 1, 2, 4, ... up to n (n samples of which c are correct);
- Direct Solution Rate (dsr) = share of responses that are correct and do not reflect;
- Effective Reflection Rate (err) = among responses that reflect, the share that are correct
  (empty when none reflects);
- reflection_rate = share of responses that reflect; mean_length = mean response tokens.
A response reflects when it matches `eval.reflection_pattern` (default: the transition phrase
"Wait, step k is wrong" or the `<analysis>` tag).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.chain import run_chain
from pipeline.config import Config
from pipeline.io import read_pandas
from pipeline.problems import write_problems
from tapo.flows.chains import EVAL

DATA = Path(__file__).resolve().parents[2] / "data"
BENCHMARKS = {  # name -> (file, task); `testbed`: the testbed's held-out split
    "aime24": (DATA / "aime2024.jsonl", "math"),
    "aime25": (DATA / "aime2025.jsonl", "math"),
    "hmmt25": (DATA / "hmmt2025_feb.jsonl", "math"),
    "math500": (DATA / "math500.jsonl", "math"),
    "gsm8k": (DATA / "gsm8k_test.jsonl", "math"),
    "testbed": (None, "arith"),
}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased Pass@k estimator from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return out if out[-1] == n else out + [n]


def response_metrics(responses: pd.DataFrame, pattern: str) -> dict[str, Any]:
    """Pass@k, DSR, ERR, reflection rate and mean length from graded responses (columns
    problem_id, label, response, response_len); k up to the fewest samples of a problem."""
    reflect = responses["response"].map(lambda t: re.search(pattern, t) is not None)
    correct = responses["label"] == "correct"
    per_problem = correct.groupby(responses["problem_id"]).agg(["size", "sum"])
    n_min = int(per_problem["size"].min())
    out: dict[str, Any] = {"problems": len(per_problem), "responses": len(responses),
                           "samples": n_min}
    for k in ks(n_min):
        out[f"pass@{k}"] = float(sum(pass_at_k(int(n), int(c), k) for n, c in
                                     zip(per_problem["size"], per_problem["sum"]))
                                 / len(per_problem))
    out["dsr"] = float((correct & ~reflect).mean())
    out["err"] = float((correct & reflect).sum() / reflect.sum()) if reflect.any() else None
    out["reflection_rate"] = float(reflect.mean())
    out["mean_length"] = float(responses["response_len"].mean())
    return out


def bench_config(cfg: Config, model: str | Path, bench: str) -> Config:
    """`cfg` set up to sample `model` on `bench`: its task, and the eval knobs as the rollout's."""
    e = cfg.eval
    rollout = cfg.rollout.model_copy(update={"group_size": e.n, "temperature": e.temperature,
                                             "top_p": e.top_p, "max_tokens": e.max_tokens})
    return cfg.model_copy(update={
        "task": cfg.task.model_copy(update={"name": BENCHMARKS[bench][1]}),
        "policy": cfg.policy.model_copy(update={"path": str(model)}), "rollout": rollout})


def bench_file(cfg: Config, bench: str) -> Path:
    if bench not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {bench!r}; known: {', '.join(BENCHMARKS)}")
    path = BENCHMARKS[bench][0]
    if path is not None:
        return path
    from testbed.base import testbed_problems

    return testbed_problems(cfg.testbed, "heldout")


def evaluate_bench(model: str | Path, bench: str, cfg: Config, out_dir: Path,
                   progress: bool = True) -> dict[str, Any]:
    """Samples and grades `model` on `bench` into out_dir; returns its metrics row."""
    bcfg = bench_config(cfg, model, bench)
    problems = write_problems(bench_file(cfg, bench), out_dir / "problems", 0,
                              cfg.eval.max_problems, cfg.eval.seed, cfg.rollout.shard_size)
    runs = run_chain(EVAL, bcfg, out_dir, progress=progress)
    responses = read_pandas(out_dir / "classify",
                            columns=["problem_id", "label", "response", "response_len"])
    if responses.empty:
        raise ValueError(f"{bench}: no response was graded; see {out_dir}/sample/__excluded and "
                         f"{out_dir}/classify/__excluded for why")
    dropped = sum(v for run in runs.values() for k, v in run.result.stats.items()
                  if k.startswith("dropped_"))
    return {"model": str(model), "bench": bench, "benchmark_problems": problems["rows_out"],
            "dropped": dropped, **response_metrics(responses, cfg.eval.reflection_pattern)}


def evaluate(model: str | Path, benches: list[str], cfg: Config, out_dir: str | Path,
             progress: bool = True) -> pd.DataFrame:
    """Every benchmark in `benches`; writes metrics.parquet, results.md, pass_at_k.png."""
    out_dir = Path(out_dir)
    rows = [evaluate_bench(model, b, cfg, out_dir / b, progress) for b in benches]
    table = pd.DataFrame(rows)
    table.to_parquet(out_dir / "metrics.parquet", index=False)
    (out_dir / "results.md").write_text(markdown_table(table, "bench") + "\n")
    plot_pass_at_k(table, "bench", out_dir / "pass_at_k.png")
    return table


def metric_columns(table: pd.DataFrame) -> list[str]:
    passk = sorted((c for c in table.columns if c.startswith("pass@")),
                   key=lambda c: int(c[5:]))
    return passk + ["dsr", "err", "reflection_rate", "mean_length"]


def markdown_table(table: pd.DataFrame, key: str) -> str:
    """One row per `key` value: problems, samples and every metric, 3 decimals."""
    cols = [key, "problems", "samples", *metric_columns(table)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(format_cell(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def format_cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def plot_pass_at_k(table: pd.DataFrame, key: str, path: Path) -> None:
    """pass@k against k (log2 axis), one line per `key` value."""
    fig, ax = new_plot((5, 3.5))
    for _, row in table.iterrows():
        cols = [c for c in metric_columns(table) if c.startswith("pass@") and pd.notna(row[c])]
        ax.plot([int(c[5:]) for c in cols], [row[c] for c in cols], marker="o", label=row[key])
    ax.set_xscale("log", base=2)
    save_plot(fig, ax, "k", "pass@k", path)


def new_plot(size: tuple[float, float], rows: int = 1, cols: int = 1) -> tuple[Any, Any]:
    """A matplotlib (figure, axes) drawn off-screen; a grid of axes when rows x cols > 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size)


def save_plot(fig: Any, ax: Any, xlabel: str, ylabel: str, path: Path) -> None:
    """Labels, grid and legend on `ax`; writes `fig` to `path` (PNG) and frees it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

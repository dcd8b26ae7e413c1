"""`make compare`: TAPO vs GRPO (and ablations) on the testbed, several seeds, one report.

    report = compare(out_dir, ["tapo", "grpo"], seeds=[0, 1, 2], rounds=10, cfg=cfg)

Every (variant, seed) run starts from the same checkpoint (the cold-start model when complete,
else the testbed base: tapo/flows/round.py resolve_policy) and runs `rounds` rounds of
`make iterate` into OUT/<variant>-s<seed>/ with run.seed = train.seed = seed. The start and
each run's last checkpoint (and, with `eval_every` K, its checkpoints of rounds K, 2K, ...) are
evaluated on the testbed's held-out set (tapo/flows/evaluate.py) into OUT/eval/. Then
OUT/compare.parquet (a row per evaluated checkpoint: `rounds` is its round, 0 for the start),
OUT/per_round.parquet (each run's training pass rate per round: the rate on that round's fresh
problems; its augmented and OOD-suppressed shares), OUT/by_difficulty.parquet (held-out pass@1
per number of steps of the start and the last checkpoints), OUT/report.md (mean and standard
deviation over seeds per variant, of the last checkpoints), OUT/pass_rate_per_round.png,
OUT/heldout_per_round.png (held-out pass@1 of the evaluated checkpoints, mean over seeds),
OUT/pass_at_k.png and, with two or more of DOSE's variants, OUT/dose_response.png (held-out
pass@1 against `algo.aug_weight`, GRPO at 0). Everything resumes: complete rounds, trainings
and evaluations are not redone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config, apply_override, validate
from pipeline.io import read_pandas
from pipeline.layout import checkpoint_dir
from stages.tasks import Task, get_task
from tapo.flows.evaluate import (
    BENCHMARKS,
    evaluate_bench,
    format_cell,
    metric_columns,
    new_plot,
    plot_pass_at_k,
    save_plot,
)
from tapo.flows.iterate import iterate, read_metrics
from tapo.flows.round import resolve_policy

VARIANTS: dict[str, list[str]] = {  # name -> config overrides over the given config
    "tapo": [],
    "grpo": ["algo.name=grpo"],
    "no_ood": ["algo.ood=off"],
    "no_dae": ["algo.dae=false"],
    "no_negative": ["algo.negative_samples=false"],
    "full_reconstruction": ["construction.mode=full_reconstruction"],
    "aug_0.3": ["algo.aug_weight=0.3"],
    "aug_0.1": ["algo.aug_weight=0.1"],
    "random_order": ["select.order=random"],
    "rule_oracle": ["locate.method=rule", "construction.method=rule"],
    "checked": ["construction.verify=checker"],
}
DOSE = {"grpo": 0.0, "aug_0.1": 0.1, "aug_0.3": 0.3, "tapo": 1.0}  # variant -> algo.aug_weight

PER_ROUND = ("round", "pass_rate", "augmented_share", "suppressed_share")  # from metrics.csv


def variant_config(cfg: Config, variant: str, seed: int) -> Config:
    """`cfg` with the variant's overrides and the seed (run.seed and train.seed)."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    data = cfg.model_dump(mode="json")
    for override in VARIANTS[variant] + [f"run.seed={seed}", f"train.seed={seed}"]:
        apply_override(data, override)
    return validate(data, source=f"variant {variant}")


def evaluated_rounds(rounds: int, eval_every: int) -> list[int]:
    """The rounds whose checkpoints are evaluated: every `eval_every`-th, and the last."""
    return sorted({*range(eval_every, rounds, eval_every), rounds} if eval_every else {rounds})


def compare(out_dir: str | Path, variants: list[str], seeds: list[int], rounds: int,
            cfg: Config, progress: bool = True, eval_every: int = 0) -> pd.DataFrame:
    """Runs, evaluates and reports (see the module docstring); returns the table of evaluated
    checkpoints."""
    out_dir = Path(out_dir)
    start = resolve_policy(out_dir, 1, cfg, build_base=True)
    rows = [{"variant": "start", "seed": None, "rounds": 0, "eval": "start",
             **evaluate_bench(start, "testbed", cfg, out_dir / "eval" / "start", progress)}]
    curves = []
    for variant in variants:
        for seed in seeds:
            vcfg = variant_config(cfg, variant, seed)
            run = out_dir / f"{variant}-s{seed}"
            iterate(run, rounds, vcfg, progress=progress)
            for r in evaluated_rounds(rounds, eval_every):
                name = run.name if r == rounds else f"{run.name}-r{r:04d}"
                rows.append({"variant": variant, "seed": seed, "rounds": r, "eval": name,
                             **evaluate_bench(checkpoint_dir(run, r), "testbed", cfg,
                                              out_dir / "eval" / name, progress)})
            curve = read_metrics(run, rounds)[list(PER_ROUND)]
            curves.append(curve.assign(variant=variant, seed=seed))
    table = pd.DataFrame(rows)
    table.to_parquet(out_dir / "compare.parquet", index=False)
    per_round = pd.concat(curves, ignore_index=True)
    per_round.to_parquet(out_dir / "per_round.parquet", index=False)
    plot_per_round(per_round, out_dir / "pass_rate_per_round.png")
    plot_heldout(table, out_dir / "heldout_per_round.png")
    final = last_checkpoints(table)
    means = final.groupby("variant", sort=False)[metric_columns(final)].mean().reset_index()
    plot_pass_at_k(means, "variant", out_dir / "pass_at_k.png")
    if len(dose := dose_response(final)) >= 2:
        plot_dose_response(dose, out_dir / "dose_response.png")
    by_difficulty = pass_at_1_by_difficulty(out_dir / "eval", final,
                                            get_task(BENCHMARKS["testbed"][1]))
    by_difficulty.to_parquet(out_dir / "by_difficulty.parquet", index=False)
    (out_dir / "report.md").write_text(
        render_report(table, per_round, by_difficulty, start, rounds, seeds, cfg))
    return table


def pass_at_1_by_difficulty(eval_dir: Path, final: pd.DataFrame, task: Task) -> pd.DataFrame:
    """Held-out pass@1 per difficulty level (`task.difficulty` of the problem) of each row of
    `final`, from its graded responses in eval_dir/<eval>/classify: columns variant, seed,
    difficulty, problems, pass@1 (every problem has the same number of samples)."""
    out = []
    for _, row in final.iterrows():
        graded = read_pandas(eval_dir / row["eval"] / "classify", columns=["problem", "label"])
        graded["difficulty"] = graded["problem"].map(task.difficulty)
        graded["correct"] = graded["label"] == "correct"
        for level, group in graded.groupby("difficulty"):
            out.append({"variant": row["variant"], "seed": row["seed"], "difficulty": level,
                        "problems": group["problem"].nunique(),
                        "pass@1": float(group["correct"].mean())})
    return pd.DataFrame(out)


def mean_std_cell(values: pd.Series) -> str:
    """`mean ± std` (sample std) of the values; the value alone when there is one."""
    values = values.dropna().astype(float)
    if values.empty:
        return "n/a"
    if len(values) == 1:
        return f"{values.iloc[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def last_checkpoints(table: pd.DataFrame) -> pd.DataFrame:
    """The start's row and each run's last evaluated checkpoint."""
    last = table.groupby("variant", sort=False)["rounds"].transform("max")
    return table[table["rounds"] == last].reset_index(drop=True)


def summary_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per variant: runs, and `mean ± std` (sample std over seeds) of every metric."""
    out = []
    for variant, group in table.groupby("variant", sort=False):
        row: dict[str, Any] = {"variant": variant, "runs": len(group)}
        for c in metric_columns(table):
            row[c] = mean_std_cell(group[c])
        out.append(row)
    return out


def render_report(table: pd.DataFrame, per_round: pd.DataFrame, by_difficulty: pd.DataFrame,
                  start: Path, rounds: int, seeds: list[int], cfg: Config) -> str:
    e = cfg.eval
    final = last_checkpoints(table)
    rows = summary_rows(final)
    cols = list(rows[0])
    lines = [
        "# TAPO vs GRPO on the testbed", "",
        f"- start checkpoint: `{start}` (every run starts here)",
        f"- rounds: {rounds} per run; seeds: {', '.join(map(str, seeds))}; "
        f"{cfg.rollout.problems_per_round} problems x G = {cfg.rollout.group_size} per round",
        f"- evaluation: the testbed held-out set, {table['problems'].iloc[0]} problems, "
        f"n = {e.n} samples at temperature {e.temperature}, top-p {e.top_p}",
        "- DSR: correct without reflecting; ERR: correct among reflecting (n/a: none reflects)",
        "", "## Held-out metrics (mean ± std over seeds)", "",
        "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
        *("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows),
        "", "![pass@k](pass_at_k.png)", "", *dose_lines(dose_response(final)),
        "## Held-out pass@1 by difficulty (number of steps; mean ± std over seeds)", "",
        *difficulty_lines(by_difficulty), "",
        "## Held-out pass@1 by round (the start at round 0; mean over seeds)", "",
        "![held-out pass@1 by round](heldout_per_round.png)", "",
        *heldout_lines(table),
        "", "## Training pass rate per round (each round's fresh problems, mean over seeds)", "",
        "![pass rate per round](pass_rate_per_round.png)", "",
    ]
    wide = per_round.groupby(["round", "variant"])["pass_rate"].mean().unstack("variant")[
        list(per_round["variant"].unique())]  # the variants in run order, not sorted
    lines += ["| round | " + " | ".join(wide.columns) + " |",
              "|" + "---|" * (len(wide.columns) + 1)]
    lines += ["| " + " | ".join([str(r)] + [format_cell(float(v)) for v in wide.loc[r]]) + " |"
              for r in wide.index]
    lines += ["", "## Augmented rows and OOD-suppressed tokens per round (mean over seeds)", "",
              "Augmented share: the round's training rows that are constructed trajectories; "
              "suppressed share: the corrective tokens of those rows the OOD mask leaves out of "
              "the loss.", "", *augmentation_lines(per_round)]
    lines += ["", "## Every run", "", "| variant | seed | rounds | "
              + " | ".join(metric_columns(table)) + " |",
              "|" + "---|" * (3 + len(metric_columns(table)))]
    for _, r in table.iterrows():
        seed = "" if pd.isna(r["seed"]) else str(int(r["seed"]))
        lines.append(f"| {r['variant']} | {seed} | {r['rounds']} | "
                     + " | ".join(format_cell(r[c]) for c in metric_columns(table)) + " |")
    return "\n".join(lines) + "\n"


def dose_response(final: pd.DataFrame) -> pd.DataFrame:
    """Held-out pass@1 (mean, std over seeds) of DOSE's variants among `final`, by
    `algo.aug_weight`: GRPO at 0, TAPO at 1."""
    runs = final[final["variant"].isin(DOSE)].assign(aug_weight=lambda t: t["variant"].map(DOSE))
    return (runs.groupby("aug_weight")["pass@1"].agg(["mean", "std", "count"]).fillna(0.0)
            .reset_index())


def dose_lines(dose: pd.DataFrame) -> list[str]:
    """The dose-response section of the report; nothing with fewer than two doses."""
    if len(dose) < 2:
        return []
    return ["## Dose-response: held-out pass@1 against `algo.aug_weight` (GRPO at 0)", "",
            "| aug_weight | pass@1 | runs |", "|---|---|---|",
            *(f"| {r.aug_weight:g} | {r.mean:.3f} ± {r.std:.3f} | {int(r.count)} |"
              for r in dose.itertuples()),
            "", "![dose-response](dose_response.png)", ""]


def plot_dose_response(dose: pd.DataFrame, path: Path) -> None:
    """Held-out pass@1 against the augmented rows' advantage weight, error bars of one std."""
    fig, ax = new_plot((4.5, 3.2))
    ax.errorbar(dose["aug_weight"], dose["mean"], yerr=dose["std"], marker="o", capsize=3,
                label="pass@1")
    save_plot(fig, ax, "algo.aug_weight (GRPO: 0)", "held-out pass@1", path)


def difficulty_lines(by_difficulty: pd.DataFrame) -> list[str]:
    """A markdown table: a row per variant (start first), a column per difficulty level."""
    levels = sorted(by_difficulty["difficulty"].unique())
    counts = by_difficulty.groupby("difficulty")["problems"].first()
    lines = ["| variant | " + " | ".join(f"{lv} ({counts[lv]} problems)" for lv in levels) + " |",
             "|" + "---|" * (len(levels) + 1)]
    for variant, group in by_difficulty.groupby("variant", sort=False):
        cells = [mean_std_cell(group.loc[group["difficulty"] == lv, "pass@1"]) for lv in levels]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def augmentation_lines(per_round: pd.DataFrame) -> list[str]:
    """A markdown table: a row per round, augmented / suppressed share per variant that
    augments (plain GRPO's rows are all its own)."""
    means = per_round.groupby(["variant", "round"], sort=False)[
        ["augmented_share", "suppressed_share"]].mean()
    variants = [v for v in per_round["variant"].unique()
                if means.loc[v, "augmented_share"].max() > 0]
    if not variants:
        return ["(no variant augmented a round)"]
    lines = ["| round | " + " | ".join(f"{v}: augmented / suppressed" for v in variants) + " |",
             "|" + "---|" * (len(variants) + 1)]
    for r in sorted(per_round["round"].unique()):
        cells = [f"{means.loc[(v, r), 'augmented_share']:.3f} / "
                 f"{means.loc[(v, r), 'suppressed_share']:.3f}" for v in variants]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


def heldout_curves(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per variant (in run order): held-out pass@1 mean and std over seeds by evaluated round,
    the start as every variant's round 0."""
    start = table[table["variant"] == "start"]
    runs = table[table["variant"] != "start"]
    return {v: pd.concat([start, group]).groupby("rounds")["pass@1"].agg(["mean", "std"])
            .fillna(0.0) for v, group in runs.groupby("variant", sort=False)}


def heldout_lines(table: pd.DataFrame) -> list[str]:
    """A markdown table: a row per evaluated round, a column per variant (mean ± std)."""
    curves = heldout_curves(table)
    lines = ["| round | " + " | ".join(curves) + " |", "|" + "---|" * (len(curves) + 1)]
    for r in sorted(set().union(*(c.index for c in curves.values()))):
        cells = [f"{c.loc[r, 'mean']:.3f} ± {c.loc[r, 'std']:.3f}" if r in c.index else ""
                 for c in curves.values()]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines


def plot_heldout(table: pd.DataFrame, path: Path) -> None:
    """Held-out pass@1 against the round of the evaluated checkpoint, a band of one std."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_plot((5.5, 3.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for variant, stats in heldout_curves(table).items():
        ax.plot(stats.index, stats["mean"], marker="o", label=variant)
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                        alpha=0.2)
    save_plot(fig, ax, "round", "held-out pass@1", path)


def plot_per_round(per_round: pd.DataFrame, path: Path) -> None:
    """Mean training pass rate per round per variant, the band one std over seeds."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = new_plot((5.5, 3.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for variant, group in per_round.groupby("variant", sort=False):
        stats = group.groupby("round")["pass_rate"].agg(["mean", "std"]).fillna(0.0)
        ax.plot(stats.index, stats["mean"], marker="o", label=variant)
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                        alpha=0.2)
    save_plot(fig, ax, "round", "pass rate (training problems)", path)

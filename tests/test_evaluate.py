"""Pass@k against hand-computed values, DSR/ERR on hand-labelled responses, `tapo eval` on a
real model (the testbed and a real math benchmark), and `tapo compare` end to end on a tiny run."""

import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.io import read_pandas
from stages.tasks.base import REFLECTION_RE
from tapo.cli import main
from tapo.flows.compare import (
    VARIANTS,
    dose_lines,
    dose_response,
    evaluated_rounds,
    heldout_curves,
    last_checkpoints,
    summary_rows,
    variant_config,
)
from tapo.flows.evaluate import ks, pass_at_k, response_metrics
from tests.browser import render
from tests.conftest import SMALL_CONFIG


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (4, 1, 1, 0.25), (4, 1, 2, 0.5), (5, 2, 2, 1 - 3 / 10), (8, 3, 4, 1 - 5 / 70),
    (4, 0, 4, 0.0), (4, 1, 4, 1.0), (3, 3, 3, 1.0),  # n = k: solved iff any sample is
    (6, 6, 1, 1.0), (6, 0, 1, 0.0), (6, 0, 6, 0.0),  # all correct / all wrong
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_ks_are_powers_of_two_up_to_n():
    assert ks(1) == [1] and ks(8) == [1, 2, 4, 8] and ks(6) == [1, 2, 4, 6]


HAND_LABELLED = [  # problem, label, response; whether it reflects is in the text
    ("p1", "correct", "1 + 1 = 2\n\\boxed{2}"),
    ("p1", "correct", "1 + 1 = 3\nWait, step 1 is wrong: 1 + 1 = 2, not 3.\n\\boxed{2}"),
    ("p2", "incorrect", "<analysis>step 1</analysis>\n\\boxed{7}"),
    ("p2", "incorrect", "2 * 3 = 5\n\\boxed{5}"),
    ("p3", "correct", "Wait, step 1 is wrong: it should be 4.\n\\boxed{4}"),
    ("p3", "no_answer", "wait, step 1 is wrong"),  # lower case: not the marker
]


def _responses():
    return pd.DataFrame([{"problem_id": p, "label": lab, "response": r, "response_len": len(r)}
                         for p, lab, r in HAND_LABELLED])


def test_dsr_err_and_reflection_on_hand_labelled_responses():
    m = response_metrics(_responses(), REFLECTION_RE.pattern)
    assert (m["problems"], m["responses"], m["samples"]) == (3, 6, 2)
    assert m["pass@1"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    assert m["dsr"] == pytest.approx(1 / 6)  # only p1's first is correct without reflecting
    assert m["reflection_rate"] == pytest.approx(3 / 6)
    assert m["err"] == pytest.approx(2 / 3)  # of the 3 reflecting, 2 end correct
    assert m["mean_length"] == pytest.approx(sum(len(r) for *_, r in HAND_LABELLED) / 6)
    none = response_metrics(_responses(), r"NEVER")  # the detector is configurable
    assert none["err"] is None and none["reflection_rate"] == 0.0
    assert none["dsr"] == pytest.approx(3 / 6)


def test_eval_on_the_testbed_and_a_math_benchmark(small_base, tmp_path, capsys):
    base = small_base().testbed.base_dir
    out = tmp_path / "eval"
    overrides = [f"testbed.base_dir={base}", "engine.backend=hf", "eval.n=4",
                 "eval.max_problems=6", "eval.max_tokens=48"]
    assert main(["eval", "--model", f"{base}/model", "--bench", "testbed,aime24", "--out",
                 str(out), "--config", str(SMALL_CONFIG), *overrides]) == 0
    table = pd.read_parquet(out / "metrics.parquet")
    assert list(table["bench"]) == ["testbed", "aime24"]
    assert (table["responses"] == 24).all() and (table["samples"] == 4).all()
    assert {"pass@1", "pass@2", "pass@4", "dsr", "err", "mean_length"} <= set(table.columns)
    assert (table["pass@1"] <= table["pass@2"]).all() and (table["pass@2"] <= table["pass@4"]).all()
    graded = read_pandas(out / "aime24" / "classify")  # graded by math-verify, kept whole
    assert len(graded) == 24 and set(graded["label"]) <= {"correct", "incorrect", "no_answer"}
    assert (out / "pass_at_k.png").stat().st_size > 1000
    assert "| testbed | 6 | 4 |" in (out / "results.md").read_text()
    assert "| aime24 |" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "missing"), "--bench", "testbed"]) == 1
    assert main(["eval", "--model", f"{base}/model", "--bench", "nope", "--out", str(out),
                 "--config", str(SMALL_CONFIG), *overrides]) == 1


def test_variants_and_seeds_change_only_what_they_name():
    cfg = load_config(SMALL_CONFIG)
    grpo = variant_config(cfg, "grpo", 2)
    assert (grpo.algo.name, grpo.run.seed, grpo.train.seed) == ("grpo", 2, 2)
    assert grpo.rollout == cfg.rollout and grpo.select == cfg.select
    assert variant_config(cfg, "no_ood", 0).algo.ood == "off"
    assert set(VARIANTS) >= {"tapo", "grpo", "no_ood", "no_dae", "no_negative",
                             "full_reconstruction"}
    assert variant_config(cfg, "aug_0.3", 0).algo.aug_weight == 0.3
    assert variant_config(cfg, "random_order", 0).select.order == "random"
    oracle = variant_config(cfg, "rule_oracle", 0)
    assert (oracle.locate.method, oracle.construction.method) == ("rule", "rule")
    checked = variant_config(cfg, "checked", 0).construction
    assert (checked.verify, checked.method) == ("checker", cfg.construction.method)
    with pytest.raises(KeyError):
        variant_config(cfg, "nope", 0)


def test_dose_response_is_pass_at_1_by_augmented_weight():
    final = pd.DataFrame({"variant": ["start", "grpo", "grpo", "aug_0.3", "tapo", "tapo",
                                      "no_ood"],
                          "pass@1": [0.1, 0.4, 0.6, 0.45, 0.3, 0.2, 0.9]})
    dose = dose_response(final)
    assert list(dose["aug_weight"]) == [0.0, 0.3, 1.0]
    assert list(dose["mean"]) == pytest.approx([0.5, 0.45, 0.25])
    assert list(dose["count"]) == [2, 1, 2] and dose["std"].iloc[1] == 0.0
    lines = dose_lines(dose)
    assert "| 0.3 | 0.450 ± 0.000 | 1 |" in lines and "![dose-response](dose_response.png)" in lines
    assert dose_lines(dose.head(1)) == []


def test_summary_is_mean_and_sample_std_over_seeds():
    table = pd.DataFrame({"variant": ["a", "a", "b"], "pass@1": [0.2, 0.4, 0.5],
                          "dsr": [0.1, 0.3, 0.5], "err": [None, None, 0.5],
                          "reflection_rate": [0.0, 0.0, 0.1], "mean_length": [10.0, 12.0, 9.0]})
    a, b = summary_rows(table)
    assert a["pass@1"] == f"0.300 ± {math.sqrt(0.02):.3f}" and a["err"] == "n/a"
    assert b["pass@1"] == "0.500" and b["runs"] == 1


def test_learning_curve_rounds_and_means():
    assert evaluated_rounds(10, 0) == [10] and evaluated_rounds(10, 5) == [5, 10]
    assert evaluated_rounds(10, 4) == [4, 8, 10] and evaluated_rounds(3, 5) == [3]
    table = pd.DataFrame({"variant": ["start", "a", "a", "a", "a", "b"],
                          "seed": [None, 0, 0, 1, 1, 0], "rounds": [0, 5, 10, 5, 10, 10],
                          "pass@1": [0.2, 0.3, 0.4, 0.5, 0.6, 0.1]})
    a, b = heldout_curves(table).values()
    assert list(a.index) == [0, 5, 10] and list(b.index) == [0, 10]
    assert a.loc[5, "mean"] == pytest.approx(0.4) and a.loc[0, "std"] == 0.0
    assert a.loc[10, "std"] == pytest.approx(math.sqrt(0.02))
    assert list(last_checkpoints(table)["rounds"]) == [0, 10, 10, 10]


def test_compare_report_builds_from_a_tiny_run(small_base, tmp_path):
    base = small_base().testbed.base_dir
    out = tmp_path / "cmp"
    overrides = [f"testbed.base_dir={base}", "engine.backend=hf",
                 f"policy.coldstart={tmp_path / 'none'}", "eval.n=2", "eval.max_problems=10",
                 "rollout.problems_per_round=8", "train.mini_batch_size=16"]
    assert main(["compare", str(out), "--rounds", "2", "--seeds", "2", "--variants",
                 "tapo,grpo", "--eval-every", "1", "--config", str(SMALL_CONFIG),
                 *overrides]) == 0
    table = pd.read_parquet(out / "compare.parquet")
    assert list(table["variant"]) == ["start"] + ["tapo"] * 4 + ["grpo"] * 4
    assert list(table["rounds"]) == [0] + [1, 2] * 4 and (table["problems"] == 10).all()
    assert table["model"].iloc[1].endswith("tapo-s0/models/iter_0001")
    per_round = pd.read_parquet(out / "per_round.parquet")
    assert len(per_round) == 8 and set(per_round["variant"]) == {"tapo", "grpo"}
    for run in ("tapo-s0", "tapo-s1", "grpo-s0", "grpo-s1"):
        assert (out / run / "models" / "iter_0002" / "_SUCCESS").exists()
    assert (out / "tapo-s0" / "iter_0001" / "construct").exists()
    assert not (out / "grpo-s0" / "iter_0001" / "construct").exists()
    report = (out / "report.md").read_text()
    assert "| tapo | 2 |" in report and "| grpo | 2 |" in report and "±" in report
    assert "| start | 1 |" in report and "| 2 |" in report  # the per-round table has round 2
    held_out = report.split("## Held-out pass@1 by round")[1].split("## Training")[0]
    assert [line.split(" |")[0] for line in held_out.splitlines() if line[:3] in
            ("| 0", "| 1", "| 2")] == ["| 0", "| 1", "| 2"]
    assert "| 0 | " in report.split("## Dose-response")[1].split("##")[0]  # grpo: weight 0
    for png in ("pass_rate_per_round.png", "heldout_per_round.png", "pass_at_k.png",
                "dose_response.png"):
        assert (out / png).stat().st_size > 1000
    # pass@1 by number of steps: every held-out problem in one level, and the levels'
    # problem-weighted mean is each checkpoint's pass@1
    levels = pd.read_parquet(out / "by_difficulty.parquet")
    assert set(levels["difficulty"]) <= {1, 2} and len(levels["difficulty"].unique()) > 1
    final = last_checkpoints(table)
    for (variant, seed), group in levels.groupby(["variant", "seed"], dropna=False):
        assert group["problems"].sum() == 10
        [row] = [r for _, r in final.iterrows() if r["variant"] == variant
                 and (pd.isna(seed) and pd.isna(r["seed"]) or r["seed"] == seed)]
        weighted = (group["pass@1"] * group["problems"]).sum() / 10
        assert weighted == pytest.approx(row["pass@1"])
    by_steps = report.split("## Held-out pass@1 by difficulty")[1].split("##")[0]
    assert "| start |" in by_steps and "| tapo |" in by_steps and "problems)" in by_steps
    per_round_table = report.split("## Training pass rate")[1].split("##")[0]
    assert "| round | tapo | grpo |" in per_round_table  # run order, not sorted
    augmented = report.split("## Augmented rows")[1].split("##")[0]
    assert "tapo: augmented / suppressed" in augmented and "grpo:" not in augmented
    assert per_round.loc[per_round["variant"] == "grpo", "augmented_share"].eq(0).all()

    # its page: the tables, the two compare plots, then each run's own section
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    # per run: its section, round 1's funnel (closed) and round 2's (open)
    assert page.count("<details><summary>") == 4 + 4 and page.count("<details open>") == 4
    assert page.count("<svg") == 3 + 4 and "± " in page
    assert render(out / "report.html", tmp_path / "cmp.png", tmp_path / "profile") == []


def test_make_targets_pass_overrides_and_require_a_model():
    root = Path(__file__).resolve().parent.parent
    dry = subprocess.run(["make", "-n", "compare", "N=2", "ARGS=engine.backend=hf eval.n=2"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    [command] = [line for line in dry.splitlines() if "tapo compare" in line]
    assert "--rounds 2" in command and command.endswith("engine.backend=hf eval.n=2")
    missing = subprocess.run(["make", "eval"], cwd=root, capture_output=True, text=True)
    assert missing.returncode != 0 and "give MODEL=PATH" in missing.stderr


def test_math_prompt_keeps_the_boxed_instruction():
    from stages.tasks import task_of

    cfg = load_config(None, ["task.name=math"])
    prompt = task_of(cfg).prompt("Find $f(x)$ where {x} = 2.")
    assert prompt == "Find $f(x)$ where {x} = 2.\nPlease reason step by step, and put your final " \
                     "answer within \\boxed{}.\n"


def test_a_model_retrained_at_the_same_path_is_sampled_again(small_base, tmp_path):
    import os
    import shutil

    from pipeline.problems import write_problems
    from pipeline.runner import run_stage
    from stages.sample import Sample
    from tapo.flows.evaluate import bench_config

    cfg = small_base("eval.n=2", "eval.max_tokens=8")
    model = tmp_path / "model"
    shutil.copytree(f"{cfg.testbed.base_dir}/model", model)
    bcfg = bench_config(cfg, model, "testbed")
    write_problems(Path(cfg.testbed.base_dir) / "data" / "heldout.parquet",
                   tmp_path / "problems", 0, 4, 0, 4)
    first = run_stage(Sample, bcfg, tmp_path / "problems", tmp_path / "sample", progress=False)
    again = run_stage(Sample, bcfg, tmp_path / "problems", tmp_path / "sample", progress=False)
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    retrained = run_stage(Sample, bcfg, tmp_path / "problems", tmp_path / "sample",
                          progress=False)
    assert (first.skipped, again.skipped, retrained.skipped) == (False, True, False)

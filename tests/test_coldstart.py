"""The cold start: its two stages on hand-built rows, the SFT on real shards, and the whole
`tapo coldstart` on the small testbed (real model, real grading, real SFT), whose cold-start
model must reflect on held-out wrong prefixes where the base does not."""

import json

import pandas as pd
import pytest
import torch

from pipeline.config import load_config
from pipeline.io import part_name, read_pandas, write_table_atomic
from pipeline.problems import load_problems
from stages import schema
from stages.coldstart_select import ColdstartSelect
from stages.common import load_tokenizer, policy_path
from stages.sft_examples import SftExamples, direct_example, if_example, sft_example
from stages.tasks.base import reflects
from stages.tasks.prompts import CONSTRUCT_INSTRUCTION
from tapo.cli import main
from tapo.flows.round import resolve_policy
from tests.conftest import SMALL_CONFIG
from tests.test_stages import reasons, rollout
from trainer.sft import train_sft


def _classified(pid, labels):
    return [{**rollout(pid, k, f"response {pid} {k}", label=label), "response_len": 10 + k}
            for k, label in enumerate(labels)]


def test_coldstart_select_one_per_problem_with_a_wrong_response():
    stage = ColdstartSelect(load_config())
    stage.side["problems"] = [{"problem_id": "nosol"}, {"problem_id": "wrong_only",
                                                       "solution": "the worked solution"}]
    rows = (_classified("mixed", ["correct", "incorrect", "no_answer", "correct"])
            + _classified("all_right", ["correct", "correct"])
            + _classified("wrong_only", ["incorrect", "incorrect"])
            + _classified("nosol", ["incorrect"])
            + _classified("unknown", ["timeout", "correct"]))
    out = stage.process(rows)
    kept = {r["problem_id"]: r for r in out.rows}
    assert set(kept) == {"mixed", "wrong_only"}
    assert kept["mixed"]["wrong_rollout_id"] == "mixed/1"  # incorrect before no_answer
    assert kept["mixed"]["reference_rollout_id"] == "mixed/0"  # the shortest correct one
    assert kept["wrong_only"]["reference_rollout_id"] == "solution"
    assert kept["wrong_only"]["reference_response"] == "the worked solution"
    assert kept["wrong_only"]["wrong_rollout_id"] == "wrong_only/1"  # the longest
    assert {d["problem_id"]: d["reason"] for d in out.dropped} == {
        "all_right": "no_wrong_response", "nosol": "no_reference",
        "unknown": "no_repairable_response"}


def _trajectory(i, diagnosis="Wait, step 2 is wrong: 65 - 29 = 36, not 38.\n"):
    return {"trajectory_id": f"p{i}/1/tapo", "problem_id": f"p{i}", "problem": "P", "answer": "1",
            "prompt": "Q: P\nA:\n", "source_rollout_id": f"p{i}/1", "reference_rollout_id": "",
            "mode": "prefix", "constructor": "rule", "failure_step": 2,
            "prefix": f"{i} + 1 = 2\n65 - 29 = 38\n", "diagnosis": diagnosis,
            "correction": "65 - 29 = 36\n\\boxed{36}", "response": "", "prefix_token_ids": []}


def test_sft_examples_formats_mixture_and_accounting(small_base):
    cfg = small_base("coldstart.size=9")
    stage = SftExamples(cfg)
    trajectories = [_trajectory(i) for i in range(8)]
    trajectories.append({**_trajectory(0), "trajectory_id": "p0/2/tapo"})  # a repeat of p0/1
    trajectories.append({**_trajectory(8, diagnosis=""), "mode": "full_reconstruction"})
    stage.side["located"] = [  # even problems have a correct rollout as reference
        {"wrong_rollout_id": f"p{i}/1", "wrong_response": f"a{i}\nb\nc",
         "reference_rollout_id": f"p{i}/0" if i % 2 == 0 else "solution",
         "reference_response": f"ref {i}"} for i in range(9)]
    out = stage.process(trajectories)
    kept = pd.Series([r["source"] for r in out.rows]).value_counts().to_dict()
    # size 9: 6 for SFT (half of them direct), 3 for IF
    assert kept == {"sft": 3, "direct": 3, "if": 3}
    # every example is kept or dropped with its reason: 10 sft, 6 direct (even p and the
    # repeat), 10 if
    assert len(out.rows) + len(out.dropped) == 10 + 6 + 10
    assert reasons(out).count("duplicate") == 3 and reasons(out).count("no_analysis") == 1
    assert reasons(out).count("over_quota") == (9 - 3) + (5 - 3) + (8 - 3)
    again = SftExamples(cfg)
    again.side = stage.side
    assert again.process(list(reversed(trajectories))).rows == out.rows  # seeded, order-free
    # the control without reflection or IF: the base's own correct responses only
    direct_only = SftExamples(small_base("coldstart.size=9", "coldstart.if_ratio=0",
                                         "coldstart.direct_share=1"))
    direct_only.side = stage.side
    control = direct_only.process(trajectories)
    assert [r["source"] for r in control.rows] == ["direct"] * 5  # 5 even problems
    assert len(control.rows) + len(control.dropped) == 10 + 6 + 10


def test_the_three_example_formats(small_base):
    tok = load_tokenizer(str(policy_path(small_base())))
    t = _trajectory(3)
    located = {"wrong_response": "a\nb\nc", "reference_rollout_id": "p3/0",
               "reference_response": "ref"}
    sft = sft_example(t)
    assert sft["prompt"] == "Q: P\nA:\n3 + 1 = 2\n65 - 29 = 38\n"  # the prefix is context
    assert sft["response"] == "Wait, step 2 is wrong: 65 - 29 = 36, not 38.\n65 - 29 = 36\n" \
                              "\\boxed{36}"
    direct = direct_example(located, t)
    assert (direct["prompt"], direct["response"], direct["example_id"]) == (
        "Q: P\nA:\n", "ref", "p3/0/direct")
    task = if_example(located, t, tok)
    assert task["prompt"].startswith(CONSTRUCT_INSTRUCTION[:40]) and "[3] c" in task["prompt"]
    assert task["prompt"].endswith("</reconstruction>\n")  # no chat template: text + newline
    assert task["response"] == ("<analysis>65 - 29 = 36, not 38.</analysis>\n"
                                "<reconstruction>65 - 29 = 36\n\\boxed{36}</reconstruction>")


def test_if_prompt_is_exactly_what_construction_sends(small_base):
    """The IF examples teach the prompt the policy reads in self-construction: the rendered
    prompt that construct's llm path hands the engine, character for character."""
    from pipeline.engines import render_prompt
    from stages.construct import Construct
    from tests.test_stages import PROBLEM, ReplayEngine, _located

    cfg = small_base("construction.method=llm")
    tok = load_tokenizer(str(policy_path(cfg)))
    located = _located(tok, "48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}", cfg)
    answer = ("<analysis>65 - 29 is 36, not 38.</analysis>\n<reconstruction>65 - 29 = 36\n"
              f"36 * 3 = 108\n\\boxed{{{PROBLEM.answer}}}</reconstruction>")
    stage = Construct(cfg)
    replay = ReplayEngine([answer])
    stage.engine.set(replay)
    (trajectory,) = stage.process([located]).rows
    stage.close()
    example = if_example(located, trajectory, tok)
    assert example["prompt"] == render_prompt(replay.prompts[0], tok)


def test_sft_counts_examples_too_long_for_the_context(small_base, tmp_path):
    cfg = small_base("coldstart.epochs=1", "coldstart.batch_size=2")
    examples = pd.DataFrame({"example_id": ["a/sft", "b/sft"], "source": "sft",
                             "problem_id": ["a", "b"], "prompt": ["Q: 1 + 1\nA:\n", "9 " * 2000],
                             "response": ["\\boxed{2}", "x"]})
    write_table_atomic(examples, tmp_path / "ex" / part_name(0), schema=schema.SFT_EXAMPLES)
    base = resolve_policy(tmp_path, 1, cfg)
    metrics = train_sft(base, tmp_path / "ex", tmp_path / "model", cfg, progress=False)
    assert (metrics["examples"], metrics["too_long"], metrics["steps"]) == (1, 1, 1)
    assert json.loads((tmp_path / "model" / "_SUCCESS").read_text())["metrics"] == metrics
    # the SFT continues the base's pretraining Adam moments and leaves them for RL
    steps = [{int(s["step"]) for s in torch.load(d / "optimizer.pt")["state"].values()}
             for d in (base, tmp_path / "model")]
    assert steps[1] == {next(iter(steps[0])) + 1} and len(steps[0]) == 1
    assert not (tmp_path / ".model.tmp").exists()
    (tmp_path / "ex2").mkdir()
    write_table_atomic(examples.iloc[1:], tmp_path / "ex2" / part_name(0),
                       schema=schema.SFT_EXAMPLES)
    with pytest.raises(ValueError, match="no example fits"):
        train_sft(base, tmp_path / "ex2", tmp_path / "model2", cfg, progress=False)


def test_load_problems_reads_the_bundled_jsonl():
    table, rejected = load_problems("data/aime2024.jsonl")
    assert rejected == [] and len(table) == 30 and table["problem_id"].is_unique
    assert {"problem", "answer", "solution"} <= set(table.columns)


@pytest.mark.slow  # about 50 s
def test_coldstart_end_to_end_on_the_small_testbed(small_base, tmp_path, capsys):
    run = tmp_path / "coldstart"
    cfg = small_base()
    # lr 0.006: the diagnoses' wording ("6 + 8 is 14, not 15.") is new to the small base, and
    # six epochs at 0.003 leave its reflection rate at 0.04
    overrides = [f"testbed.base_dir={cfg.testbed.base_dir}", "engine.backend=hf",
                 f"policy.coldstart={run / 'model'}", "coldstart.size=300",
                 "coldstart.lr=0.006", "coldstart.epochs=6"]
    assert main(["coldstart", "--config", str(SMALL_CONFIG), *overrides]) == 0
    summary = json.loads((run / "coldstart.json").read_text())
    printed = capsys.readouterr().out
    assert "reflection rate on" in printed and "sft examples: kept" in printed

    examples = pd.read_parquet(run / "examples" / "part-00000.parquet")  # what train_sft reads
    assert examples["example_id"].is_unique and examples["response"].str.len().min() > 0
    counts = examples["source"].value_counts()
    n_sft, n_if = counts["sft"] + counts["direct"], counts["if"]
    assert n_if == n_sft // 2 and n_sft + n_if <= 300  # 2 : 1
    assert summary["examples"]["sft"]["kept"] == counts["sft"]
    assert summary["candidates"] <= summary["problems"] == 200
    assert summary["constructed"] == len(read_pandas(run / "construct"))
    assert summary["sft"]["examples"] == len(examples) and summary["sft"]["loss_last"] < 2.0

    # the point of the SFT: the cold-start model reflects after a wrong step, the base does not
    rate = summary["probe"]["reflection_rate"]
    assert summary["probe"]["prefixes"] >= 20
    assert rate["coldstart"] >= rate["base"] + 0.4, rate  # measured: 0.00 -> 0.70
    reflective = examples[examples["source"] != "direct"]["response"]
    assert reflective.map(reflects).all()

    # `make iterate` starts from it; a second `make coldstart` is a no-op
    cfg = load_config(SMALL_CONFIG, overrides)
    assert resolve_policy(tmp_path / "rl", 1, cfg) == run / "model"
    stamp = (run / "model" / "_SUCCESS").stat().st_mtime
    assert main(["coldstart", "--config", str(SMALL_CONFIG), *overrides]) == 0
    assert (run / "model" / "_SUCCESS").stat().st_mtime == stamp

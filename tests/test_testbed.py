import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.gradient_split import split_gradients
from bench.reflection_timing import reflection_timing
from pipeline.config import load_config
from pipeline.engines.base import Completion, SamplingParams
from pipeline.engines.hf import HFEngine
from pipeline.io import read_pandas
from pipeline.util import read_json, weights_sha256
from stages.tasks import arith
from testbed.base import (
    SHIPPED_BASE,
    add_judge_tokens,
    base_fingerprint,
    build_base,
    compare_bases,
    corpus_counts,
    judge_examples,
    judge_tokens,
    measure_base,
    measure_judges,
    pretrain_solutions,
    rebuild_base,
    shipped_base,
)
from tests.conftest import SMALL_CONFIG
from trainer.objective import loss_mask
from trainer.rl import _update, build_batch, mini_batches, objective_config, old_logprobs

MEASURE_ONE_THREAD = """
import json, sys
import pandas as pd, torch
torch.set_num_threads(1)
from pipeline.engines.hf import HFEngine
from testbed.base import measure_base
base = sys.argv[1]
heldout = pd.read_parquet(f"{base}/data/heldout.parquet")
print(json.dumps(measure_base(HFEngine(f"{base}/model", batch_size=200), heldout)))
"""
TINY = [
    "testbed.n_pretrain=300", "testbed.n_train=50", "testbed.n_heldout=20",
    "testbed.hidden_size=32", "testbed.num_layers=1", "testbed.num_heads=1",
    "testbed.steps=3", "testbed.batch_size=8", "testbed.max_extra_steps=0",
    "testbed.judge_share=0.1", "testbed.judge_steps=2",
]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    cfg = load_config(None, TINY).testbed
    base = tmp_path_factory.mktemp("base")
    return cfg, base, build_base(cfg, base)


def test_tiny_build_writes_splits_model_and_manifest(tiny_base):
    cfg, base, model_dir = tiny_base
    splits = {s: pd.read_parquet(base / "data" / f"{s}.parquet") for s in
              ("pretrain", "train", "heldout")}
    assert [len(splits[s]) for s in ("pretrain", "train", "heldout")] == [300, 50, 20]
    ids = [set(df["problem_id"]) for df in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for df in splits.values():
        for row in df.itertuples():  # every reference solution checks and grades correct
            p = arith.parse_problem(row.problem)
            assert arith.first_wrong_step(p, row.solution) is None
            assert arith.grade(row.solution, row.answer)[0] == "correct"
    build = json.loads((base / "build.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert build["parameters"] == sum(p.numel() for p in model.parameters())
    v, h, i = model.config.vocab_size, 32, model.config.intermediate_size  # (one layer)
    assert build["parameters"] == v * h + (4 * h * h + 3 * h) + 3 * h * i + 3 * h == 28864
    # tied embeddings (the judges' tokens grow them to 384 rows) + q, k, v (with biases), o +
    # gate, up, down + two norms and the final one
    assert build["vocab"] == len(AutoTokenizer.from_pretrained(model_dir)) > 320 and "<step>" in \
        build["judge_tokens"]
    assert build["loss_last"] > 0
    assert (base / "_SUCCESS").exists()
    assert _moment_steps(model_dir) == {3 + 2}  # the Adam moments of the last step (of 3 + the
    # judge phase's 2)
    assert _moment_betas(model_dir) == (0.9, 0.95)  # those pretraining accumulated them under
    corpus = build["pretrain_solutions"]  # the default corpus: misreadings, a few corrected
    assert sum(corpus.values()) == 300 and corpus["misread"] > 0, corpus
    assert build["judge_examples"]["locate"] > 0, build["judge_examples"]  # and judge examples
    judges = build["judges"]  # the base as its own judge on held-out errors
    assert 0 <= judges["locate_exact"] <= 1 and 0 <= judges["construct_correct"] <= 1
    assert {"construct_tagged", "construct_first_line", "construct_diagnosis"} <= set(judges)
    assert judges["problems"] == 20 and set(judges["locate_exact_by_kind"]) <= set(
        arith.ERROR_KINDS)
    solver = read_json(base.with_name(base.name + "-solver") / "build.json")  # the base before
    assert build["solver"]["weights_sha256"] == solver["weights_sha256"] != build[
        "weights_sha256"] and "greedy_accuracy" in build["solver"]["heldout"]


def test_judge_examples_are_what_the_stages_ask_answered_as_the_checker_does():
    """The pretraining corpus's locate and construct examples: the stages' own prompts (a model
    without a chat template), answered so that the stages' parsers read the exact checker's
    failure step and a trajectory that grades correct, with the diagnosis of its error kind."""
    from stages.common import instruction_prompt
    from stages.construct import check_exactly, llm_trajectory
    from stages.locate import parse_located_step
    from stages.tasks.base import split_steps
    from stages.tasks.prompts import construct_instruction, locate_instruction

    cfg = load_config(None, ["testbed.judge_share=0.5"]).testbed
    problems = arith.generate_split("pretrain", 400, 0, cfg.arith)
    examples = judge_examples(problems, cfg)
    assert examples == judge_examples(problems, cfg)  # seeded
    kinds = {k: sum(e["kind"] == k for e in examples) for k in
             ("locate", "construct", "construct_full")}
    assert 160 < kinds["locate"] < 240 and kinds["locate"] == kinds["construct"] + kinds[
        "construct_full"] and kinds["construct_full"] > 20, kinds
    task, errors, caught = arith.ArithTask(), set(), 0
    for e in examples:
        p = arith.parse_problem(e["problem"])
        steps, reference = split_steps(e["wrong"]), split_steps(p.solution())
        error = arith.first_wrong_step(p, e["wrong"])
        assert arith.grade(e["wrong"], str(p.answer))[0] != "correct" or error is not None
        k = task.locate_failure(e["problem"], e["wrong"])[0]
        caught += arith.REFLECTION_PREFIX in e["wrong"]
        if e["kind"] == "locate":
            assert e["prompt"] == instruction_prompt(
                locate_instruction(e["problem"], steps, reference), tokenizer=None)
            assert parse_located_step(e["answer"], steps)[0] == k
            continue
        mode = "full_reconstruction" if e["kind"] == "construct_full" else "prefix"
        assert e["prompt"] == instruction_prompt(
            construct_instruction(k, e["problem"], steps, reference, mode), tokenizer=None)
        row = {"problem": e["problem"], "wrong_response": e["wrong"],
               "prefix_chars": steps[k - 1].line_end, "failure_step": k}
        parts = llm_trajectory(row, e["answer"], mode != "prefix", task)
        assert arith.grade("".join(parts), str(p.answer))[0] == "correct"
        assert check_exactly(task, row, parts, mode != "prefix") is None  # steps and diagnosis
        kind = arith.error_kind(p, error.found, error.expected)
        errors.add(kind)
        assert arith.diagnosis(p, error.chain_step, error.found, error.expected) in e["answer"]
    assert errors == {"misread", "slip", "copy"} and caught > 20


def test_judge_tokens_shorten_the_judges_prompts_and_leave_the_solver_as_it_was(tmp_path):
    """The judge phase's tokens (the tags and the instructions' words the solver never read)
    on the shipped base: the solver's text tokenizes and scores as before, the judges' prompts
    and answers decode exactly in under 65% of the tokens, each new row starts as the mean of
    the rows that spelled it, and the Adam moments grow to the new embedding."""
    cfg = load_config(None, ["testbed.judge_share=1.0"]).testbed
    model_dir = SHIPPED_BASE / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    problems = arith.generate_split("pretrain", 2000, 0, cfg.arith)
    solver = [arith.PROMPT_TEMPLATE.format(problem=p.text) + t
              for p, t in zip(problems, pretrain_solutions(problems, cfg))]
    judges = judge_examples(arith.generate_split("heldout", 40, 0, cfg.arith), cfg)
    before = [tok(t)["input_ids"] for t in solver]
    judge_before = [len(tok(e["prompt"] + e["answer"])["input_ids"]) for e in judges]
    ids = torch.tensor([before[0]])
    with torch.no_grad():
        logits = model(ids).logits[0, :, :len(tok)]
    tokens = judge_tokens(tok, solver)
    assert {"<step>", "</step>", "<analysis>", "</reconstruction>", " student"} <= set(tokens)
    assert not {" left", " right", " to", " wrong", "Wait", "boxed"} & set(tokens)  # the solver's
    spelled = tok(" student", add_special_tokens=False)["input_ids"]
    moments = tmp_path / "optimizer.pt"
    shutil.copy(model_dir / "optimizer.pt", moments)
    old_padding = model.get_input_embeddings().weight[302:].detach().mean(0)
    add_judge_tokens(model, tok, tokens, moments)
    assert len(tok) == 302 + len(tokens) and model.get_input_embeddings().weight.shape[0] == 384
    assert torch.equal(model.get_input_embeddings().weight[len(tok):],
                       old_padding.expand(384 - len(tok), -1))  # padding: never a target
    assert [tok(t)["input_ids"] for t in solver] == before
    with torch.no_grad():
        assert torch.allclose(model(ids).logits[0, :, :len(logits[0])], logits)
        weight = model.get_input_embeddings().weight
        assert torch.equal(weight[tok.convert_tokens_to_ids(" student")], weight[spelled].mean(0))
    after = []
    for e in judges:
        encoded = tok(e["prompt"] + e["answer"])["input_ids"]
        assert tok.decode(encoded) == e["prompt"] + e["answer"]
        after.append(len(encoded))
    assert sum(after) < 0.65 * sum(judge_before), (sum(after), sum(judge_before))
    opt = torch.optim.AdamW(model.parameters())
    opt.load_state_dict(torch.load(moments))  # every moment has its parameter's shape
    assert all(opt.state[p]["exp_avg_sq"].shape == p.shape for p in model.parameters())
    old = torch.load(model_dir / "optimizer.pt")["state"][0]  # the embedding's, grown by zeros
    grown = opt.state[model.get_input_embeddings().weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(grown[key][:320], old[key]) and not grown[key][320:].any()


def test_bench_judges_row_of_the_tiny_base(tiny_base):
    from bench.judges import judge_row

    cfg, _, model_dir = tiny_base
    row = judge_row(model_dir, cfg)
    assert row["model"] == str(model_dir) and row["problems"] == 20
    assert all(0 <= v <= 1 for k, v in row.items() if k not in ("model", "split", "problems"))
    assert {"locate_exact", "construct_correct", "construct_first_line"} <= set(row)
    train = judge_row(model_dir, cfg, "train")  # the judge phase's examples of 200 problems
    first = arith.generate_split("pretrain", cfg.n_pretrain, cfg.seed, cfg.arith)[:200]
    assert (row["split"], train["split"]) == ("heldout", "train")
    assert train["problems"] == sum(e["kind"] == "locate" for e in judge_examples(first, cfg)) > 0
    with pytest.raises(ValueError, match="judge_share"):
        judge_row(model_dir, cfg.model_copy(update={"judge_share": 0.0}), "train")


class Answering:
    """An engine that answers each prompt with `answer(prompt)` (a judge that is always right,
    or one that is always wrong), to score measure_judges's scoring."""

    def __init__(self, answer):
        self.answer = answer

    def generate(self, prompts, n, params):
        return [[Completion(self.answer(p), [], "stop")] for p in prompts]


def test_measure_judges_scores_the_checkers_answers_right_and_others_wrong():
    cfg = load_config(None, []).testbed
    problems = arith.generate_split("heldout", 30, 0, cfg.arith)
    expected = {e["prompt"]: e["answer"] for e in judge_examples(
        problems, cfg.model_copy(update={"judge_share": 1.0}))}
    right = measure_judges(Answering(expected.get), problems, cfg)
    assert right["locate_exact"] == 1 and set(right["locate_exact_by_kind"].values()) == {1.0}
    assert all(right[f"construct_{k}"] == 1 for k in ("tagged", "correct", "first_line",
                                                       "diagnosis")), right
    shifted = measure_judges(Answering(lambda p: expected[p].replace("<step>1<", "<step>2<")
                                       .replace("\\boxed{", "\\boxed{1")), problems, cfg)
    assert 0 < shifted["locate_exact"] < 1 and shifted["construct_correct"] < 0.2
    assert shifted["construct_tagged"] == shifted["construct_diagnosis"] == 1
    assert shifted["construct_first_line"] > 0.9  # (the answer line moved, not the first)
    reworded = measure_judges(Answering(lambda p: expected[p].replace(
        "<analysis>", "<analysis>so ").replace("<reconstruction>", "<reconstruction>1 + 1 = 2\n")),
        problems, cfg)
    assert reworded["construct_diagnosis"] == reworded["construct_first_line"] == 0
    assert reworded["construct_tagged"] == 1
    untagged = measure_judges(Answering(lambda p: "step 1"), problems, cfg)
    assert untagged["locate_exact"] == untagged["construct_tagged"] == 0
    # at the config's share, on the first pretraining problems: the judge phase's own examples
    pretrain = arith.generate_split("pretrain", 3000, 0, cfg.arith)
    judged = cfg.model_copy(update={"judge_share": 0.06})
    trained = {e["prompt"]: e["answer"] for e in judge_examples(pretrain, judged)}
    first = measure_judges(Answering(trained.get), pretrain[:1000], judged, share=0.06)
    assert first["locate_exact"] == first["construct_diagnosis"] == 1
    assert 30 < first["problems"] < 100  # (about 0.06 of 1000)


def test_pretrain_solutions_mix_misreadings_and_self_corrections():
    cfg = load_config(None, TINY + ["testbed.misread_share=0", "testbed.reflect_share=0"]).testbed
    problems = arith.generate_split("pretrain", 2000, 0, cfg.arith)
    assert pretrain_solutions(problems, cfg) == [p.solution() for p in problems]
    differ = sum(arith.precedence_solution(p) != p.solution() for p in problems)
    every = cfg.model_copy(update={"misread_share": 1.0})
    texts = pretrain_solutions(problems, every)
    assert texts == [arith.precedence_solution(p) for p in problems]
    assert corpus_counts(problems, texts) == {"reference": 2000 - differ, "misread": differ,
                                              "self_corrected": 0}
    mixed = cfg.model_copy(update={"misread_share": 0.5, "reflect_share": 0.2})
    texts = pretrain_solutions(problems, mixed)
    assert texts == pretrain_solutions(problems, mixed)  # seeded
    counts = corpus_counts(problems, texts)
    assert sum(counts.values()) == 2000
    assert abs(counts["misread"] + counts["self_corrected"] - differ / 2) < 4 * (differ / 4) ** .5
    assert abs(counts["self_corrected"] - differ / 10) < 4 * (differ / 10) ** .5
    for p, text in zip(problems, texts):  # a self-corrected solution checks and grades correct
        if arith.REFLECTION_PREFIX in text:
            assert arith.first_wrong_step(p, text) is None
        elif text != p.solution():
            assert arith.reads_with_precedence(p, text)


def _moment_betas(model_dir):
    return tuple(torch.load(model_dir / "optimizer.pt")["param_groups"][0]["betas"])


def _moment_steps(model_dir):
    """The step counts of the pretraining Adam moments saved beside the model, loaded the way
    the RL trainer loads a policy's optimizer.pt (every parameter must have its moments)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.load_state_dict(torch.load(model_dir / "optimizer.pt"))
    assert all(optimizer.state[p]["exp_avg_sq"].shape == p.shape for p in model.parameters())
    return {int(optimizer.state[p]["step"]) for p in model.parameters()}


def test_saved_model_loads_by_path_and_generates(tiny_base):
    _, _, model_dir = tiny_base
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "qwen2"
    prompt = arith.PROMPT_TEMPLATE.format(problem="Compute left to right: 12 + 30 - 5")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    text = "48 + 17 = 65\nWait, step 2 is wrong: ünïcode ∑ 😀"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert all(len(t.lstrip("Ġ")) <= 1 for t in tok.tokenize("1234567890") )  # digit-level


def test_rebuild_is_noop_and_config_change_rebuilds(tiny_base, tmp_path):
    cfg, base, model_dir = tiny_base
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    build_base(cfg, base)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    other = cfg.model_copy(update={"base_dir": "elsewhere"})  # the location is not the build
    build_base(other, base)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # the corpus knobs are part of the build once set (and absent while 0)
    assert base_fingerprint(cfg.model_copy(update={"misread_share": 0.3})) != base_fingerprint(cfg)


def test_a_shipped_base_installs_and_a_rebuild_here_is_identical(tiny_base, tmp_path):
    """The tiny build as the shipped base: its config installs it (no training: the same
    files, the same problems), and a rebuild on this machine and thread count matches it
    weight for weight (the build is deterministic here)."""
    cfg, base, model_dir = tiny_base
    installed = build_base(cfg, tmp_path / "installed", shipped=[base])
    build = read_json(tmp_path / "installed" / "build.json")
    assert build["installed_from"] == str(base) and "install" in build["seconds"]
    for name in ("model.safetensors", "optimizer.pt", "tokenizer.json"):
        assert (installed / name).read_bytes() == (model_dir / name).read_bytes()
    for split in ("pretrain", "train", "heldout"):
        pd.testing.assert_frame_equal(pd.read_parquet(base / f"data/{split}.parquet"),
                                      pd.read_parquet(installed.parent / f"data/{split}.parquet"))
    report = rebuild_base(cfg, tmp_path / "rebuild", shipped=[base])
    assert report["identical"] and report["tensors_differing"] == 0, report
    assert all(v["diff"] == 0 for v in report["heldout"].values()), report
    assert read_json(tmp_path / "rebuild" / "rebuild.json") == report
    # another config is trained, not installed
    other = cfg.model_copy(update={"steps": 2})
    build_base(other, tmp_path / "other", shipped=[base])
    assert "installed_from" not in read_json(tmp_path / "other" / "build.json")


def test_compare_bases_says_how_much_two_builds_differ(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    _, base, _ = tiny_base
    shutil.copytree(base, tmp_path / "b")
    weights = load_file(tmp_path / "b/model/model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.25
    save_file(weights, tmp_path / "b/model/model.safetensors", metadata={"format": "pt"})
    build = read_json(tmp_path / "b/build.json")
    build["heldout"]["greedy_accuracy"] += 0.05
    (tmp_path / "b/build.json").write_text(json.dumps(build))
    report = compare_bases(base, tmp_path / "b")
    assert not report["identical"] and report["tokenizer_identical"]
    assert report["tensors_differing"] == 1
    assert report["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert report["heldout"]["greedy_accuracy"]["diff"] == pytest.approx(0.05)


def test_a_shipped_base_built_on_other_problems_is_refused(tiny_base, tmp_path):
    cfg, base, _ = tiny_base
    shutil.copytree(base, tmp_path / "ship")
    build = read_json(tmp_path / "ship/build.json")
    build["splits_sha256"]["heldout"] = "0" * 64
    (tmp_path / "ship/build.json").write_text(json.dumps(build))
    with pytest.raises(RuntimeError, match="other problems"):
        build_base(cfg, tmp_path / "installed", shipped=[tmp_path / "ship"])


def test_the_shipped_bases_are_the_configs_and_the_default_meets_the_targets():
    """data/testbed_base was built from configs/testbed.yaml, testbed_base_small from
    configs/testbed-small.yaml (a config change without a rebuilt base fails here); the
    default's held-out figures meet the testbed's targets."""
    small = load_config(SMALL_CONFIG).testbed
    assert shipped_base(small) == SHIPPED_BASE.with_name("testbed_base_small"), \
        "configs/testbed-small.yaml changed: rebuild its base (data/README.md)"
    cfg = load_config().testbed
    assert shipped_base(cfg) == SHIPPED_BASE, \
        "configs/testbed.yaml changed: rebuild its base (data/README.md)"
    for d in (SHIPPED_BASE, SHIPPED_BASE.with_name("testbed_base_small")):
        for name in ("model.safetensors", "optimizer.pt", "tokenizer.json", "config.json"):
            assert (d / "model" / name).is_file()
        assert read_json(d / "build.json")["weights_sha256"] == weights_sha256(d / "model")
        assert _moment_betas(d / "model") == (0.9, 0.95)  # pretraining's, which RL carries on
    m = read_json(SHIPPED_BASE / "build.json")["heldout"]
    assert 0.25 <= m["greedy_accuracy"] <= 0.75, m
    assert m["mixed_share"] >= 0.30, m
    assert m["misread_share"] >= 0.10, m  # the habit RL can train away
    corpus = read_json(SHIPPED_BASE / "build.json")["pretrain_solutions"]
    assert corpus["misread"] > 0 and corpus["self_corrected"] > 0, corpus


def test_measure_base_reports_targets(tiny_base):
    _, base, model_dir = tiny_base
    heldout = pd.read_parquet(base / "data" / "heldout.parquet").head(5)
    engine = HFEngine(model_dir)
    m = measure_base(engine, heldout, n=2, max_tokens=8)
    prompts = [arith.PROMPT_TEMPLATE.format(problem=p) for p in heldout["problem"]]
    graded = [[arith.grade(c.text, a)[0] == "correct" for c in group] for group, a in zip(
        engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_tokens=8, seed=1)),
        heldout["answer"])]
    greedy = [arith.grade(g[0].text, a)[0] == "correct" for g, a in zip(
        engine.generate(prompts, 1, SamplingParams(temperature=0, max_tokens=8)),
        heldout["answer"])]
    assert m == {"greedy_accuracy": sum(greedy) / 5,
                 "sampled_accuracy": sum(sum(g) / 2 for g in graded) / 5,
                 "mixed_share": sum(sum(g) == 1 for g in graded) / 5,
                 "all_wrong_share": sum(sum(g) == 0 for g in graded) / 5,
                 "misread_share": 0.0, "n_problems": 5, "samples_per_problem": 2}


def test_hf_engine_seeded_and_shapes(tiny_base):
    _, _, model_dir = tiny_base
    eng = HFEngine(model_dir, batch_size=4)
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3, logprobs=True)
    a = eng.generate(["Q: a\nA:\n", "Q: bb\nA:\n"], 3, params)
    b = eng.generate(["Q: a\nA:\n", "Q: bb\nA:\n"], 3, params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert len(a) == 2 and all(len(g) == 3 for g in a)
    for c in a[0]:
        assert len(c.logprobs) == len(c.token_ids) == c.length
        assert c.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in c.logprobs)


@pytest.mark.slow
def test_the_shipped_base_reproduces_its_figures_here_and_grpo_learns(tmp_path):
    """`make base`'s base, installed from data/testbed_base: its held-out figures measured
    here, with two threads and in another process with one, are exactly those it shipped with
    (the docs' base figures); then one round of the TAPO stages on it, and 10 rounds of GRPO
    that raise held-out pass@1."""
    cfg = load_config().testbed
    model_dir = build_base(cfg, tmp_path / "base")
    build = read_json(tmp_path / "base" / "build.json")
    assert build["installed_from"] == str(SHIPPED_BASE)
    heldout = pd.read_parquet(tmp_path / "base" / "data" / "heldout.parquet")
    assert measure_base(HFEngine(model_dir, batch_size=200), heldout) == build["heldout"]
    one_thread = subprocess.run(
        [sys.executable, "-c", MEASURE_ONE_THREAD, str(tmp_path / "base")],
        capture_output=True, text=True, check=True)
    assert json.loads(one_thread.stdout) == build["heldout"], one_thread.stderr

    # one TAPO round on the default testbed, with the default engine (vllm when installed)
    from tapo.flows.round import run_round

    from_base = [f"testbed.base_dir={tmp_path / 'base'}",  # not a cold start in runs/
                 f"policy.coldstart={tmp_path / 'no-coldstart'}"]
    cfg = load_config(None, from_base)
    summary = run_round(tmp_path / "run", 1, cfg, progress=False)
    assert summary["rollouts"] == 64 * 8 and 0 < summary["candidates"] <= 16  # 25% budget
    assert summary["accepted"] == summary["candidates"]  # rule constructor: all verified
    assert summary["training_rows"] == 64 * 8 + summary["accepted"]

    # `make iterate N=10 ALGO=grpo` learns: held-out pass@1 (T = 0.6, n = 8) and misreadings
    from tapo.flows.evaluate import evaluate
    from tapo.flows.iterate import iterate

    grpo = load_config(None, [*from_base, "algo.name=grpo"])
    iterate(tmp_path / "grpo", 10, grpo, progress=False)
    before, after = (evaluate(model, ["testbed"], grpo, tmp_path / name, progress=False).iloc[0]
                     for model, name in ((model_dir, "eval-base"),
                                         (tmp_path / "grpo/models/iter_0010", "eval-grpo")))
    assert after["pass@1"] >= before["pass@1"] + 0.10, (before, after)


def test_a_build_below_the_greedy_target_pretrains_further(tmp_path):
    """The tiny build (3 steps) answers nothing right: it gets its extra steps, at most
    `max_extra_steps`, and build.json says how many."""
    cfg = load_config(None, TINY + ["testbed.max_extra_steps=5"]).testbed
    model_dir = build_base(cfg, tmp_path / "base")
    build = json.loads((tmp_path / "base" / "build.json").read_text())
    assert build["heldout"]["greedy_accuracy"] < 0.25 and build["extra_steps"] == 5
    assert _moment_steps(model_dir) == {5 + 2}  # the moments of the last training (the judges)


def test_sharpness_bench_on_the_small_base(small_base):
    """`python -m bench.sharpness`: the unperturbed row reproduces the build's greedy accuracy;
    a sign step of lr moves every parameter by lr (norm lr x sqrt(parameters))."""
    import math
    import subprocess
    import sys
    from pathlib import Path

    cfg = small_base()
    base = Path(cfg.testbed.base_dir)
    out = subprocess.run([sys.executable, "-m", "bench.sharpness", "--config",
                          "configs/testbed-small.yaml", f"testbed.base_dir={base}",
                          "--problems", "8", "--group", "2"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| perturbation")}
    assert len(rows) == 8
    build = json.loads((base / "build.json").read_text())
    assert float(rows["none"][2].rstrip(" |")) == build["heldout"]["greedy_accuracy"]
    assert float(rows["sign step, lr 0.0001"][0]) == pytest.approx(
        1e-4 * math.sqrt(build["parameters"]), abs=1e-3)


def test_gradient_split_parts_add_up_to_the_trainers_gradient(small_run):
    """`python -m bench.gradient_split`: the rollouts' and the augmented rows' gradients sum to
    the gradient of the trainer's own step over the whole shard."""
    row = split_gradients(small_run, 1)
    cfg = load_config(small_run / "config.yaml")
    rows = read_pandas(small_run / "iter_0001" / "assemble")
    summary = read_json(small_run / "iter_0001" / "round.json")
    assert row["augmented rows"] == summary["augmented"] > 0
    assert row["rollouts rows"] + row["augmented rows"] == len(rows)
    assert 0 < row["augmented share, total"] < 1 and -1 <= row["cosine"] <= 1

    policy = summary["policy"]
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    obj = objective_config(cfg)
    batch = build_batch(rows, AutoTokenizer.from_pretrained(policy).pad_token_id, obj)
    old = old_logprobs(model, batch, 64)
    in_loss, _ = loss_mask(batch.advantages, batch.trained, batch.corrective, old, obj)
    assert row["rollouts loss tokens"] + row["augmented loss tokens"] == int(in_loss.sum())
    step = _update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, old, None, in_loss,
                   torch.arange(len(rows)), obj, cfg.train)
    assert row["full grad norm"] == pytest.approx(step["grad_norm"], rel=1e-4)

    # the second moment: the trainer's own Adam, continued from the policy's optimizer.pt over
    # the round's mini-batches (lr 0 holds the weights; no clipping), ends where the bench says
    adam = torch.optim.AdamW(model.parameters())
    adam.load_state_dict(torch.load(Path(policy) / "optimizer.pt"))
    adam.param_groups[0]["lr"] = 0.0
    stored = torch.cat([adam.state[p]["exp_avg_sq"].flatten() for p in model.parameters()])
    tc = cfg.train.model_copy(update={"max_grad_norm": 1e9})
    steps = mini_batches(len(rows), tc)
    for idx in steps:
        _update(model, adam, batch, old, None, in_loss, idx, obj, tc)
    v = torch.cat([adam.state[p]["exp_avg_sq"].flatten() for p in model.parameters()])
    carried = 0.95 ** len(steps) * stored
    assert row["beta2"] == adam.param_groups[0]["betas"][1] == 0.95  # carried from pretraining
    assert row["round's share of v, median"] == pytest.approx(
        float(((v - carried) / v).median()), rel=1e-3)
    assert row["v with / without augmented, median"] >= 1.0


def test_reflection_timing_on_hand_written_answers():
    """`python -m bench.reflection_timing`: misreadings, and reflections after a wrong step or
    after right steps only, counted on answers whose kind is known."""
    p = arith.ArithProblem(start=5, ops=(("+", 3), ("*", 2)))  # 8, 16; misread: 5 + 6 = 11
    misread = arith.precedence_solution(p)
    caught = arith.self_corrected(p, misread)  # wrong step 1, reflection, then correct
    false_alarm = ("5 + 3 = 8\n" + arith.reflection_line(p, 1, "5 + 3 = 8", "5 + 3 = 8")
                   + "\n" + p.solution())
    graded = pd.DataFrame({"problem": [p.text] * 4,
                           "response": [misread, caught, false_alarm, p.solution()],
                           "label": ["wrong", "correct", "correct", "correct"]})
    row = reflection_timing(graded)
    assert row["answers"] == 4 and row["misread"] == 0.25
    assert row["accuracy when read right"] == 1.0
    assert row["reflect after a wrong step"] == 0.25 and row["accuracy of those"] == 1.0
    assert row["reflect after right steps"] == 0.25 and row["reflect"] == 0.5


def test_testbed_problems_are_generated_without_a_model(tmp_path):
    """A run of another model on the arith task (configs/smollm2.yaml) needs the splits, not the
    testbed's base: they are generated on first use, and kept after."""
    from tapo.flows.round import problem_pool
    from testbed.base import testbed_problems

    cfg = load_config(SMALL_CONFIG, [f"testbed.base_dir={tmp_path / 'arith'}",
                                     "testbed.arith.max_steps=2", "testbed.n_train=50"])
    pool = problem_pool(cfg)
    df = pd.read_parquet(pool)
    expected = arith.generate_split("train", 50, cfg.testbed.seed, cfg.testbed.arith)
    assert df["problem"].tolist() == [p.text for p in expected]
    assert not (tmp_path / "arith" / "model").exists()
    stamp = pool.stat().st_mtime_ns
    assert testbed_problems(cfg.testbed, "heldout").exists()
    assert pool.stat().st_mtime_ns == stamp  # present: not written again

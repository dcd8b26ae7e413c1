"""Each TAPO stage on hand-built rows (malformed ones included), with the small testbed's real
tokenizer and model, real grading, and recorded chat-model answers for the llm locator and
constructor."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline.engines import Completion
from stages.assemble import Assemble
from stages.classify import Classify
from stages.common import load_tokenizer, policy_path, prefix_boundary
from stages.construct import Construct, llm_trajectory
from stages.locate import Locate, parse_located_step
from stages.sample import Sample
from stages.select import Select
from stages.tasks import arith
from stages.tasks.base import get_task, split_steps
from stages.tasks.prompts import numbered_steps

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "llm_outputs.json").read_text())
PROBLEM = arith.parse_problem("Compute left to right: 48 + 17 - 29 * 3")  # 65, 36, 108


class ReplayEngine:
    """Answers each prompt with the next recorded text (the recorded chat-model outputs)."""

    name = "replay"

    def __init__(self, answers):
        self.answers = list(answers)
        self.prompts = []

    def generate(self, prompts, n, params):
        self.prompts += prompts
        return [[Completion(self.answers.pop(0), [], "stop")] for _ in prompts]


def reasons(out):
    return sorted(d["reason"] for d in out.dropped)


def rollout(pid, k, response, answer="108", label=None, problem=PROBLEM.text, tok=None):
    ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] if tok else []
    row = {"problem_id": pid, "problem": problem, "answer": answer, "rollout_id": f"{pid}/{k}",
           "sample_index": k, "prompt": f"Q: {problem}\nA:\n",
           "prompt_token_ids": tok(f"Q: {problem}\nA:\n")["input_ids"] if tok else [],
           "response": response,
           "response_token_ids": ids, "finish_reason": "stop", "response_len": len(response)}
    if label:
        row.update(label=label, reason="", extracted_answer=None,
                   reward=float(label == "correct"))
    return row


def candidate(tok, wrong, reference=None, problem=PROBLEM, pid="p1", answer=None):
    return {
        "problem_id": pid, "problem": problem if isinstance(problem, str) else problem.text,
        "answer": answer or str(problem.answer), "prompt": "Q: ...\nA:\n", "group_size": 4,
        "pass_rate": 0.25, "rank": 0, "wrong_rollout_id": f"{pid}/1", "wrong_label": "incorrect",
        "wrong_response": wrong,
        "wrong_token_ids": tok(wrong, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        "reference_rollout_id": f"{pid}/0",
        "reference_response": reference or (problem.solution() if not isinstance(problem, str)
                                            else ""),
    }


# --- sample ---------------------------------------------------------------------------------


def test_sample_groups_ids_and_tokens(small_base):
    cfg = small_base("rollout.group_size=3", "rollout.max_tokens=24")
    rows = [{"problem_id": "a", "problem": PROBLEM.text, "answer": "108"},
            {"problem_id": "b", "problem": "Compute left to right: 5 + 6", "answer": "11"},
            {"problem_id": "a", "problem": PROBLEM.text, "answer": "108"},
            {"problem_id": "", "problem": "x", "answer": "1"}]
    stage = Sample(cfg)
    out = stage.process(rows)
    stage.close()
    assert [r["rollout_id"] for r in out.rows] == ["a/0", "a/1", "a/2", "b/0", "b/1", "b/2"]
    assert reasons(out) == ["bad_problem", "duplicate_problem"]
    tok = load_tokenizer(str(policy_path(cfg)))
    for r in out.rows:
        assert r["prompt"] == arith.PROMPT_TEMPLATE.format(problem=r["problem"])
        assert tok.decode(r["response_token_ids"], skip_special_tokens=True) == r["response"]
        assert r["response_len"] == len(r["response_token_ids"]) <= 24
        assert r["finish_reason"] in ("stop", "length")
    assert Sample(cfg).process(rows[:2]).rows == out.rows  # seeded: same rows again


# --- classify -------------------------------------------------------------------------------


def test_classify_labels_rewards_and_group_pass_rate(small_base):
    cfg = small_base()
    rows = [rollout("p", 0, PROBLEM.solution()), rollout("p", 1, "48 + 17 = 65\n\\boxed{7}"),
            rollout("p", 2, "garbage \\boxed{"), rollout("p", 3, "\\boxed{108}"),
            rollout("p", 3, "duplicate"), rollout("q", 0, "\\boxed{3}", answer="3"),
            {**rollout("q", 1, "x"), "response": None}]
    stage = Classify(cfg)
    out = stage.process(rows)
    stage.close()
    got = {r["rollout_id"]: (r["label"], r["reward"], r["pass_rate"], r["group_size"])
           for r in out.rows}
    assert got == {"p/0": ("correct", 1.0, 0.5, 4), "p/1": ("incorrect", 0.0, 0.5, 4),
                   "p/2": ("no_answer", 0.0, 0.5, 4), "p/3": ("correct", 1.0, 0.5, 4),
                   "q/0": ("correct", 1.0, 1.0, 1)}
    assert reasons(out) == ["bad_rollout", "duplicate_rollout"]
    assert out.rows[1]["extracted_answer"] == "7" and out.rows[2]["extracted_answer"] is None


# --- select ---------------------------------------------------------------------------------


def _group(pid, labels, lengths=None):
    rows = []
    for k, label in enumerate(labels):
        r = rollout(pid, k, f"{pid} response {k}", label=label)
        r["response_len"] = (lengths or [10] * len(labels))[k]
        rows.append(r)
    return rows


def test_select_window_budget_and_choices(small_base):
    c, w, n = "correct", "incorrect", "no_answer"
    rows = (_group("zero", [w, w, w, w]) + _group("all", [c, c, c, c])
            + _group("easy", [c, c, c, w]) + _group("quarter", [c, n, w, w], [30, 90, 50, 70])
            + _group("half", [c, c, w, n], [40, 20, 10, 10]) + _group("unknown", [c, "timeout",
                                                                                "error", c])
            + _group("half2", [w, c, w, c]))
    cfg = small_base("select.max_constructions=2", "select.repair=longest")
    out = Select(cfg).process(rows)
    assert [r["problem_id"] for r in out.rows] == ["quarter", out.rows[1]["problem_id"]]
    assert out.rows[1]["problem_id"] in ("half", "half2")  # equal p: seeded order
    quarter = out.rows[0]
    assert quarter["wrong_rollout_id"] == "quarter/3"  # incorrect before no_answer; longest
    assert quarter["reference_rollout_id"] == "quarter/0" and quarter["rank"] == 0
    by_reason = {d["problem_id"]: d["reason"] for d in out.dropped}
    assert by_reason == {"zero": "no_correct_reference", "all": "no_wrong_rollout",
                         "easy": "outside_window", "unknown": "no_repairable_rollout",
                         ({"half", "half2"} - {out.rows[1]["problem_id"]}).pop(): "over_budget"}
    # every problem is accounted for exactly once
    assert len(out.rows) + len(out.dropped) == len({r["problem_id"] for r in rows})
    # the default budget is a quarter of the round's problems, rounded up: ceil(7 / 4) = 2
    assert len(Select(small_base("select.repair=longest")).process(rows).rows) == 2
    half = next(r for r in Select(small_base("select.max_constructions=5",
                                             "select.repair=longest")).process(rows).rows
                if r["problem_id"] == "half")
    assert half["reference_rollout_id"] == "half/1"  # the shortest correct
    other_seed = Select(small_base("select.seed=7", "select.max_constructions=5",
                                   "select.repair=longest")).process(rows)
    assert {r["problem_id"] for r in other_seed.rows} == {"quarter", "half", "half2"}


C, W, N = "correct", "incorrect", "no_answer"
EDGES = {  # name: (overrides, groups {pid: labels}, selected problems, {pid: drop reason})
    "p equal to p_low > 0 is in": (["select.p_low=0.25", "select.max_constructions=9"],
                                   {"q": [C, W, W, W], "h": [C, C, W, W], "e": [C, C, C, W]},
                                   ["q", "h"], {"e": "outside_window"}),
    "p just under p_low is out": (["select.p_low=0.26", "select.max_constructions=9"],
                                  {"q": [C, W, W, W], "h": [C, C, W, W]},
                                  ["h"], {"q": "outside_window"}),
    "max_constructions=0": (["select.max_constructions=0"], {"q": [C, W, W, W]},
                            [], {"q": "over_budget"}),
    "budget_fraction=0": (["select.budget_fraction=0"], {"q": [C, W, W, W]},
                          [], {"q": "over_budget"}),
    "ties, seed 0": (["select.max_constructions=1", "select.seed=0"],
                     {"t1": [C, W, W, W], "t2": [C, W, W, W]}, ["t1"], {"t2": "over_budget"}),
    "ties, seed 2": (["select.max_constructions=1", "select.seed=2"],
                     {"t1": [C, W, W, W], "t2": [C, W, W, W]}, ["t2"], {"t1": "over_budget"}),
}


@pytest.mark.parametrize("name", EDGES)
def test_select_edges(small_base, name):
    overrides, groups, selected, dropped = EDGES[name]
    rows = [r for pid, labels in groups.items() for r in _group(pid, labels)]
    out = Select(small_base(*overrides)).process(rows)
    assert sorted({r["problem_id"] for r in out.rows}) == sorted(selected)
    assert [r["problem_id"] for r in out.rows if r["repair_rank"] == 0] == selected  # in order
    assert {d["problem_id"]: d["reason"] for d in out.dropped} == dropped


def test_select_order_random_takes_the_window_in_a_seeded_order(small_base):
    """select.order=random: the budget takes candidates of any pass rate in the window in the
    seed's order, not the hardest first."""
    groups = {f"q{i}": [C, W, W, W] for i in range(6)} | {f"h{i}": [C, C, W, W] for i in range(6)}
    rows = [r for pid, labels in groups.items() for r in _group(pid, labels)]
    base = ["select.max_constructions=6", "select.repair=longest"]
    hardest = Select(small_base(*base)).process(rows)
    assert {r["problem_id"][0] for r in hardest.rows} == {"q"}
    picked = []
    for seed in (0, 1):
        out = Select(small_base(*base, "select.order=random", f"select.seed={seed}")).process(rows)
        assert len(out.rows) == 6 and len(out.dropped) == 6
        assert out.rows == Select(small_base(*base, "select.order=random",
                                             f"select.seed={seed}")).process(rows).rows
        picked.append([r["problem_id"] for r in out.rows])
    assert any(pid[0] == "h" for pid in picked[0] + picked[1])  # not the hardest only
    assert picked[0] != picked[1]


def test_select_repairs_a_finished_rollout_before_a_longer_truncated_one(small_base):
    rows = _group("p", [C, W, W, N], lengths=[10, 90, 30, 95])
    rows[1]["finish_reason"] = "length"  # the longest incorrect one ran out of tokens
    for repair, order in (("longest", ["p/2"]), ("latest_failure", ["p/2", "p/1", "p/3"])):
        out = Select(small_base(f"select.repair={repair}")).process(rows)
        assert [r["wrong_rollout_id"] for r in out.rows] == order


def test_latest_failure_locates_every_wrong_rollout_and_keeps_the_latest(small_base):
    """select.repair=latest_failure (the default): select passes every wrong rollout of a
    candidate, locate finds each failure, pick_repair keeps the longest valid prefix."""
    from stages.pick_repair import PickRepair

    cfg = small_base()
    tok = load_tokenizer(str(policy_path(cfg)))
    responses = {  # (label, response): the failure comes at step 1, 3 and 2
        0: ("correct", PROBLEM.solution()),
        1: ("incorrect", "48 + 17 = 66\n66 - 29 = 37\n37 * 3 = 111\n\\boxed{111}"),
        2: ("incorrect", "48 + 17 = 65\n65 - 29 = 36\n36 * 3 = 109\n\\boxed{109}"),
        3: ("incorrect", "48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}"),
    }
    rows = [{**rollout("p", k, text, label=label, tok=tok), "response_len": 60 - 10 * k}
            for k, (label, text) in responses.items()]
    for r in rows:
        r.update(group_size=4, group_correct=1, pass_rate=0.25)
    candidates = Select(cfg).process(rows).rows
    assert [c["wrong_rollout_id"] for c in candidates] == ["p/1", "p/2", "p/3"]  # longest first
    assert [c["repair_rank"] for c in candidates] == [0, 1, 2]
    located = Locate(cfg).process(candidates).rows
    assert [r["failure_step"] for r in located] == [1, 3, 2]
    out = PickRepair(cfg).process(located)
    assert [r["wrong_rollout_id"] for r in out.rows] == ["p/2"]  # fails at step 3: latest
    assert reasons(out) == ["not_latest_failure"] * 2
    longest = Select(small_base("select.repair=longest")).process(rows).rows
    assert [c["wrong_rollout_id"] for c in longest] == ["p/1"]  # what `longest` repairs


# --- locate ---------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [True, False])
def test_rule_locator_finds_failure_and_token_boundary(small_base, keep):
    cfg = small_base(f"locate.keep_failed_step={keep}")
    tok = load_tokenizer(str(policy_path(cfg)))
    wrong = "48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}"
    rows = [candidate(tok, wrong), candidate(tok, "48 + 17 = 65\n"),
            candidate(tok, "%%% garbage"), candidate(tok, PROBLEM.solution()),
            {**candidate(tok, wrong), "wrong_token_ids": [5, 6, 7]}]
    out = Locate(cfg).process(rows)
    assert reasons(out) == ["no_error_found", "token_mismatch"]
    first, early, garbage = out.rows
    # keep: the prefix ends after the wrong line 2 (its newline included); else before it
    assert (first["failure_step"], first["n_steps"], first["prefix_chars"]) == (2, 4,
                                                                              26 if keep else 13)
    assert json.loads(first["locate_detail"])["expected"] == "65 - 29 = 36"
    assert (early["failure_step"], early["prefix_chars"]) == (2, 13)  # stopped after step 1
    assert (garbage["failure_step"], garbage["prefix_chars"]) == (1, 11 if keep else 0)
    assert (garbage["prefix_tokens"] > 0) == keep
    for r in out.rows:
        prefix = r["wrong_response"][: r["prefix_chars"]]
        assert tok.decode(r["wrong_token_ids"][: r["prefix_tokens"]]) == prefix


@pytest.mark.parametrize("eol", ["\r\n", "\r", "\u2028", "\x85"])
def test_one_step_splitter_for_every_line_terminator(small_base, eol):
    """The checker, locate's kept prefix and split_steps cut at the same boundary whatever ends
    a line (locate used to look for "\n" alone)."""
    from stages.locate import failed_step_end
    from stages.tasks.base import split_steps

    cfg = small_base()
    tok = load_tokenizer(str(policy_path(cfg)))
    wrong = eol.join(["48 + 17 = 65", "65 - 29 = 38", "38 * 3 = 114", "\\boxed{114}"])
    steps = split_steps(wrong)
    assert [s.text for s in steps] == wrong.split(eol)
    step2_end = len("48 + 17 = 65" + eol + "65 - 29 = 38" + eol)
    assert steps[1].line_end == step2_end and failed_step_end(steps, 2, 0) == step2_end
    (row,) = Locate(cfg).process([candidate(tok, wrong)]).rows
    assert row["failure_step"] == 2 and row["n_steps"] == 4
    assert row["prefix_chars"] == step2_end  # byte-level tokens end at the terminator
    assert tok.decode(row["wrong_token_ids"][: row["prefix_tokens"]]) == wrong[:step2_end]


def test_prefix_boundary_leaves_out_a_straddling_token(small_base):
    tok = load_tokenizer(str(policy_path(small_base())))
    text = "48 + 17 = 65\nWait: 3 × 4 ≤ 12\u2028ok"  # multi-byte characters: 2 and 3 tokens
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for chars in range(len(text) + 1):
        n, got = prefix_boundary(tok, ids, text, chars)
        assert got <= chars and tok.decode(ids[:n]) == text[:got]
        for more in range(n + 1, min(n + 5, len(ids)) + 1):  # maximal: no longer clean prefix
            d = tok.decode(ids[:more])
            assert not (len(d) <= chars and text.startswith(d))
    assert prefix_boundary(tok, ids, text, len(text) - 3)[1] == len(text) - 3  # after "\u2028"
    with pytest.raises(ValueError):
        prefix_boundary(tok, ids[:-1], text, 3)


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=lambda c: c["name"])
def test_llm_locator_on_recorded_chat_answers(small_base, case):
    cfg = small_base("locate.method=llm", "task.name=math")
    tok = load_tokenizer(str(policy_path(cfg)))
    row = candidate(tok, case["wrong_response"], case["reference_response"],
                    problem=case["problem"], answer=case["answer"])
    answers = case["locate"]
    stage = Locate(cfg)
    stage.engine.set(ReplayEngine(answers.values()))
    out = stage.process([{**row, "problem_id": name} for name in answers])
    # an answer without tags is read when it says "step 3" (not "step three")
    phrase = re.search(r"step (is )?\d", answers["missing_tag"], re.IGNORECASE) is not None
    assert [r["problem_id"] for r in out.rows] == ["well_formed"] + ["missing_tag"] * phrase
    assert {r["failure_step"] for r in out.rows} == {case["true_step"]}
    forms = [json.loads(r["locate_detail"])["form"] for r in out.rows]
    assert forms == ["tag"] + ["phrase"] * phrase
    assert {d["problem_id"]: d["reason"] for d in out.dropped} == {
        "wrong_step_index": "locator_out_of_range",
        **({} if phrase else {"missing_tag": "locator_unparseable"})}
    prompt = stage.engine.get().prompts[0]
    reference = numbered_steps(split_steps(case["reference_response"]))  # numbered alike
    assert case["problem"] in prompt and "[3] " in prompt and reference in prompt
    step3 = case["wrong_response"].split("\n")[[i for i, line in enumerate(
        case["wrong_response"].split("\n")) if line.strip()][2]]
    assert case["wrong_response"][: out.rows[0]["prefix_chars"]].endswith(step3 + "\n")


def test_parse_located_step_edge_cases():
    response = split_steps("a\n\nb\nc")
    assert parse_located_step("<step>2</step>", response)[:2] == (2, 3)
    assert parse_located_step("<step>3</step> then <step>1</step>", response)[:2] == (3, 5)
    assert parse_located_step("<step>4</step>", response).reason == "locator_out_of_range"
    assert parse_located_step("<step>two</step>", response).reason == "locator_unparseable"
    assert parse_located_step("9" * 5000, response).reason == "locator_unparseable"
    # without the tags: the "step k" phrase SmolLM2-135M-Instruct writes (docs: A real model)
    assert parse_located_step("The first wrong step is 2.", response)[:2] == (2, 3)
    assert json.loads(parse_located_step("Step 3 is wrong", response)[2])["form"] == "phrase"
    assert parse_located_step("The first wrong step is 11.", response).reason == \
        "locator_out_of_range"
    for arithmetic in ("The first wrong step is 6 + 6 + 3 = 11.", "step 2=4", "steps 23",
                       "Step three is where it goes wrong."):
        assert parse_located_step(arithmetic, response).reason == "locator_unparseable"
    assert json.loads(parse_located_step("<step>1</step>, not step 2", response)[2])["form"] == \
        "tag"


# --- construct ------------------------------------------------------------------------------


def _located(tok, wrong, cfg, **extra):
    out = Locate(cfg).process([candidate(tok, wrong, **extra)])
    assert out.rows, out.dropped
    return out.rows[0]


def test_rule_constructor_builds_verified_trajectories(small_base):
    cfg = small_base()
    tok = load_tokenizer(str(policy_path(cfg)))
    rows = [_located(tok, w, cfg) for w in (
        "48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}",  # slip at step 2
        "48 + 17 = 65\n65 - 29 = 36\n36 * 3 = 108\n\\boxed{180}",  # wrong boxed answer
        "48 + 17 = 65",  # stopped early, no newline at the end
        "nonsense")]
    out = Construct(cfg).process(rows)
    assert not out.dropped
    slip, boxed, early, garbage = out.rows
    assert slip["response"] == ("48 + 17 = 65\n65 - 29 = 38\n"
                                "Wait, step 2 is wrong: 65 - 29 is 36, not 38.\n"
                                "65 - 29 = 36\n36 * 3 = 108\n\\boxed{108}")
    assert slip["prefix"] == "48 + 17 = 65\n65 - 29 = 38\n"  # the wrong step is kept
    assert slip["trajectory_id"] == "p1/1/tapo"
    assert boxed["diagnosis"].startswith("\nWait, step 4 is wrong")  # after "\boxed{180}"
    assert early["diagnosis"].startswith("\nWait, step 2")  # a line break, not in the prefix
    assert garbage["prefix"] == "nonsense" and garbage["diagnosis"].startswith("\nWait, step 1")
    for t in out.rows:  # the checker accepts each (it follows the reflection back)
        assert arith.first_wrong_step(PROBLEM, t["response"]) is None
        assert t["response"] == t["prefix"] + t["diagnosis"] + t["correction"]
        assert tok.decode(t["prefix_token_ids"]) == t["prefix"]

    full = Construct(small_base("construction.mode=full_reconstruction")).process(rows[:1])
    assert full.rows[0]["response"] == PROBLEM.solution()
    assert full.rows[0]["prefix_token_ids"] == [] and full.rows[0]["trajectory_id"] == "p1/1/full"


def test_constructor_rejects_bad_prefixes(small_base):
    cfg = small_base()
    tok = load_tokenizer(str(policy_path(cfg)))
    row = _located(tok, "48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}", cfg)
    too_late = {**row, "prefix_chars": row["prefix_chars"] + 13, "failure_step": 3}
    tampered = {**row, "wrong_token_ids": tok("48 + 17 = 66\n", add_special_tokens=False)[
        "input_ids"]}
    out = Construct(cfg).process([too_late, tampered])
    assert reasons(out) == ["prefix_has_error", "prefix_mismatch"]


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=lambda c: c["name"])
def test_llm_constructor_on_recorded_chat_answers(small_base, case):
    cfg = small_base("construction.method=llm", "task.name=math", "locate.method=llm")
    tok = load_tokenizer(str(policy_path(cfg)))
    locate = Locate(cfg)
    locate.engine.set(ReplayEngine([case["locate"]["well_formed"]]))
    located = locate.process([candidate(tok, case["wrong_response"], case["reference_response"],
                                        problem=case["problem"], answer=case["answer"])]).rows[0]
    answers = case["construct"]
    stage, replay = Construct(cfg), ReplayEngine(answers.values())
    stage.engine.set(replay)
    out = stage.process([{**located, "wrong_rollout_id": name} for name in answers])
    stage.close()
    assert {d["wrong_rollout_id"]: d["reason"] for d in out.dropped} == {
        "missing_tags": "tags_missing", "wrong_final_answer": "wrong_final_answer",
        "copied_reference": "copied_reference"}
    (t,) = out.rows
    assert t["trajectory_id"] == "well_formed/tapo" and t["constructor"] == "llm"
    assert t["prefix"] == case["wrong_response"][: located["prefix_chars"]]
    assert t["diagnosis"].startswith(f"Wait, step {case['true_step']} is wrong: ")
    assert "<analysis>" not in t["response"] and t["response"].endswith(t["correction"])
    prompt = replay.prompts[0]
    assert f"goes wrong at step {case['true_step']}" in prompt and "<reconstruction>" in prompt


def test_llm_constructions_verified_by_the_checker(small_base, tmp_path):
    """construction.verify=checker keeps a trajectory of the policy's only when its steps and
    diagnosis are the exact checker's; the paper's verify=answer keeps every one that ends
    right. Each rejection is counted with its reason."""
    tok = load_tokenizer(str(policy_path(small_base())))
    row = _located(tok, "48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}", small_base())
    right = "65 - 29 = 36\n36 * 3 = 108\n\\boxed{108}"
    answers = {
        "real": ("65 - 29 is 36, not 38.", right),
        "lucky_arithmetic": ("65 - 29 is 36, not 38.",
                             "65 - 29 = 37\n37 * 3 = 108\n\\boxed{108}"),
        "misnamed": ("left to right, 48 + 17 comes first, not 29 * 3.", right),
        "wrong_answer": ("65 - 29 is 36, not 38.", "65 - 29 = 36\n36 * 3 = 109\n\\boxed{109}"),
    }

    def construct(*overrides, return_rows=False):
        stage = Construct(small_base("construction.method=llm", *overrides))
        stage.engine.set(ReplayEngine(f"<analysis>{a}</analysis>\n<reconstruction>{r}"
                                      f"</reconstruction>" for a, r in answers.values()))
        out = stage.process(located)
        stage.close()
        dropped = {d["wrong_rollout_id"]: d["reason"] for d in out.dropped}
        return (out.rows if return_rows else [t["source_rollout_id"] for t in out.rows]), dropped

    located = [{**row, "wrong_rollout_id": name} for name in answers]

    kept, dropped = construct(return_rows=True)
    assert [t["source_rollout_id"] for t in kept] == ["real", "lucky_arithmetic", "misnamed"]
    assert dropped == {"wrong_answer": "wrong_final_answer"}
    assert construct("construction.verify=checker") == (["real"], {
        "lucky_arithmetic": "wrong_steps", "misnamed": "wrong_diagnosis",
        "wrong_answer": "wrong_final_answer"})
    with pytest.raises(ValueError, match="verify=checker needs a task with an exact step checker"):
        Construct(small_base("construction.method=llm", "construction.verify=checker",
                             "task.name=math"))

    # python -m bench.constructions counts the same on a run's round
    from bench.constructions import construction_row
    from pipeline.config import write_resolved
    from pipeline.io import write_table_atomic

    run = tmp_path / "run"
    write_table_atomic(pd.DataFrame(located), run / "iter_0001" / "locate" / "part-00000.parquet")
    write_table_atomic(pd.DataFrame(kept), run / "iter_0001" / "construct" / "part-00000.parquet")
    write_resolved(small_base("construction.method=llm"), run / "config.yaml")
    assert construction_row(run) == {
        "run": str(run), "constructor": "llm", "rounds": 1, "located": 4, "kept": 3,
        "checker accepts": 1, "wrong_steps": 1, "wrong_diagnosis": 1}


def test_llm_trajectory_full_mode_and_empty_tags():
    row = {"problem": "P", "wrong_response": "a\nb\n", "prefix_chars": 2, "failure_step": 2}
    answer = "<analysis>b is wrong</analysis><reconstruction>c \\boxed{1}</reconstruction>"
    task = get_task("math")  # its steps are numbered by line
    assert llm_trajectory(row, answer, True, task) == ("", "", "c \\boxed{1}")
    assert llm_trajectory(row, answer, False, task) == (
        "a\n", "Wait, step 2 is wrong: b is wrong\n", "c \\boxed{1}")
    empty = "<analysis> </analysis><reconstruction>c</reconstruction>"
    assert llm_trajectory(row, empty, False, task).reason == "tags_missing"


def test_llm_transition_numbers_the_step_as_the_task_does(small_base):
    """After a caught misreading and its redone step, the slip on line 4 is step 2 of the
    computation: the llm path's transition names it as the rule path's reflection does (not
    "step 4"), so the exact checker accepts the trajectory, and the cold start's IF example
    reads the analysis back without the transition."""
    from stages.construct import rule_trajectory
    from stages.sft_examples import if_example

    tok = load_tokenizer(str(policy_path(small_base())))
    wrong = ("29 * 3 = 87\nWait, step 1 is wrong: left to right, 48 + 17 comes first, not 29 * 3."
             "\n48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}")
    row = _located(tok, wrong, small_base())
    assert row["failure_step"] == 4
    stage = Construct(small_base("construction.method=llm", "construction.verify=checker"))
    stage.engine.set(ReplayEngine(["<analysis>65 - 29 is 36, not 38.</analysis>\n"
                                   "<reconstruction>65 - 29 = 36\n36 * 3 = 108\n\\boxed{108}"
                                   "</reconstruction>"]))
    out = stage.process([row])
    stage.close()
    assert not out.dropped, out.dropped
    (trajectory,) = out.rows
    assert trajectory["diagnosis"] == rule_trajectory(stage.task, row, full=False)[1] == (
        "Wait, step 2 is wrong: 65 - 29 is 36, not 38.\n")
    assert if_example(row, trajectory, tok)["response"].startswith(
        "<analysis>65 - 29 is 36, not 38.</analysis>")


# --- assemble -------------------------------------------------------------------------------


def test_assemble_segments_and_rewards(small_base):
    cfg = small_base()
    tok = load_tokenizer(str(policy_path(cfg)))
    wrong = "48 + 17 = 65\n65 - 29 = 38\n38 * 3 = 114\n\\boxed{114}"
    located = _located(tok, wrong, cfg)
    (trajectory,) = Construct(cfg).process([located]).rows
    rows = [rollout("p1", 0, PROBLEM.solution(), label="correct", tok=tok),
            rollout("p1", 1, wrong, label="incorrect", tok=tok),
            rollout("p2", 0, "\\boxed{1}", label="incorrect", tok=tok)]
    for r in rows:
        r.update(group_size=2, group_correct=1, pass_rate=0.5)
    stage = Assemble(cfg)
    stage.side["trajectories"] = [trajectory]
    out = stage.process(rows)
    assert [r["kind"] for r in out.rows] == ["rollout", "rollout", "rollout", "augmented"]
    aug = out.rows[-1]
    assert aug["sample_id"] == "p1/1/tapo" and aug["reward"] == 1.0
    assert aug["response_token_ids"][: aug["prefix_len"]] == rows[1]["response_token_ids"][
        : located["prefix_tokens"]]  # the rollout's own tokens
    ids, p, d = aug["response_token_ids"], aug["prefix_len"], aug["diagnosis_len"]
    assert p + d + aug["correction_len"] == len(ids) and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[p : p + d]) == trajectory["diagnosis"]
    assert tok.decode(ids[p + d :], skip_special_tokens=True) == trajectory["correction"]
    assert aug["prompt_token_ids"] == rows[0]["prompt_token_ids"]  # the group's, as sampled
    for r in out.rows[:3]:
        assert r["correction_len"] == len(r["response_token_ids"]) and r["prefix_len"] == 0
    bad = {**trajectory, "diagnosis": "something else"}
    stage.side["trajectories"] = [bad]
    assert reasons(stage.process(rows)) == ["tokenization_mismatch"]
    assert [r["kind"] for r in Assemble(cfg).process(rows).rows] == ["rollout"] * 3  # GRPO


def test_rule_methods_need_the_arith_task(small_base):
    cfg = small_base("task.name=math")
    with pytest.raises(ValueError, match="locate.method=llm"):
        Locate(cfg)
    with pytest.raises(ValueError, match="construction.method=llm"):
        Construct(cfg)


def bos_model(small_base, where):
    """A copy of the small testbed model whose tokenizer adds a BOS to text, as Llama's does."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(policy_path(small_base()), where)
    tok = AutoTokenizer.from_pretrained(where)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 2)])
    tok.bos_token = "<|im_start|>"
    tok.save_pretrained(where)
    return where


def test_prompt_ids_are_the_engines_from_sample_to_the_trainer(small_base, tmp_path):
    """With a tokenizer that adds BOS, the engine feeds BOS + prompt; the shard must train on
    exactly that context (assemble re-tokenized the text without BOS)."""
    from trainer.rl import build_batch, objective_config

    model = bos_model(small_base, tmp_path / "bos")
    cfg = small_base(f"policy.path={model}", "rollout.group_size=2", "rollout.max_tokens=16")
    tok = load_tokenizer(str(model))
    prompt = arith.PROMPT_TEMPLATE.format(problem=PROBLEM.text)
    with_bos = tok(prompt)["input_ids"]
    assert with_bos[0] == 2 and with_bos[1:] == tok(prompt, add_special_tokens=False)["input_ids"]
    sample = Sample(cfg)
    sampled = sample.process([{"problem_id": "a", "problem": PROBLEM.text, "answer": "108"}])
    sample.close()
    assert [r["prompt_token_ids"] for r in sampled.rows] == [with_bos, with_bos]
    classify = Classify(cfg)
    graded = classify.process(sampled.rows).rows
    classify.close()
    assemble = Assemble(cfg)
    shard = assemble.process(graded).rows
    assert [r["prompt_token_ids"] for r in shard] == [with_bos, with_bos]
    import pandas as pd

    batch = build_batch(pd.DataFrame(shard), tok.pad_token_id, objective_config(cfg))
    assert batch.input_ids[0, : len(with_bos)].tolist() == with_bos

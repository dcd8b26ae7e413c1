import random

import pytest

from stages.tasks import arith, get_task
from stages.tasks.arith import ArithConfig, ArithProblem, first_wrong_step

P = ArithProblem(start=48, ops=(("+", 17), ("-", 29), ("*", 3)))  # 65, 36, 108


def test_problem_text_solution_and_parse():
    assert P.text == "Compute left to right: 48 + 17 - 29 * 3"
    assert P.solution() == "48 + 17 = 65\n65 - 29 = 36\n36 * 3 = 108\n\\boxed{108}"
    assert arith.parse_problem(P.text) == P
    with pytest.raises(ValueError):
        arith.parse_problem("What is 2 + 2?")


def test_generator_is_deterministic_and_bounded():
    cfg = ArithConfig()
    a = arith.generate_split("train", 300, seed=7, cfg=cfg)
    b = arith.generate_split("train", 300, seed=7, cfg=cfg)
    c = arith.generate_split("train", 300, seed=8, cfg=cfg)
    assert a == b and a != c
    assert len({p.key for p in a}) == 300
    for p in a:
        assert cfg.min_steps <= len(p.ops) <= cfg.max_steps
        assert all(0 <= v <= cfg.value_max for v in p.values())
        assert all(op in cfg.ops for op, _ in p.ops)


def test_splits_are_disjoint_by_construction():
    cfg = ArithConfig(min_steps=1, max_steps=2, operand_max=9, value_max=50)  # a small space
    seen = {}
    for split in ("pretrain", "train", "heldout"):
        for seed in (0, 1):
            for p in arith.generate_split(split, 40, seed, cfg):
                assert arith.split_of(p) == split
                assert seen.setdefault(p.key, split) == split


def test_difficulty_knobs():
    cfg = ArithConfig(min_steps=6, max_steps=6, ops="+", operand_max=5)
    for p in arith.generate_split("train", 50, 0, cfg):
        assert len(p.ops) == 6 and all(op == "+" and 1 <= b <= 5 for op, b in p.ops)


def test_difficulty_is_the_number_of_steps():
    assert get_task("arith").difficulty("Compute left to right: 8 * 4 * 7 - 51") == 3
    assert get_task("math").difficulty("What is $1 + 1$?") is None


def test_grade_and_extract():
    assert arith.extract_boxed("x \\boxed{1} y \\boxed{ 108 }") == "108"
    assert arith.extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert arith.extract_boxed("\\boxed{12") is None
    assert arith.grade(P.solution(), "108")[0] == "correct"
    assert arith.grade("\\boxed{107}", "108")[0] == "incorrect"
    assert arith.grade("no answer here", "108")[0] == "no_answer"
    assert arith.grade("\\boxed{1" + "0" * 5000 + "}", "108")[0] == "incorrect"


def test_checker_right_solution():
    assert first_wrong_step(P, P.solution()) is None
    assert first_wrong_step(P, "  48+17=65\n\n65 - 29 = 36\n36 * 3=108\n\\boxed{108}\n") is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_checker_first_error_at_step_k(k):
    lines = P.solution().split("\n")
    a, op, b, c = arith.parse_step(lines[k - 1])
    lines[k - 1] = f"{a} {op} {b} = {c + 10}"  # arithmetic slip at step k, then carried on
    text = "\n".join(lines)
    err = first_wrong_step(P, text)
    assert err is not None and err.chain_step == k and err.step.index == k
    assert err.expected == P.step_line(k) and err.found == lines[k - 1]
    assert text[: err.char_start] == "".join(x + "\n" for x in lines[: k - 1])


def test_checker_wrong_operand_missing_steps_and_wrong_answer():
    err = first_wrong_step(P, "48 + 71 = 119\n")  # copied the wrong operand
    assert err.chain_step == 1
    err = first_wrong_step(P, "48 + 17 = 65\n65 - 29 = 36")  # stops early
    assert err.step is None and err.chain_step == 3
    assert err.char_start == len("48 + 17 = 65\n65 - 29 = 36")
    err = first_wrong_step(P, "48 + 17 = 65\n65 - 29 = 36\n36 * 3 = 108\n\\boxed{18}")
    assert err.chain_step == 4 and err.expected == "\\boxed{108}"
    err = first_wrong_step(P, P.solution() + "\n1 + 1 = 2")  # trailing junk after the answer
    assert err.chain_step == 5


def test_checker_reflection_then_correction():
    text = "48 + 17 = 65\n65 - 29 = 46\nWait, step 2 is wrong: 65 - 29 = 36, not 46.\n"
    text += "65 - 29 = 36\n36 * 3 = 108\n\\boxed{108}"
    assert first_wrong_step(P, text) is None  # the slip is named and fixed: forgiven
    again = text.replace("65 - 29 = 36\n36", "65 - 29 = 37\n36")  # the fix is wrong too
    err = first_wrong_step(P, again)
    assert err.chain_step == 2 and err.step.index == 4 and err.found == "65 - 29 = 37"
    unnamed = "48 + 17 = 65\n65 - 29 = 46\n36 * 3 = 108"  # a slip no reflection follows
    assert first_wrong_step(P, unnamed).step.index == 2
    fixed = "48 + 17 = 65\nWait, step 1 is wrong: nothing.\n48 + 17 = 65\n65 - 29 = 36\n"
    assert first_wrong_step(P, fixed + "36 * 3 = 108\n\\boxed{108}") is None
    assert first_wrong_step(P, "Wait, step 9 is wrong: x\n").chain_step == 1
    # a reflection on a step not yet reached is a wrong line: the next reflection forgives it
    early = "48 + 17 = 65\nWait, step 4 is wrong: x\n"
    assert first_wrong_step(P, early + "65 - 29 = 36").step.index == 2
    assert first_wrong_step(P, early + "Wait, step 2 is wrong: y\n65 - 29 = 36\n"
                               "36 * 3 = 108\n\\boxed{108}") is None


@pytest.mark.parametrize(
    "garbage",
    ["", "\\boxed{", "}}}{{{", "Wait, step 99999999999999999999 is wrong", "\x00\xff" * 50,
     "1" * 10000 + " + 1 = 2", "= = = =\n+ - *", "\n\n\n"],
)
def test_checker_survives_garbage(garbage):
    err = first_wrong_step(P, garbage)
    assert err is not None and err.chain_step == 1
    assert 0 <= err.char_start <= len(garbage)


def test_checker_random_text_never_crashes():
    rng = random.Random(0)
    alphabet = "0123456789 +-*=\n\\boxed{}Wait, step is wrong"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        err = first_wrong_step(P, text)
        assert err is not None


def test_split_steps_spans():
    text = "a\n\n  b c \nd"
    steps = arith.split_steps(text)
    assert [s.text for s in steps] == ["a", "b c", "d"]
    assert all(text[s.start : s.end] == s.text for s in steps)


def test_diagnoses_name_the_error_and_its_reason():
    """P = 48 + 17 - 29 * 3: values 65, 36, 108."""
    cases = [  # (chain step, found, kind, diagnosis)
        (1, "29 * 3 = 87", "misread", "left to right, 48 + 17 comes first, not 29 * 3."),
        (2, "65 - 29 = 46", "slip", "65 - 29 is 36, not 46."),
        (2, "56 - 29 = 27", "copy", "step 2 starts from 65, the result so far, not 56."),
        (1, "84 + 17 = 101", "copy", "step 1 starts from 48, the problem's start, not 84."),
        (3, "36 * 5 = 180", "copy", "the problem multiplies by 3 here, not 5."),
        (4, "\\boxed{180}", "answer", "the answer is the last result, 108, not 180."),
        (3, "garbage", "other", "it should be 36 * 3 = 108."),
        (2, "65 + 29 = 94", "other", "it should be 65 - 29 = 36."),
    ]
    for k, found, kind, text in cases:
        expected = arith.expected_line(P, k)
        assert arith.error_kind(P, found, expected) == kind, found
        assert arith.diagnosis(P, k, found, expected) == text
        assert arith.reflection_line(P, k, found, expected) == f"Wait, step {k} is wrong: {text}"
    assert set(arith.ERROR_KINDS) == {kind for _, _, kind, _ in cases}


def test_wrong_solutions_fail_where_and_as_their_kind_says():
    rng, cfg = random.Random(0), ArithConfig()
    for _ in range(200):
        p = arith.generate_problem(rng, cfg)
        for kind in ("slip", "copy", "misread"):
            if kind == "misread" and arith.precedence_solution(p) == p.solution():
                continue
            caught = rng.random() < 0.5
            text = arith.wrong_solution(p, rng, kind, caught_first=caught)
            error = arith.first_wrong_step(p, text)
            assert error is not None and error.step is not None, text
            assert arith.error_kind(p, error.found, error.expected) in (
                (kind, "misread") if kind == "copy" else (kind,)), text  # a miscopied operand
            # can equal another operation of the problem
            before = "\n".join(text.split("\n")[: error.step.index - 1])
            assert (arith.REFLECTION_PREFIX in before) == (
                caught and kind != "misread" and arith.precedence_solution(p) != p.solution())


def test_precedence_misreading():
    # 48 + 17 - 29 * 3 with * first: 29 * 3 = 87, 48 + 17 = 65, 65 - 87 = -22
    assert arith.precedence_solution(P) == (
        "29 * 3 = 87\n48 + 17 = 65\n65 - 87 = -22\n\\boxed{-22}")
    # runs of * are multiplied out in order; a leading run is step 1 of both readings
    q = ArithProblem(start=48, ops=(("*", 2), ("+", 17), ("-", 29), ("*", 3), ("*", 2)))
    assert arith.precedence_solution(q) == ("48 * 2 = 96\n29 * 3 = 87\n87 * 2 = 174\n"
                                            "96 + 17 = 113\n113 - 174 = -61\n\\boxed{-61}")
    # no * after + or -: both readings agree
    for same in (ArithProblem(start=5, ops=(("*", 3), ("+", 4))),
                 ArithProblem(start=5, ops=(("+", 3), ("-", 4)))):
        assert arith.precedence_solution(same) == same.solution()
    rng, cfg = random.Random(0), ArithConfig()
    for _ in range(300):  # the misreading's arithmetic is right: it is only the order
        p = arith.generate_problem(rng, cfg)
        for line in arith.precedence_solution(p).split("\n")[:-1]:
            a, op, b, c = arith.parse_step(line)
            assert arith.apply(a, op, b) == c


def test_self_corrected_solution_passes_the_checker():
    misread = arith.precedence_solution(P)
    fixed = arith.self_corrected(P, misread)
    assert fixed == ("29 * 3 = 87\nWait, step 1 is wrong: 48 + 17 = 65, not 87.\n"
                     "48 + 17 = 65\n65 - 29 = 36\n36 * 3 = 108\n\\boxed{108}")
    assert first_wrong_step(P, fixed) is None and arith.grade(fixed, "108")[0] == "correct"
    assert arith.self_corrected(P, P.solution()) == P.solution()  # nothing to correct
    assert arith.reads_with_precedence(P, misread)
    for text in (P.solution(), fixed, "48 + 17 = 66", "29 * 3 = 88", "garbage", ""):
        assert not arith.reads_with_precedence(P, text), text
    same = ArithProblem(start=5, ops=(("*", 3), ("+", 4)))  # both readings agree
    assert not arith.reads_with_precedence(same, "15 + 4 = 20")


def chat_task():
    from pipeline.config import TaskConfig

    return get_task(TaskConfig(name="arith", chat=True))


def test_chat_prompt_asks_the_question_and_round_trips():
    problem = "Compute left to right: 19 - 5 + 4"
    messages = chat_task().prompt(problem)
    assert messages == [{"role": "user", "content":
                         "What is 19 - 5 + 4? Put the final answer in \\boxed{}."}]
    assert get_task("arith").prompt(problem) == arith.PROMPT_TEMPLATE.format(problem=problem)
    # OpenRLHF hands the rendered prompt back: the problem is found inside the chat template's
    # text (ChatML, as SmolLM2's; the slow test renders the real one)
    rendered = ("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n"
                + messages[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    assert arith.problem_from_prompt(rendered) == problem
    assert arith.parse_problem(arith.problem_from_prompt(rendered)).answer == 18


@pytest.mark.parametrize("response,answer", [
    ("19 - 5 + 4 = 18 is the final answer.", "18"),
    ("19 - 5 = 14\n14 + 4 = 18.", "18"),
    ("So we add 6 and 4, which is 12.\n\nTherefore, the final answer is 12.", "12"),
    ("no number at all", None),
    ("= -7", "-7"),
    ("19 - 5 = 14, so \\boxed{20}", "20"),  # a box wins over the equation
])
def test_chat_answers_without_a_box_are_the_last_integer(response, answer):
    assert chat_task().answer(response) == answer
    assert get_task("arith").answer(response) == arith.extract_boxed(response)  # testbed: box only


def test_chat_grading_end_to_end():
    task = chat_task()
    assert task.fast_verdict(task.answer("19 - 5 + 4 = 18."), "18")[0] == "correct"
    assert task.fast_verdict(task.answer("19 - 5 + 4 = 17."), "18")[0] == "incorrect"
    assert task.answer("I do not know.") is None

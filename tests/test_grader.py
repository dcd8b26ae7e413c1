import time

import pytest

from pipeline.grader import Grader, fast_grade
from stages.tasks import get_task
from stages.tasks import math as math_task
from stages.tasks.base import extract_boxed

MATH = get_task("math")


@pytest.fixture(scope="module")
def grader():
    with Grader(MATH, workers=2, timeout_s=3.0) as g:
        yield g


@pytest.mark.parametrize(
    "response, reference, label",
    [
        ("so \\boxed{0.5}", "\\frac{1}{2}", "correct"),
        ("\\boxed{ 42 }", "42", "correct"),
        ("\\boxed{042}", "42", "correct"),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12", "correct"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", "correct"),
        ("\\boxed{[1,2)}", "[1, 2)", "correct"),
        ("\\boxed{(1,2]}", "[1,2)", "incorrect"),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", "correct"),
        ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", "incorrect"),
        ("first \\boxed{3} then \\boxed{4}", "4", "correct"),
        ("\\boxed{41}", "42", "incorrect"),
        ("The answer is 42.", "42", "no_answer"),
        ("\\boxed{42", "42", "no_answer"),
        ("\\boxed{x^2+1}", "1+x^2", "correct"),
    ],
)
def test_equivalent_forms(grader, response, reference, label):
    [v] = grader.grade([response], [reference])
    assert v.label == label, v


def test_huge_nested_expression_times_out_not_hangs(grader):
    hostile = ["\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}"]
    t = time.time()
    verdicts = grader.grade(hostile + ["\\boxed{1/2}"], ["2", "1", "\\frac{1}{2}"])
    assert time.time() - t < 3.0 * 2 + 10
    assert [v.label for v in verdicts] == ["timeout", "timeout", "correct"]
    assert "3 s" in verdicts[0].reason
    # the pool recovered: later items are graded normally
    assert grader.grade(["\\boxed{0.25}"], ["\\frac14"])[0].label == "correct"


def test_every_item_gets_label_and_reason(grader):
    responses = ["\\boxed{1}", "nothing", "\\boxed{\\sqrt{}}", "\\boxed{}", "\\boxed{2}"]
    verdicts = grader.grade(responses, ["1", "1", "2", "3", "\\frac{4}{2}"])
    assert len(verdicts) == len(responses)
    assert all(v.label in ("correct", "incorrect", "no_answer", "timeout", "error") and v.reason
               for v in verdicts)
    assert [v.label for v in verdicts][:2] == ["correct", "no_answer"]
    assert verdicts[-1].label == "correct"


def test_length_mismatch_and_unknown_task():
    with pytest.raises(ValueError):
        Grader(MATH).grade(["a"], [])
    with pytest.raises(KeyError, match="unknown task 'chess'; tasks: arith, math"):
        get_task("chess")
    with pytest.raises(TypeError, match="needs a task"):
        Grader("math")


def test_fast_path_needs_no_pool():
    assert fast_grade(MATH, "\\boxed{ 7 }", "7").label == "correct"
    assert fast_grade(MATH, "\\boxed{8}", "7").label == "incorrect"
    assert fast_grade(MATH, "\\boxed{x}", "7") is None
    assert fast_grade(get_task("arith"), "\\boxed{7}", "7").label == "correct"


def test_extract_boxed_is_linear_on_huge_input():
    t = time.time()
    assert extract_boxed("\\boxed{" * 20000) is None
    assert time.time() - t < 5
    assert math_task.normalize("\\left( 1 ,2 \\right).") == "(1,2)"
    assert math_task.normalize("58, 500") != math_task.normalize("58,500")


def test_reference_solutions_grade_correct_on_real_data():
    """MATH-500 and GSM8K reference solutions against their own answers (50 of each), and AIME /
    HMMT answers round-tripping: the grader check's agreement target is 99%."""
    from tapo.flows.grader_check import run_check

    report = run_check(limit=50)
    assert report["total"] == 50 * 2 + 30 * 3
    assert report["agreement"] >= 0.99, report["disagreements"]
    assert set(report["per_source"]) == {"math500", "gsm8k", "aime2024", "aime2025",
                                         "hmmt2025_feb"}


def test_gsm8k_final_line_becomes_boxed():
    from tapo.flows.grader_check import gsm8k_response

    assert gsm8k_response("She has 3.\n#### 1,234") == "She has 3.\n\\boxed{1234}"


def test_hung_items_inside_chunks_requeue_the_rest():
    """With many items per worker message, a hung item is still pinpointed: it times out, and
    the unanswered rest of its chunk is graded normally."""
    responses = [f"\\boxed{{\\frac{{{i}}}{{{i + 1}}}}}" for i in range(40)]
    references = [f"\\frac{{{2 * i}}}{{{2 * i + 2}}}" for i in range(40)]
    for hostile in (7, 8, 23):
        responses[hostile] = "\\boxed{9^{9^{9^{9^{9^{9}}}}}}"
    with Grader(MATH, workers=2, timeout_s=2.0) as g:
        verdicts = g.grade(responses, references)
    labels = [v.label for v in verdicts]
    assert [i for i, lab in enumerate(labels) if lab == "timeout"] == [7, 8, 23]
    assert all(lab == "correct" for i, lab in enumerate(labels) if i not in (7, 8, 23))


def test_a_workers_start_up_is_not_an_items_time_out():
    """Spawning a worker and importing math-verify takes longer than this 0.3 s limit; the
    clock starts when the worker is ready, so a plain item still grades (on a loaded machine
    every fresh worker's first item timed out, and each replacement's too)."""
    with Grader(MATH, workers=2, timeout_s=0.3) as g:
        verdicts = g.grade(["\\boxed{0.5}", "\\boxed{\\dfrac{1}{2}}"], ["\\frac{1}{2}", "\\frac12"])
        assert [v.label for v in verdicts] == ["correct", "correct"] and g.restarts == 0


def test_a_worker_that_cannot_start_fails_the_grading(tmp_path, monkeypatch):
    """A broken math-verify install is not every item's `error`: the grading fails, loudly."""
    from pipeline.grader import GraderError

    fake = tmp_path / "math_verify"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('broken math-verify install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # (spawned workers take this process's sys.path)
    with Grader(MATH, workers=1, timeout_s=3.0) as g, pytest.raises(
            GraderError, match="died while starting"):
        g.grade(["\\boxed{0.5}"], ["\\frac{1}{2}"])


def test_a_worker_killed_mid_item_gives_that_item_error_and_the_rest_grade():
    """SIGKILL the worker while it is on a slow item: that item is `error`, the items after it
    grade on a replacement worker, and the restart is counted."""
    import os
    import signal
    import threading

    responses = ["\\boxed{9^{9^{9^{9^{9^{9}}}}}}", "\\boxed{0.5}", "\\boxed{\\dfrac{1}{2}}"]
    references = ["2", "\\frac{1}{2}", "\\frac12"]
    with Grader(MATH, workers=1, timeout_s=30.0) as g:
        result = {}
        thread = threading.Thread(target=lambda: result.update(v=g.grade(responses, references)))
        thread.start()
        deadline = time.time() + 60
        while time.time() < deadline and not (g._workers and g._workers[0].ready
                                               and g._workers[0].chunk):
            time.sleep(0.01)
        time.sleep(0.3)  # well inside the slow item
        os.kill(g._workers[0].proc.pid, signal.SIGKILL)
        thread.join(60)
        labels = [(v.label, v.reason) for v in result["v"]]
        assert labels[0] == ("error", "grader worker died")
        assert [lab for lab, _ in labels[1:]] == ["correct", "correct"]
        assert g.restarts == 1


def test_the_grader_knows_no_task_a_plugin_grades():
    """A task registered outside the project is found by name and graded by its own checker,
    in this process (fast path) and in the pool's workers (verify)."""
    import os

    from tests.fixture_stages import ParityTask

    task = get_task("parity")
    assert isinstance(task, ParityTask) and task.prompt("7") == "Is 7 even or odd?\n"
    with Grader(task, workers=1, timeout_s=10.0) as g:
        verdicts = g.grade(["\\boxed{even}", "\\boxed{odd}", "\\boxed{even}", "none"],
                           ["even", "odd", "odd", "odd"])
    assert [v.label for v in verdicts] == ["correct", "correct", "incorrect", "no_answer"]
    assert verdicts[0].reason == "fast" and verdicts[1].reason.startswith("worker ")
    assert verdicts[1].reason != f"worker {os.getpid()}"  # (another process)

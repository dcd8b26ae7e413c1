"""The judges' prompts: what a model that locates the failure or constructs the trajectory is
asked, and the answer format it is read in. One place, so that the stages that ask
(stages/locate.py, stages/construct.py), the cold start that teaches the format
(stages/sft_examples.py) and the testbed corpus that pretrains it (testbed/base.py) agree.
"""

from __future__ import annotations

import re

from stages.tasks.base import Step

LOCATE_INSTRUCTION = """\
A student solved a problem step by step and got the final answer wrong. Find the first wrong step.

Problem:
{problem}

Student's solution, one numbered step per line:
{steps}

A correct solution, for reference:
{reference}

Which step is the first wrong one? Reply with its number inside <step></step> tags, for \
example <step>2</step>."""

CONSTRUCT_INSTRUCTION = """\
A student's solution to a problem goes wrong at step {k}. Diagnose the mistake and correct it.

Problem:
{problem}

Student's solution, one numbered step per line:
{steps}

A correct solution, for reference (use it to check your work; do not copy it):
{reference}

Reply in exactly this format:
<analysis>what is wrong with step {k}, and what it should be</analysis>
<reconstruction>{what}, ending with the final answer in \\boxed{{}}</reconstruction>"""

WHAT = {
    "prefix": "the corrected reasoning, continuing the student's work from step {k}",
    "full_reconstruction": "a complete corrected solution, from the beginning",
}


def numbered_steps(steps: list[Step]) -> str:
    """A response's steps (Task.split_steps), numbered `[1] ...`, one per line."""
    return "\n".join(f"[{s.index}] {s.text}" for s in steps)


def locate_instruction(problem: str, steps: list[Step], reference: list[Step]) -> str:
    """LOCATE_INSTRUCTION for a wrong response cut into `steps`; the reference's steps are
    numbered the same way, so step k of both can be compared."""
    return LOCATE_INSTRUCTION.format(problem=problem, steps=numbered_steps(steps),
                                     reference=numbered_steps(reference))


def construct_instruction(k: int, problem: str, steps: list[Step], reference: list[Step],
                          mode: str) -> str:
    """CONSTRUCT_INSTRUCTION for a wrong response (cut into `steps`) failing at step k, and a
    construction mode."""
    return CONSTRUCT_INSTRUCTION.format(k=k, problem=problem, steps=numbered_steps(steps),
                                        reference=numbered_steps(reference),
                                        what=WHAT[mode].format(k=k))


def locate_answer(k: int) -> str:
    """The locator's answer naming step k."""
    return f"<step>{k}</step>"


def construct_answer(analysis: str, reconstruction: str) -> str:
    """The constructor's answer: the diagnosis, then the corrected reasoning."""
    return (f"<analysis>{analysis.strip()}</analysis>\n"
            f"<reconstruction>{reconstruction.strip()}</reconstruction>")


STEP_TAG = re.compile(r"<step>\s*(\d{1,6})\s*</step>")
ANALYSIS = re.compile(r"<analysis>(.*?)</analysis>", re.DOTALL)
RECONSTRUCTION = re.compile(r"<reconstruction>(.*?)</reconstruction>", re.DOTALL)

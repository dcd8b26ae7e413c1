"""The flows' stage chains, as data (pipeline/chain.py runs them). Each step reads the step
named as its input; `problems` is written by the flow (pipeline/problems.py), `classify` of
ONLINE is OpenRLHF's graded rollouts."""

from __future__ import annotations

from pipeline.chain import Step
from stages.assemble import Assemble
from stages.classify import Classify
from stages.coldstart_select import ColdstartSelect
from stages.construct import Construct
from stages.locate import Locate
from stages.pick_repair import PickRepair
from stages.sample import Sample
from stages.select import Select
from stages.sft_examples import SftExamples

SAMPLE = [Step("sample", Sample, "problems"), Step("classify", Classify, "sample")]
AUGMENT = [
    Step("select", Select, "classify"),
    Step("locate", Locate, "select"),
    Step("pick_repair", PickRepair, "locate"),
    Step("construct", Construct, "pick_repair"),
]
ASSEMBLE_TAPO = Step("assemble", Assemble, "classify", {"trajectories": "construct"})
ASSEMBLE_GRPO = Step("assemble", Assemble, "classify")

ROUND = {"tapo": [*SAMPLE, *AUGMENT, ASSEMBLE_TAPO],  # algo.name -> a round's chain
         "grpo": [*SAMPLE, ASSEMBLE_GRPO]}
ONLINE = [*AUGMENT, ASSEMBLE_TAPO]  # on rollouts OpenRLHF sampled and graded
EVAL = SAMPLE
COLDSTART = [
    *SAMPLE,
    Step("select", ColdstartSelect, "classify", {"problems": "problems"}),
    Step("locate", Locate, "select"),
    Step("construct", Construct, "locate"),
    Step("examples", SftExamples, "construct", {"located": "locate"}),
]

"""The flows' stage chains, as data (pipeline/chain.py runs them). Each step reads the step
named as its input; `problems` is written by the flow (pipeline/problems.py), `classify` of
ONLINE is OpenRLHF's graded rollouts."""

from __future__ import annotations

from pipeline.chain import Link
from stages.assemble import Assemble
from stages.classify import Classify
from stages.coldstart_select import ColdstartSelect
from stages.construct import Construct
from stages.locate import Locate
from stages.pick_repair import PickRepair
from stages.sample import Sample
from stages.select import Select
from stages.sft_examples import SftExamples

SAMPLE = [Link("sample", Sample, "problems"), Link("classify", Classify, "sample")]
AUGMENT = [
    Link("select", Select, "classify"),
    Link("locate", Locate, "select"),
    Link("pick_repair", PickRepair, "locate"),
    Link("construct", Construct, "pick_repair"),
]
ASSEMBLE_TAPO = Link("assemble", Assemble, "classify", {"trajectories": "construct"})
ASSEMBLE_GRPO = Link("assemble", Assemble, "classify")

ROUND = {"tapo": [*SAMPLE, *AUGMENT, ASSEMBLE_TAPO],  # algo.name -> a round's chain
         "grpo": [*SAMPLE, ASSEMBLE_GRPO]}
ONLINE = [*AUGMENT, ASSEMBLE_TAPO]  # on rollouts OpenRLHF sampled and graded
EVAL = SAMPLE
COLDSTART = [
    *SAMPLE,
    Link("select", ColdstartSelect, "classify", {"problems": "problems"}),
    Link("locate", Locate, "select"),
    Link("construct", Construct, "locate"),
    Link("examples", SftExamples, "construct", {"located": "locate"}),
]

"""TAPO stages, one file each. REGISTRY maps a stage name to `module:Class` for `tapo stage`."""

REGISTRY: dict[str, str] = {
    "sample": "stages.sample:Sample",
    "classify": "stages.classify:Classify",
    "select": "stages.select:Select",
    "locate": "stages.locate:Locate",
    "pick_repair": "stages.pick_repair:PickRepair",
    "construct": "stages.construct:Construct",
    "assemble": "stages.assemble:Assemble",
    "coldstart_select": "stages.coldstart_select:ColdstartSelect",
    "sft_examples": "stages.sft_examples:SftExamples",
}

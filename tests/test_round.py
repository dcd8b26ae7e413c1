"""One whole round on the small testbed model: every stage for real, end to end."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.config import load_config
from pipeline.engines.base import SamplingParams
from pipeline.io import read_pandas
from tapo.cli import main
from tapo.flows.round import run_round

STAGES = ["sample", "classify", "select", "locate", "pick_repair", "construct", "assemble"]


def _check_accounting(here, summary):
    """Every row of every stage is kept or dropped with a reason: nothing lost, nothing twice."""
    stats = summary["stats"]
    problems = summary["stats"]["problems"]["rows_out"]
    assert stats["sample"]["rows_in"] == problems
    for name in ("classify", "locate", "pick_repair", "construct"):
        dropped = sum(v for k, v in stats[name].items() if k.startswith("dropped_"))
        assert stats[name]["rows_out"] + dropped == stats[name]["rows_in"], name
    select_dropped = sum(v for k, v in stats["select"].items() if k.startswith("dropped_"))
    assert summary["candidates"] + select_dropped == problems  # select drops problems
    assert stats["locate"]["rows_in"] == stats["select"]["rows_out"]  # every wrong rollout
    assert stats["pick_repair"]["rows_in"] == stats["locate"]["rows_out"]
    assert stats["pick_repair"]["rows_out"] <= summary["candidates"]  # one per problem at most
    assert stats["construct"]["rows_in"] == stats["pick_repair"]["rows_out"]
    training = read_pandas(here / "assemble")
    assert training["sample_id"].is_unique
    assert (training["kind"] == "augmented").sum() == stats["construct"]["rows_out"]
    assert (training["kind"] == "rollout").sum() == stats["classify"]["rows_out"]
    per_problem = training[training.kind == "augmented"].groupby("problem_id").size()
    assert (per_problem == 1).all()  # at most one trajectory per problem


def test_round_end_to_end_and_resume(small_base, tmp_path):
    cfg = small_base("rollout.problems_per_round=24", "select.p_high=0.75")
    summary = run_round(tmp_path / "run", 1, cfg, progress=False)
    here = tmp_path / "run" / "iter_0001"
    assert summary["reused"] == [] and summary["rollouts"] == 24 * 4
    for name in STAGES:
        assert (here / name / "__stage" / "SUCCESS.json").exists()
    assert summary["candidates"] > 0 and summary["accepted"] == summary["candidates"]
    _check_accounting(here, summary)
    training = read_pandas(here / "assemble")
    aug = training[training.kind == "augmented"]
    assert (aug.reward == 1.0).all()
    assert ((aug.prefix_len + aug.diagnosis_len + aug.correction_len)
            == aug.response_token_ids.map(len)).all()
    assert json.loads((here / "round.json").read_text())["accepted"] == summary["accepted"]

    again = run_round(tmp_path / "run", 1, cfg, progress=False)  # complete: a no-op
    assert again["reused"] == STAGES and again["stats"] == summary["stats"]
    (here / "construct" / "__stage" / "SUCCESS.json").unlink()  # as if killed inside construct
    resumed = run_round(tmp_path / "run", 1, cfg, progress=False)
    assert resumed["reused"] == STAGES[:5] + ["assemble"]
    pd.testing.assert_frame_equal(read_pandas(here / "assemble"), training)


def test_grpo_round_has_no_augmentation(small_base, tmp_path):
    summary = run_round(tmp_path / "run", 1, small_base("algo.name=grpo"), progress=False)
    assert summary["augmented"] == 0 and "candidates" not in summary
    assert not (tmp_path / "run" / "iter_0001" / "select").exists()


def test_rounds_draw_different_problems(small_base, tmp_path):
    cfg = small_base("rollout.problems_per_round=8", "algo.name=grpo")
    base = cfg.testbed.base_dir + "/model"  # round 2 without training round 1: --model
    ids = [set(read_pandas(tmp_path / "run" / f"iter_{k:04d}" / "problems")["problem_id"])
           for k in (1, 2) if run_round(tmp_path / "run", k, cfg, progress=False, model=base)]
    assert len(ids[0]) == len(ids[1]) == 8 and not ids[0] & ids[1]


def test_llm_locator_and_constructor_live_with_the_testbed_model(small_base, tmp_path):
    """The testbed model cannot follow the instructions: every malformed answer must be a
    counted rejection, and the round must still complete."""
    cfg = small_base("locate.method=llm", "construction.method=llm", "select.p_high=1",
                     "locate.max_tokens=24", "construction.max_tokens=48")
    summary = run_round(tmp_path / "run", 1, cfg, progress=False)
    _check_accounting(tmp_path / "run" / "iter_0001", summary)
    stats = summary["stats"]
    assert stats["locate"]["rows_in"] > 0
    rejected = (stats["locate"]["rows_in"] - stats["locate"]["rows_out"]
                + stats["construct"]["rows_in"] - stats["construct"]["rows_out"])
    assert rejected > 0
    excluded = pd.read_parquet(tmp_path / "run/iter_0001/locate/__excluded/part-00000.parquet")
    assert set(excluded["reason"]) <= {"locator_unparseable", "locator_out_of_range"}


def test_cli_round_and_status(small_base, tmp_path, capsys):
    cfg = small_base("policy.path=")  # round 1 from the testbed base, which is there
    run = tmp_path / "run"
    argv = ["round", str(run), "--iteration", "1", "--config", str(cfg_path := tmp_path / "c.yaml")]
    from pipeline.config import write_resolved

    write_resolved(cfg, cfg_path)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "select" in out and "candidates" in out
    assert (run / "config.yaml").exists() and (run / "iter_0001" / "round.json").exists()
    assert main(["status", str(run)]) == 0
    assert "construct" in capsys.readouterr().out
    assert main(["round", str(run), "--iteration", "0"]) != 0
    base = cfg.testbed.base_dir + "/model"  # --model: this call's policy, not the run's config
    assert main(["round", str(run), "--iteration", "1", "--model", base]) == 0
    assert "policy " + base in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["policy"]["path"] == ""


def test_a_round_never_builds_a_model(small_base, tmp_path):
    """With no policy, no cold-start model and no testbed base, round 1 is an error that names
    the command; iterate (and make iterate) build the base first."""
    from tapo.flows.round import resolve_policy

    cfg = small_base("policy.path=", f"testbed.base_dir={tmp_path / 'no-base'}")
    with pytest.raises(FileNotFoundError, match="`tapo base` installs it"):
        resolve_policy(tmp_path / "run", 1, cfg)
    assert not (tmp_path / "no-base").exists()


def test_testbed_settings_are_in_no_stage_fingerprint_of_a_math_run(small_base, tmp_path):
    """Under configs/math.yaml (a policy given by path), changing the testbed's settings
    changes no stage's fingerprint: nothing would re-run."""
    from pipeline.config import load_config
    from pipeline.runner import stage_fingerprint
    from pipeline.stage import load_stage_class
    from stages import REGISTRY

    model = small_base().policy.path
    math = [f"policy.path={model}", "rollout.problems=data/aime2024.jsonl"]
    before = load_config("configs/math.yaml", math)
    after = load_config("configs/math.yaml", [*math, "testbed.steps=7", "testbed.lr=0.5",
                                              f"testbed.base_dir={tmp_path}"])
    for name in REGISTRY:
        stage = load_stage_class(name, REGISTRY)
        assert stage_fingerprint(stage, before, {}, {}) == \
            stage_fingerprint(stage, after, {}, {}), name


def test_problem_files_name_the_place_and_exclude_bad_rows(small_base, tmp_path, capsys):
    from pipeline.problems import write_problems

    good = '{"id": "a", "problem": "Compute left to right: 1 + 2", "answer": 3}'
    broken = tmp_path / "problems.jsonl"
    broken.write_text(good + "\n" + '{"id": "b", "problem": nul}\n')
    with pytest.raises(ValueError, match="problems.jsonl line 2: not valid JSON"):
        write_problems(broken, tmp_path / "p1", 0, None, 0, 8)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(good.encode() + b"\n" + '{"id": "é"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match="latin.jsonl is not UTF-8 text: byte 0xe9 on line 2"):
        write_problems(latin, tmp_path / "p2", 0, None, 0, 8)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([good, '{"id": "b", "problem": "x"}', "",
                                '{"problem": "Compute left to right: 2 + 2", "answer": "4"}',
                                '{"id": "d", "problem": "  ", "answer": "1"}', "[1, 2]",
                                '{"id": "e", "problem": "Compute left to right: 3 + 3", '
                                '"answer": "6"}']))
    stats = write_problems(mixed, tmp_path / "p3", 0, None, 0, 8)
    assert stats == {"rows_in": 6, "rows_out": 2, "dropped_bad_problem": 4}
    excluded = read_pandas(tmp_path / "p3" / "__excluded")
    assert list(excluded["line"]) == [2, 4, 5, 6]  # the file's own line numbers
    assert set(excluded["reason"]) == {"bad_problem"}
    assert excluded["detail"][0] == "mixed.jsonl line 2: no answer"
    assert sorted(read_pandas(tmp_path / "p3")["problem_id"]) == ["a", "e"]
    run = tmp_path / "run"  # the round says where, and fails
    assert main(["round", str(run), "--iteration", "1", "--config", str(_cfg(small_base, tmp_path)),
                 f"rollout.problems={broken}"]) == 1
    assert "problems.jsonl line 2: not valid JSON" in capsys.readouterr().err


def _cfg(small_base, tmp_path):
    from pipeline.config import write_resolved

    return write_resolved(small_base(), tmp_path / "cfg.yaml")


def test_a_model_that_cannot_load_fails_the_stage(small_base, tmp_path, capsys):
    """`tapo stage sample` with a policy that is not there: exit 1, the error shown, no
    _SUCCESS (it used to mark sample complete with every row dropped as `error`), and
    `tapo round` names the missing policy."""
    run_round(tmp_path / "ok", 1, small_base("algo.name=grpo"), progress=False)
    problems = tmp_path / "ok" / "iter_0001" / "problems"
    cfg = _cfg(small_base, tmp_path)
    argv = ["stage", "sample", "--in", str(problems), "--out", str(tmp_path / "s"),
            "--config", str(cfg), f"policy.path={tmp_path / 'nonexistent'}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "rows of a shard raised the same error" in err and "nonexistent" in err
    assert not (tmp_path / "s" / "__stage" / "SUCCESS.json").exists()
    assert main(["round", str(tmp_path / "r"), "--iteration", "1", "--config", str(cfg),
                 f"policy.path={tmp_path / 'nonexistent'}"]) == 1
    assert "policy.path: no model directory at" in capsys.readouterr().err


def _tapo_vllm(args, small_base, tmp_path, timeout):
    """`tapo ARGS` in a new process on the small testbed with the vllm engine; its console
    (stdout and stderr) once it exited 0."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tapo", *args, "--config",
                           str(_cfg(small_base, tmp_path)), "engine.backend=vllm"],
                          capture_output=True, text=True, timeout=timeout)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    return console


def test_round_with_vllm_engine_keeps_its_logs_off_the_console(small_base, tmp_path):
    """A real vLLM round from the CLI: the console has our progress and round lines, vLLM's
    warnings are in RUN_DIR/engine.log."""
    run = tmp_path / "run"
    console = _tapo_vllm(["round", str(run), "--iteration", "1"], small_base, tmp_path, 600)
    assert "round 1 (tapo)" in console and "engine logs:" in console
    vllm_line = re.compile(r"\[[a-z_]+\.py:\d+\]")  # vLLM's log lines name file:line
    assert "WARNING" not in console and not vllm_line.search(console), console[-2000:]
    log = (run / "engine.log").read_text()
    assert "WARNING" in log and vllm_line.search(log)
    summary = json.loads((run / "iter_0001" / "round.json").read_text())
    assert summary["rollouts"] == 16 * 4
    _check_accounting(run / "iter_0001", summary)


@pytest.mark.slow  # about a minute: a second process imports vLLM
def test_a_seeded_round_samples_the_same_in_another_process_with_one_thread(small_base,
                                                                            tmp_path):
    """Round 1 with the vllm engine, here (with two threads, the kept engine having drawn
    samples before) and in a new process with one thread: the same rollouts, token for token
    (per-request seeds; what a seeded compare's first round relies on)."""
    import os
    import subprocess
    import sys

    from pipeline.engines import kept_engine

    cfg = small_base("engine.backend=vllm")
    kept_engine(cfg.engine, cfg.testbed.base_dir + "/model", seed=cfg.run.seed).generate(
        ["Q: 1 + 1\nA:\n"], 3, SamplingParams(temperature=1.0, max_tokens=8))
    run_round(tmp_path / "here", 1, cfg, progress=False)
    done = subprocess.run([sys.executable, "-m", "tapo", "round", str(tmp_path / "there"),
                           "--iteration", "1", "--config", str(_cfg(small_base, tmp_path)),
                           "engine.backend=vllm"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    columns = ["rollout_id", "response_token_ids", "prompt_token_ids"]
    here, there = (read_pandas(tmp_path / d / "iter_0001" / "sample", columns=columns)
                   for d in ("here", "there"))
    assert len(here) == 16 * 4
    pd.testing.assert_frame_equal(here, there)


def test_each_stage_runs_alone_from_the_cli(small_base, tmp_path):
    """`tapo stage NAME` on the round's tiny shards reproduces the round's output."""
    from pipeline.config import write_resolved

    cfg = small_base("select.p_high=1")
    run_round(tmp_path / "run", 1, cfg, progress=False)
    here, alone = tmp_path / "run" / "iter_0001", tmp_path / "alone"
    write_resolved(cfg, cfg_path := tmp_path / "c.yaml")
    inputs = {"sample": here / "problems", "classify": alone / "sample",
              "select": alone / "classify", "locate": alone / "select",
              "pick_repair": alone / "locate", "construct": alone / "pick_repair",
              "assemble": alone / "classify"}
    for name, source in inputs.items():
        side = ["--side", f"trajectories={alone / 'construct'}"] if name == "assemble" else []
        argv = ["stage", name, "--in", str(source), "--out", str(alone / name), *side,
                "--config", str(cfg_path)]
        assert main(argv) == 0, name
        pd.testing.assert_frame_equal(read_pandas(alone / name), read_pandas(here / name))


def test_in_memory_chain_gives_the_rounds_rows(small_base, tmp_path):
    """The OpenRLHF adapter's driver (run_chain_in_memory over the ONLINE chain) and the round
    on disk make the same training rows from the same graded rollouts, value for value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.chain import run_chain_in_memory
    from pipeline.io import list_parts
    from stages.schema import TRAINING
    from tapo.flows.chains import ONLINE

    cfg = small_base("rollout.problems_per_round=24", "select.p_high=0.75")
    summary = run_round(tmp_path / "run", 1, cfg, progress=False)
    here = tmp_path / "run" / "iter_0001"
    cfg = cfg.model_copy(update={"policy": cfg.policy.model_copy(
        update={"path": summary["policy"]})})
    rollouts = [r for p in list_parts(here / "classify") for r in pq.read_table(p).to_pylist()]
    rows = run_chain_in_memory(ONLINE, cfg, {"classify": rollouts})
    assert summary["accepted"] > 0 and len(rows["construct"]) == summary["accepted"]
    on_disk = pa.concat_tables(pq.read_table(p) for p in list_parts(here / "assemble"))
    in_memory = pa.Table.from_pylist(rows["assemble"], schema=TRAINING)
    order = [("sample_id", "ascending")]  # (on disk, each shard's trajectories follow it)
    assert in_memory.sort_by(order).equals(on_disk.sort_by(order))


@pytest.mark.slow
def test_iterate_with_vllm_loads_each_checkpoint_into_one_engine(small_base, tmp_path):
    """Two rounds of `tapo iterate` with vllm: round 2's checkpoint is loaded into the engine
    round 1 built (no second engine), and round 2 samples from it."""
    run = tmp_path / "run"
    console = _tapo_vllm(["iterate", str(run), "--rounds", "2"], small_base, tmp_path, 1200)
    assert f"loaded {run / 'models' / 'iter_0001'} into the running vllm engine" in console
    assert "building a new" not in console
    assert (json.loads((run / "iter_0002" / "round.json").read_text())["policy"]
            == str(run / "models" / "iter_0001"))


def test_another_task_without_problems_is_an_error_not_the_testbed(tmp_path):
    """configs/math.yaml with `rollout.problems` left empty: a clear error before anything runs
    (before: the testbed's arithmetic, sampled from a math model)."""
    from tapo.flows.round import problem_file, problem_pool

    cfg = load_config(Path("configs/math.yaml"), [f"testbed.base_dir={tmp_path / 'tb'}"])
    with pytest.raises(ValueError, match="rollout.problems is empty: the 'math' task needs"):
        problem_pool(cfg)
    assert problem_file(cfg, "coldstart.heldout", "heldout", required=False) is None
    assert not (tmp_path / "tb").exists()  # no arithmetic generated for it
    given = load_config(Path("configs/math.yaml"), ["rollout.problems=data/aime2024.jsonl"])
    assert problem_pool(given) == Path("data/aime2024.jsonl")


class RecordingConfig:
    """A Config that records the sections read from it (a stage's `config.<section>`)."""

    def __init__(self, cfg, read: set[str]) -> None:
        self._cfg, self._read = cfg, read

    def __getattr__(self, name):
        from pipeline.config import Config

        if name in Config.model_fields:
            self._read.add(name)
        return getattr(self._cfg, name)


@pytest.mark.parametrize("chain", ["round", "coldstart"])
def test_every_stage_fingerprints_the_sections_it_reads(small_base, tmp_path, chain):
    """Each stage of a TAPO round and of the cold start, built and run on real rows with a
    config that records what is read: every section it reads (building, processing, naming
    its models) is in its `sections`, so a change there re-runs it."""
    from pipeline.chain import run_chain_in_memory
    from pipeline.io import read_pandas
    from tapo.flows.chains import COLDSTART, ROUND
    from tapo.flows.round import write_round_problems

    cfg = small_base("select.p_high=1")
    write_round_problems(cfg, 1, tmp_path / "problems")
    problems = read_pandas(tmp_path / "problems").to_dict("records")
    steps = ROUND["tapo"] if chain == "round" else COLDSTART
    read = {link.out: set() for link in steps}
    built = {link.out: link.stage(RecordingConfig(cfg, read[link.out])) for link in steps}
    try:
        rows = run_chain_in_memory(steps, cfg, {"problems": problems}, stages=built)
    finally:
        for stage in built.values():
            stage.close()
    assert rows[steps[-1].out], "the chain produced no rows: nothing was exercised"
    for step in steps:
        step.stage.models_state(RecordingConfig(cfg, read[step.out]))
        step.stage.runs_model(RecordingConfig(cfg, read[step.out]))
        missing = read[step.out] - set(step.stage.sections)
        assert not missing, f"{step.stage.name} reads {sorted(missing)}, not in its sections"

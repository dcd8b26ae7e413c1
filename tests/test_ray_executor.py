"""runner.executor=ray on a local Ray instance (2 CPUs): the same part files as the local
executor, a worker killed mid-shard retried with nothing lost or duplicated, errors that keep
their type, a real testbed round."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.io import list_parts
from pipeline.runner import run_stage
from pipeline.stage import EXCLUDED, MARKERS, StageFailed
from tests.fixture_stages import AlwaysDies, DiesOnce, NeedsModel, Square, Total

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    yield
    from pipeline.ray_executor import release_workers

    release_workers()
    ray.shutdown()


def config(*extra):
    return load_config(None, ["runner.executor=ray", "runner.workers=2", *extra])


def files(d: Path) -> dict[str, bytes]:
    """Every part file (kept and excluded) of a stage directory, by name."""
    parts = list_parts(d) + (list_parts(d / EXCLUDED) if (d / EXCLUDED).is_dir() else [])
    return {str(p.relative_to(d)): p.read_bytes() for p in parts}


def test_ray_gives_the_local_executors_files(shards, tmp_path):
    src = shards()
    local = run_stage(Square, load_config(None), src, tmp_path / "local", progress=False)
    on_ray = run_stage(Square, config(), src, tmp_path / "ray", progress=False)
    assert on_ray.stats == local.stats and local.stats["rows_in"] == 30
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    assert len(files(tmp_path / "ray")) == 6 + 2  # 6 kept parts; excluded: x < 0, x == 13
    again = run_stage(Square, config(), src, tmp_path / "ray", progress=False)
    assert again.skipped


def test_release_returns_once_the_workers_are_gone(shards, tmp_path):
    """release_workers (iterate calls it before a GPU training launch) returns after every
    worker process has ended, not when the kill was sent; the next stage gets new workers."""
    from pipeline.ray_executor import release_workers

    run_stage(Square, config(), shards(), tmp_path / "a", progress=False)
    pids = release_workers()
    assert len(pids) == 2

    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            return False

    assert not any(running(pid) for pid in pids)
    run_stage(Square, config(), shards(), tmp_path / "b", progress=False)
    assert files(tmp_path / "b") == files(tmp_path / "a")


def test_cli_runs_a_stage_on_ray(shards, tmp_path):
    import json

    from tapo.cli import main

    src = shards()
    assert main(["stage", "tests.fixture_stages:Square", "--in", str(src), "--out",
                 str(tmp_path / "out"), "--executor", "ray", "--workers", "2"]) == 0
    manifest = tmp_path / "out" / "__stage" / "SUCCESS.json"
    assert json.loads(manifest.read_text())["executor"] == "ray"
    run_stage(Square, load_config(None), src, tmp_path / "local", progress=False)
    assert files(tmp_path / "out") == files(tmp_path / "local")


def test_worker_killed_mid_shard_is_retried(shards, tmp_path):
    src = shards()
    flag = tmp_path / "killed"
    flag.touch()  # (the local run must not kill pytest)
    run_stage(DiesOnce, load_config(None, [f"policy.path={flag}"]), src, tmp_path / "local",
              progress=False)
    flag.unlink()
    result = run_stage(DiesOnce, config(f"policy.path={flag}"), src, tmp_path / "ray",
                       progress=False)
    assert flag.exists()  # a worker was killed
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    assert result.stats["rows_in"] == 30 and result.stats["rows_out"] == 26
    assert len(list((tmp_path / "ray" / MARKERS).glob("*.json"))) == 6


def test_worker_that_keeps_dying_fails_the_stage(shards, tmp_path):
    with pytest.raises(StageFailed, match="died 2 times"):
        run_stage(AlwaysDies, config("runner.retries=1"), shards(), tmp_path / "out",
                  progress=False)
    assert not (tmp_path / "out" / "__stage" / "SUCCESS.json").exists()


def test_stage_errors_keep_their_type(shards, tmp_path):
    with pytest.raises(StageFailed, match="^stage 'needs_model': all 5 rows .* same error"):
        run_stage(NeedsModel, config(f"policy.path={tmp_path / 'missing'}"), shards(),
                  tmp_path / "out", progress=False)


def test_whole_input_stage_is_one_unit(shards, tmp_path):
    result = run_stage(Total, config(), shards(), tmp_path / "out", progress=False)
    assert result.stats == {"rows_in": 30, "rows_out": 1}
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist() == [
        {"n": 30, "sum": sum(range(30)) - 3 * 30}]


def test_output_a_worker_cannot_see_fails_with_the_reason(shards, tmp_path):
    from pipeline.ray_executor import _actors, _check_visible, _connect

    ray_mod = _connect("")
    actors = _actors(ray_mod, 1, 0.0, 0)
    with pytest.raises(StageFailed, match="cannot see .*/elsewhere.*every node mounts"):
        _check_visible(ray_mod, actors, tmp_path / "out", tmp_path / "elsewhere" / "part.parquet")


def test_testbed_round_on_ray_matches_local(small_base, tmp_path):
    from tapo.flows.round import run_round

    extra = ("select.p_high=1", "rollout.problems_per_round=24", "rollout.shard_size=8")
    run_round(tmp_path / "local", 1, small_base(*extra), progress=False)
    run_round(tmp_path / "ray", 1, small_base(*extra, "runner.executor=ray", "runner.workers=2"),
              progress=False)
    stages = sorted(p.name for p in (tmp_path / "local" / "iter_0001").iterdir() if p.is_dir())
    assert {"sample", "construct", "assemble"} <= set(stages)
    for stage in stages:
        local = files(tmp_path / "local" / "iter_0001" / stage)
        assert local, stage
        assert files(tmp_path / "ray" / "iter_0001" / stage) == local, stage

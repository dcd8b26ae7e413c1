import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.io import read_pandas, write_table_atomic
from pipeline.runner import run_stage
from pipeline.stage import load_stage_class
from tapo.status import render_status
from tests.fixture_stages import SCHEMA_IN, AddSide, GroupSum, Square, Total

CFG = load_config()
EXPECTED_IDS = [i for i in range(30) if i >= 3 and i != 16]  # x<0 dropped; x==13 raises


def test_excluded_accounting_and_bad_row(shards, tmp_path):
    out = tmp_path / "out"
    res = run_stage(Square, CFG, shards(), out, progress=False)
    assert not res.skipped
    kept = read_pandas(out)
    assert sorted(kept["id"]) == EXPECTED_IDS
    assert (kept["y"] == kept["x"] ** 2).all()
    excluded = read_pandas(out / "__excluded")
    assert sorted(excluded["id"]) == [0, 1, 2, 16]
    reasons = dict(zip(excluded["id"], excluded["reason"]))
    assert reasons == {0: "negative", 1: "negative", 2: "negative", 16: "error"}
    assert "unlucky row 16" in excluded.set_index("id").loc[16, "detail"]
    stats = json.loads((out / "__stage" / "stats.json").read_text())
    assert stats == {"rows_in": 30, "rows_out": 26, "dropped_error": 1, "dropped_negative": 3}
    manifest = json.loads((out / "__stage" / "SUCCESS.json").read_text())
    assert manifest["rows"] == stats and manifest["stage"] == "square"
    assert {"fingerprint", "inputs", "versions", "git_commit", "config"} <= set(manifest)
    assert manifest["versions"]["pyarrow"]


def test_a_stage_directory_reads_as_a_dataset_of_its_kept_rows(shards, tmp_path):
    """The one call every pandas (or datasets) user tries first gives exactly the kept rows:
    the excluded rows and the metadata are under `__` directories, which both skip."""
    import datasets

    out = tmp_path / "out"
    run_stage(Square, CFG, shards(), out, progress=False)
    assert (out / "__excluded").is_dir() and (out / "__stage" / "SUCCESS.json").exists()
    assert sorted(pd.read_parquet(out)["id"]) == EXPECTED_IDS
    ds = datasets.load_dataset("parquet", data_dir=str(out), split="train")
    assert sorted(ds["id"]) == EXPECTED_IDS and "reason" not in ds.column_names


def test_a_directory_of_the_layout_before_is_rebuilt_without_its_files(shards, tmp_path):
    """A stage directory written before the dataset layout (`_SUCCESS`, `stats.json`,
    `_shards/`, `excluded/` beside the parts) is recomputed, and none of those stays."""
    out, inp = tmp_path / "out", shards()
    run_stage(Square, CFG, inp, out, progress=False)
    kept = read_pandas(out)
    (out / "__stage").rename(out / "_shards")  # (any old metadata: removed, all recomputed)
    (out / "__excluded").rename(out / "excluded")
    for name in ("_SUCCESS", "stats.json"):
        (out / name).write_text("{}")
    assert not run_stage(Square, CFG, inp, out, progress=False).skipped
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("part-")) == \
        ["__excluded", "__stage"]
    pd.testing.assert_frame_equal(read_pandas(out), kept)


def test_rerun_is_noop_and_changes_rerun(shards, tmp_path):
    inp, out = shards(), tmp_path / "out"
    run_stage(Square, CFG, inp, out, progress=False)
    mtime = (out / "part-00000.parquet").stat().st_mtime_ns
    assert run_stage(Square, CFG, inp, out, progress=False).skipped
    assert (out / "part-00000.parquet").stat().st_mtime_ns == mtime

    # a config section the stage reads changes its fingerprint ...
    changed = load_config(None, ["run.seed=1"])
    assert not run_stage(Square, changed, inp, out, progress=False).skipped
    # ... a section it does not read does not
    unrelated = load_config(None, ["run.seed=1", "testbed.steps=3"])
    assert run_stage(Square, unrelated, inp, out, progress=False).skipped

    # a changed input file re-runs, and stale shards are not kept
    write_table_atomic(pd.DataFrame({"id": [100], "x": [5]}), inp / "part-00000.parquet",
                       schema=SCHEMA_IN)
    assert not run_stage(Square, unrelated, inp, out, progress=False).skipped
    assert 100 in set(read_pandas(out)["id"]) and 3 not in set(read_pandas(out)["id"])


def test_workers_give_identical_output(shards, tmp_path):
    inp = shards()
    run_stage(Square, CFG, inp, tmp_path / "one", workers=1, progress=False)
    run_stage(Square, CFG, inp, tmp_path / "two", workers=2, progress=False)
    pd.testing.assert_frame_equal(read_pandas(tmp_path / "one"), read_pandas(tmp_path / "two"))


def test_runner_executor_picks_one_executor_interface():
    """`local`: serial with one worker, a process pool with more; `ray`: Ray actors; each is
    an Executor (`run(job, pending, on_done)`)."""
    from pipeline.executors import (
        ProcessPoolExecutor,
        RayExecutor,
        SerialExecutor,
        executor_for,
    )

    assert isinstance(executor_for(CFG, 1), SerialExecutor)
    pool = executor_for(CFG, 3)
    assert isinstance(pool, ProcessPoolExecutor) and pool.workers == 3
    ray = executor_for(load_config(None, ["runner.executor=ray"]), 2)
    assert isinstance(ray, RayExecutor) and ray.workers == 2


def test_whole_input_stage(shards, tmp_path):
    run_stage(Total, CFG, shards(), tmp_path / "t", progress=False)
    assert read_pandas(tmp_path / "t").to_dict("records") == [{"n": 30, "sum": sum(range(-3, 27))}]


def test_side_input_read_whole_and_fingerprinted(shards, tmp_path):
    inp = shards()
    side = shards(n_shards=2, rows=2, where=tmp_path / "side")  # x = -3, -2, -1, 0
    with pytest.raises(FileNotFoundError, match="not a complete stage directory"):
        run_stage(AddSide, CFG, inp, tmp_path / "out", side={"extra": side}, progress=False)
    run_stage(Total, CFG, side, tmp_path / "total", progress=False)  # complete: has its manifest
    side_dir = tmp_path / "total"
    with pytest.raises(ValueError, match="no side input"):
        run_stage(AddSide, CFG, inp, tmp_path / "out", side={"other": side_dir}, progress=False)

    write_table_atomic(pd.DataFrame({"id": [0, 1], "x": [5, 7]}), side_dir / "part-00000.parquet",
                       schema=SCHEMA_IN)
    res = run_stage(AddSide, CFG, inp, tmp_path / "out", side={"extra": side_dir},
                    workers=2, progress=False)
    assert sorted(read_pandas(tmp_path / "out")["x"]) == [i - 3 + 12 for i in range(30)]
    assert run_stage(AddSide, CFG, inp, tmp_path / "out", side={"extra": side_dir},
                     progress=False).skipped
    write_table_atomic(pd.DataFrame({"id": [0], "x": [1]}), side_dir / "part-00000.parquet",
                       schema=SCHEMA_IN)  # a changed side input re-runs the stage
    assert not run_stage(AddSide, CFG, inp, tmp_path / "out", side={"extra": side_dir},
                         progress=False).skipped
    assert sorted(read_pandas(tmp_path / "out")["x"]) == [i - 3 + 1 for i in range(30)]
    assert not res.skipped
    # without the side input the stage sees an empty list
    run_stage(AddSide, CFG, inp, tmp_path / "bare", progress=False)
    assert sorted(read_pandas(tmp_path / "bare")["x"]) == [i - 3 for i in range(30)]


def test_group_stage_fails_instead_of_row_retry(shards, tmp_path):
    with pytest.raises(ValueError, match="unlucky group"):
        run_stage(GroupSum, CFG, shards(), tmp_path / "g", progress=False)


def test_input_schema_checked(tmp_path):
    write_table_atomic(pd.DataFrame({"id": [1]}), tmp_path / "in" / "part-00000.parquet")
    with pytest.raises(Exception, match="missing column 'x'"):
        run_stage(Square, CFG, tmp_path / "in", tmp_path / "out", progress=False)


def _cli(*args, env=None):
    return [sys.executable, "-m", "tapo", *args]


def test_resume_after_sigkill(shards, tmp_path):
    """SIGKILL a real `tapo stage` process mid-run, start it again: the output equals an
    uninterrupted run's, row for row, with no duplicates, and finished shards are kept."""
    inp = shards(n_shards=6)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_stage(Square, CFG, inp, ref, progress=False)

    stage = "tests.fixture_stages:Square"
    env = {**os.environ, "SQUARE_SLEEP": "0.7"}
    proc = subprocess.Popen(_cli("stage", stage, "--in", str(inp), "--out", str(out)), env=env)
    deadline = time.time() + 60
    while len(list((out / "__stage" / "shards").glob("*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (out / "__stage" / "shards").glob("*.json"))
    assert 2 <= len(done_before) < 6 and not (out / "__stage" / "SUCCESS.json").exists()
    kept_mtime = (out / "part-00000.parquet").stat().st_mtime_ns

    r = subprocess.run(_cli("stage", stage, "--in", str(inp), "--out", str(out)),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "part-00000.parquet").stat().st_mtime_ns == kept_mtime  # not recomputed
    got, want = read_pandas(out), read_pandas(ref)
    pd.testing.assert_frame_equal(got, want)
    assert got["id"].is_unique
    pd.testing.assert_frame_equal(read_pandas(out / "__excluded"), read_pandas(ref / "__excluded"))
    assert json.loads((out / "__stage" / "stats.json").read_text()) == json.loads(
        (ref / "__stage" / "stats.json").read_text())
    assert not list(out.glob(".*.tmp"))


def test_cli_stage_status_and_errors(shards, tmp_path):
    inp, run = shards(), tmp_path / "run"
    out = run / "iter_0001" / "square"
    r = subprocess.run(_cli("stage", "tests.fixture_stages:Square", "--in", str(inp), "--out",
                            str(out), "run.seed=3"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "rows_out" in r.stdout
    r = subprocess.run(_cli("stage", "tests.fixture_stages:Square", "--in", str(inp), "--out",
                            str(out), "run.seed=3"), capture_output=True, text=True)
    assert "already complete" in r.stdout

    table = render_status(run)
    assert "iter_0001/square" in table and "complete" in table
    assert "negative=3" in table and "error=1" in table and "30" in table and "26" in table
    r = subprocess.run(_cli("status", str(run)), capture_output=True, text=True)
    assert r.returncode == 0 and "iter_0001/square" in r.stdout

    r = subprocess.run(_cli("stage", "nope", "--in", str(inp), "--out", str(out)),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown stage 'nope'" in r.stderr
    r = subprocess.run(_cli("stage", "tests.fixture_stages:Square", "--in", str(inp), "--out",
                            str(out), "run.bogus=1"), capture_output=True, text=True)
    assert r.returncode == 2 and "run.bogus" in r.stderr


def test_load_stage_class_rejects_non_stage():
    with pytest.raises(TypeError):
        load_stage_class("pipeline.io:SchemaError")


def test_same_error_on_every_row_fails_the_stage(shards, tmp_path):
    """A model that cannot load is not a bad row: the stage fails, with the error, no manifest
    and no part file (before the fix every row was dropped as `error` and the stage passed)."""
    from pipeline.stage import StageFailed
    from tests.fixture_stages import NeedsModel

    out = tmp_path / "out"
    cfg = load_config(None, [f"policy.path={tmp_path / 'missing-model'}"])
    with pytest.raises(StageFailed, match="all 5 rows of a shard raised the same error.*"
                                          "missing-model"):
        run_stage(NeedsModel, cfg, shards(), out, progress=False)
    assert not (out / "__stage" / "SUCCESS.json").exists()
    assert not list(out.glob("part-*.parquet"))
    (tmp_path / "missing-model").write_text("weights")  # fixed: the same call now succeeds
    assert run_stage(NeedsModel, cfg, shards(), out, progress=False).stats["rows_out"] == 30


def test_error_share_above_the_limit_fails_the_stage(shards, tmp_path):
    """One row in 30 raises (3.3%): fine under the default 10%, a failure under 2%."""
    from pipeline.stage import StageFailed

    strict = load_config(None, ["runner.max_error_share=0.02"])
    with pytest.raises(StageFailed, match=r"1 of 30 rows raised errors.*0\.02.*unlucky row 16"):
        run_stage(Square, strict, shards(), tmp_path / "strict", progress=False)
    assert not (tmp_path / "strict" / "__stage" / "SUCCESS.json").exists()
    assert run_stage(Square, CFG, shards(), tmp_path / "ok", progress=False).stats[
        "dropped_error"] == 1

from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.io import part_name, write_table_atomic
from tests.fixture_stages import SCHEMA_IN

SMALL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "testbed-small.yaml"


@pytest.fixture(scope="session", autouse=True)
def release_kept_engine():
    """Ends the engine tests left in this process (engines.kept_engine) while pytest's output
    is still open (vLLM logs as it shuts down)."""
    yield
    from pipeline.engines import release_engine

    release_engine()


@pytest.fixture
def shards(tmp_path):
    """An input stage dir of 6 shards x 5 rows: ids 0..29, x = id - 3 (ids 0-2 negative)."""

    def make(n_shards=6, rows=5, where=None):
        d = where or tmp_path / "in"
        for s in range(n_shards):
            ids = list(range(s * rows, (s + 1) * rows))
            df = pd.DataFrame({"id": ids, "x": [i - 3 for i in ids]})
            write_table_atomic(df, d / part_name(s), schema=SCHEMA_IN)
        return d

    return make


@pytest.fixture(scope="session")
def small_base(tmp_path_factory):
    """The small testbed (configs/testbed-small.yaml) built once per session (about 20 s):
    returns a function giving its config with extra overrides."""
    from testbed.base import build_base

    base = tmp_path_factory.mktemp("small") / "base"
    overrides = [f"testbed.base_dir={base}", "engine.backend=hf", f"policy.path={base / 'model'}",
                 f"policy.coldstart={base.parent / 'no-coldstart'}"]
    build_base(load_config(SMALL_CONFIG, overrides).testbed, base)

    def config(*extra: str):
        return load_config(SMALL_CONFIG, overrides + list(extra))

    return config


@pytest.fixture(scope="session")
def shard(small_base, tmp_path_factory):
    """(config, policy, assembled shard dir) of one TAPO round on the small testbed, with
    augmented trajectories; shared by the trainer tests of both backends."""
    from tapo.flows.round import run_round

    cfg = small_base("select.p_high=1", "rollout.problems_per_round=24")
    run = tmp_path_factory.mktemp("shard")
    summary = run_round(run, 1, cfg, progress=False)
    assert summary["augmented"] > 0
    return cfg, summary["policy"], run / "iter_0001" / "assemble"


@pytest.fixture(scope="session")
def small_run(small_base, tmp_path_factory):
    """A two-round TAPO run on the small testbed (every candidate selected, so each round has
    trajectories and drops), for the viewer and the report; read it, do not change it."""
    from tapo.flows.iterate import iterate

    run = tmp_path_factory.mktemp("small_run") / "run"
    iterate(run, 2, small_base("select.p_high=1", "select.budget_fraction=0.2"), progress=False)
    return run

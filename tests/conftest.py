import pandas as pd
import pytest

from pipeline.io import part_name, write_table_atomic
from tests.fixture_stages import SCHEMA_IN


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

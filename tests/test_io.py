import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest

from pipeline.io import (
    SchemaError,
    check_schema,
    iter_batches,
    list_parts,
    read_pandas,
    read_table,
)


def test_roundtrip_readers(shards):
    d = shards(n_shards=3, rows=4)
    assert [p.name for p in list_parts(d)] == [f"part-0000{i}.parquet" for i in range(3)]
    df = read_pandas(d)
    assert list(df["id"]) == list(range(12))
    assert read_table(d).num_rows == 12
    assert sum(b.num_rows for b in iter_batches(d, batch_size=3)) == 12


def test_crash_before_rename_leaves_no_part(tmp_path):
    """A writer killed (os._exit) after writing the temp file but before the rename leaves no
    part file: readers never see a partial shard."""
    code = f"""
import os, pandas as pd, pipeline.io as io
real_replace = os.replace
def die(src, dst):
    os._exit(9)
os.replace = die
io.write_table_atomic(pd.DataFrame({{"a": list(range(1000))}}), r"{tmp_path}/part-00000.parquet")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert r.returncode == 9
    assert not (tmp_path / "part-00000.parquet").exists()
    assert list_parts(tmp_path) == []


def test_schema_errors_name_columns():
    have = pa.schema([("id", pa.int64()), ("x", pa.string())])
    want = pa.schema([("id", pa.int64()), ("x", pa.int64()), ("y", pa.int64())])
    with pytest.raises(SchemaError) as e:
        check_schema(have, want, where="shard 3")
    msg = str(e.value)
    assert "shard 3" in msg and "missing column 'y'" in msg
    assert "'x' is string, expected int64" in msg


def test_empty_or_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_parts(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no part"):
        read_table(tmp_path)


def test_shards_open_with_datasets(shards):
    import datasets

    d = shards(n_shards=2, rows=3)
    ds = datasets.load_dataset("parquet", data_files=str(d / "part-*.parquet"), split="train")
    assert sorted(ds["id"]) == list(range(6))
    assert isinstance(read_pandas(d), pd.DataFrame)

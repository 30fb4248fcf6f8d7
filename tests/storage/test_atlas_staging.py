"""Staged shards: atomic deterministic writes, whole-file detection, reads and clean-up."""
import os
import uuid

import fsspec
import pyarrow as pa
import pytest

from storage.errors import AtlasError
from storage.location import atlas_filesystem
from storage.staging import delete_staging, read_staged, staged_shards, write_shard


def _files(atlas, run_id):
    return sorted(os.listdir(os.path.join(atlas, "_staging", run_id)))


def test_write_twice_leaves_one_file_and_no_duplicates(atlas, make_rows):
    first, second = make_rows("r1", seed=1), make_rows("r1", seed=2)
    path = write_shard(first, atlas, run_id="r1", shard_id="neat-royalty-L000-n000000")
    assert path == os.path.join(atlas, "_staging", "r1", "neat-royalty-L000-n000000.parquet")
    write_shard(second, atlas, run_id="r1", shard_id="neat-royalty-L000-n000000")  # a retried shard
    assert _files(atlas, "r1") == ["neat-royalty-L000-n000000.parquet"]
    assert staged_shards(atlas, run_id="r1") == {"neat-royalty-L000-n000000": second.num_rows}
    back = read_staged(atlas, run_id="r1", shard_ids=["neat-royalty-L000-n000000"])
    assert back.equals(second)


def test_write_rejects_bad_tables(atlas, make_rows):
    rows = make_rows("r1")
    bad = rows.set_column(8, "score", rows.column("score").cast(pa.float64()))
    with pytest.raises(AtlasError, match=r"shard 's0' of run 'r1': schema does not match: wrong types: score is double"):
        write_shard(bad, atlas, run_id="r1", shard_id="s0")
    with pytest.raises(AtlasError, match=r"rows carry run_id \['r1'\], expected only 'r2'"):
        write_shard(rows, atlas, run_id="r2", shard_id="s0")
    with pytest.raises(AtlasError, match=r"run '../r1' is not a valid name"):
        write_shard(rows, atlas, run_id="../r1", shard_id="s0")
    with pytest.raises(AtlasError, match=r"shard 'a/b' is not a valid name"):
        write_shard(rows, atlas, run_id="r1", shard_id="a/b")
    assert not os.path.exists(os.path.join(atlas, "_staging"))


def test_staged_shards_ignores_truncated_and_temp_files(atlas, make_rows):
    rows = make_rows("r1")
    write_shard(rows, atlas, run_id="r1", shard_id="s0")
    write_shard(rows.slice(0, 5), atlas, run_id="r1", shard_id="s1")
    directory = os.path.join(atlas, "_staging", "r1")
    with open(os.path.join(directory, "s0.parquet"), "rb") as f:
        whole = f.read()
    with open(os.path.join(directory, "s2.parquet"), "wb") as f:  # a crash mid-write (no footer)
        f.write(whole[: len(whole) // 2])
    with open(os.path.join(directory, "s3.parquet"), "wb") as f:  # footer magic but garbage
        f.write(b"PAR1" + b"\0" * 64 + b"PAR1")
    with open(os.path.join(directory, ".s4.0123abcd.tmp"), "wb") as f:  # an unfinished temp file
        f.write(whole)
    with open(os.path.join(directory, "notes.txt"), "w") as f:
        f.write("x")
    assert staged_shards(atlas, run_id="r1") == {"s0": rows.num_rows, "s1": 5}
    assert staged_shards(atlas, run_id="never-ran") == {}


def test_read_staged_concatenates_in_order_and_names_missing(atlas, make_rows):
    rows = make_rows("r1")
    write_shard(rows.slice(0, 10), atlas, run_id="r1", shard_id="a")
    write_shard(rows.slice(10), atlas, run_id="r1", shard_id="b")
    assert read_staged(atlas, run_id="r1", shard_ids=["a", "b"]).equals(rows)
    assert read_staged(atlas, run_id="r1", shard_ids=[]).num_rows == 0
    with pytest.raises(AtlasError, match=r"shard 'c' of run 'r1' is not staged"):
        read_staged(atlas, run_id="r1", shard_ids=["a", "c"])


def test_delete_staging(atlas, make_rows):
    write_shard(make_rows("r1"), atlas, run_id="r1", shard_id="s0")
    write_shard(make_rows("r2"), atlas, run_id="r2", shard_id="s0")
    delete_staging(atlas, run_id="r1")
    delete_staging(atlas, run_id="r1")  # already gone: fine
    assert staged_shards(atlas, run_id="r1") == {}
    assert staged_shards(atlas, run_id="r2") == {"s0": make_rows("r2").num_rows}


def test_staging_is_fsspec_generic(make_rows):
    # Staging goes through fsspec only, so an in-memory file system exercises the same calls as S3.
    uri = f"memory://atlas-{uuid.uuid4().hex}"
    rows = make_rows("r1")
    try:
        assert write_shard(rows, uri, run_id="r1", shard_id="s0") == f"{uri}/_staging/r1/s0.parquet"
        write_shard(rows, uri, run_id="r1", shard_id="s0")
        assert staged_shards(uri, run_id="r1") == {"s0": rows.num_rows}
        assert read_staged(uri, run_id="r1", shard_ids=["s0"]).equals(rows)
        delete_staging(uri, run_id="r1")
        assert staged_shards(uri, run_id="r1") == {}
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(uri):
            fs.rm(uri, recursive=True)


def test_atlas_filesystem_translates_delta_s3_options():
    fs, root = atlas_filesystem(
        "s3://bucket/prefix/",
        {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
         "AWS_REGION": "eu-west-1", "AWS_ALLOW_HTTP": "true"},
    )
    assert root == "bucket/prefix"
    assert (fs.key, fs.secret, fs.endpoint_url) == ("k", "s", "http://127.0.0.1:9")
    assert fs.client_kwargs == {"region_name": "eu-west-1"}
    local, path = atlas_filesystem("relative/atlas")
    assert path == os.path.abspath("relative/atlas")

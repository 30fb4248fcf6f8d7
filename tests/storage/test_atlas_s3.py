"""The atlas on a real S3 API server (moto on 127.0.0.1): staging, one-commit runs, the CLI through the
AWS environment chain, concurrent writers, a writer killed mid-run, vacuum; no credential leaks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from s3_server import SECRET_KEY, start_moto
from storage.atlas import Atlas
from storage.commit import commit_run
from storage.history import atlas_history
from storage.location import atlas_filesystem
from storage.read import list_runs, open_neurons, top_neurons
from storage.staging import delete_staging, read_staged, staged_shards, write_shard

TESTS = Path(__file__).resolve().parent.parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def s3():
    server, handle = start_moto()
    try:
        yield handle
    finally:
        server.stop()


@pytest.fixture
def bucket(s3):
    return s3.new_bucket()


@pytest.fixture
def aws_env(s3, monkeypatch):
    """The standard AWS environment chain pointing at the test server (what a user's shell has)."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3.env


def test_stage_commit_and_read_back_through_the_cli(s3, bucket, make_rows, aws_env, capsys):
    uri = f"s3://{bucket}/atlas"
    options = s3.storage_options
    rows = make_rows("r1", seed=1)
    half = rows.num_rows // 2
    for shard_id, part in (("s-a", rows.slice(0, half)), ("s-b", rows.slice(half))):
        write_shard(part, uri, run_id="r1", shard_id=shard_id, storage_options=options)
        write_shard(part, uri, run_id="r1", shard_id=shard_id, storage_options=options)  # a retry: same file
    assert staged_shards(uri, run_id="r1", storage_options=options) == {"s-a": half, "s-b": rows.num_rows - half}
    staged = read_staged(uri, run_id="r1", shard_ids=["s-a", "s-b"], storage_options=options)
    assert commit_run(uri, staged, run_id="r1", metadata={"n": 1}, storage_options=options) == 1
    delete_staging(uri, run_id="r1", storage_options=options)
    assert s3.keys(bucket, "atlas/_staging/") == []
    commit_run(uri, make_rows("r2", seed=2), run_id="r2", metadata={"n": 2}, storage_options=options)

    # The CLI has no credential flags: it reads AWS_* from the environment, like delta-rs and s3fs.
    assert main(["query", "--atlas", uri, "--concept", "royalty", "--top", "3", "--format", "json"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in top] == ["r2"] * 3 and [r["rank"] for r in top] == [1, 2, 3]
    assert main(["query", "--atlas", uri, "--concept", "royalty", "--top", "3", "--as-of", "1",
                 "--format", "json"]) == 0
    assert {r["run_id"] for r in json.loads(capsys.readouterr().out)} == {"r1"}
    assert main(["sql", "--atlas", uri, "SELECT run_id, count(*) AS n FROM neurons GROUP BY ALL ORDER BY run_id",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["run_id,n", "r1,48", "r2,48"]
    assert main(["runs", "--atlas", uri, "--format", "json"]) == 0
    assert [r["run_id"] for r in json.loads(capsys.readouterr().out)] == ["r2", "r1"]
    assert main(["atlas", "history", "--atlas", uri, "--format", "json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [(h["version"], h["run_id"], h["rows"]) for h in history] == [(2, "r2", 48), (1, "r1", 48), (0, None, None)]
    out = capsys.readouterr()
    assert SECRET_KEY not in out.out + out.err


def test_a_refused_read_names_no_secret(s3, bucket, make_rows):
    """A read that delta-rs refuses before any request (http endpoint, AWS_ALLOW_HTTP=false) keeps the
    secret out of its error. The server refusing wrong or missing keys is tested on SeaweedFS
    (test_atlas_seaweedfs.py), which checks signatures; moto does not."""
    uri = f"s3://{bucket}/atlas"
    commit_run(uri, make_rows("r1"), run_id="r1", metadata={}, storage_options=s3.storage_options)
    options = dict(s3.storage_options, AWS_ALLOW_HTTP="false")
    with pytest.raises(Exception) as err:
        top_neurons(uri, concept="royalty", storage_options=options)
    assert SECRET_KEY not in str(err.value)
    assert Atlas.open(uri, s3.storage_options).top("royalty", 2).num_rows == 2
    assert SECRET_KEY not in repr(Atlas.open(uri, s3.storage_options))


WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {storage_tests!r})
    from atlas_rows import build_rows
    from storage.commit import commit_run
    uri, go, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
    print("ready", flush=True)
    while not os.path.exists(go):  # all writers commit at the same moment
        time.sleep(0.005)
    for run in runs:
        print(run, commit_run(uri, build_rows(run, seed=len(run) + ord(run[-1])), run_id=run, metadata={{}}), flush=True)
""").format(storage_tests=str(TESTS / "storage"))


def test_concurrent_writers_in_separate_processes_all_land(s3, bucket, aws_env, tmp_path):
    uri = f"s3://{bucket}/atlas"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(go), *runs], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for runs in (["a1", "a2"], ["b1", "b2"])]
    for proc in procs:  # both have imported deltalake and wait
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    landed = dict(line.split() for out, _ in outputs for line in out.splitlines())
    assert sorted(landed) == ["a1", "a2", "b1", "b2"]
    assert sorted(int(v) for v in landed.values()) == [1, 2, 3, 4]  # one version each, none lost
    neurons = open_neurons(uri)
    assert neurons.version() == 4
    table = neurons.to_pyarrow_table()
    assert table.num_rows == 4 * 48
    assert table.group_by(["run_id", "concept", "layer", "neuron"]).aggregate([([], "count_all")]).num_rows == 4 * 48
    runs = list_runs(uri)
    assert sorted(runs.column("run_id").to_pylist()) == ["a1", "a2", "b1", "b2"]
    assert {r: int(v) for r, v in landed.items()} == dict(zip(runs.column("run_id").to_pylist(),
                                                             runs.column("neurons_version").to_pylist()))
    assert sorted(atlas_history(uri).column("run_id").drop_null().to_pylist()) == ["a1", "a2", "b1", "b2"]


DYING_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {storage_tests!r})
    import pyarrow.parquet as pq
    from atlas_rows import build_rows
    from storage.location import atlas_filesystem
    from storage.staging import write_shard
    uri = sys.argv[1]
    rows = build_rows("dead", seed=7)
    write_shard(rows.slice(0, 24), uri, run_id="dead", shard_id="s-a")
    write_shard(rows.slice(24), uri, run_id="dead", shard_id="s-b")
    # Then it starts its commit: the data files go first, the log entry never comes.
    fs, root = atlas_filesystem(uri)
    with fs.open(root + "/neurons/model=tiny-gpt2/concept=royalty/part-00000-dead.parquet", "wb") as f:
        pq.write_table(rows, f)
    print("written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""").format(storage_tests=str(TESTS / "storage"))


def test_a_writer_killed_mid_run_leaves_nothing_visible_and_vacuum_removes_its_files(
        s3, bucket, make_rows, aws_env, capsys):
    uri = f"s3://{bucket}/atlas"
    commit_run(uri, make_rows("r1", seed=1), run_id="r1", metadata={})
    before = top_neurons(uri, concept="royalty", top=48)
    proc = subprocess.run([sys.executable, "-c", DYING_WRITER, uri], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode == -9 and proc.stdout.strip() == "written", proc.stderr[-2000:]
    orphan = "atlas/neurons/model=tiny-gpt2/concept=royalty/part-00000-dead.parquet"
    assert orphan in s3.keys(bucket) and s3.keys(bucket, "atlas/_staging/dead/")

    # Readers see the committed atlas only: same version, same rows, no trace of the dead run.
    assert open_neurons(uri).version() == 1
    assert top_neurons(uri, concept="royalty", top=48).equals(before)
    assert list_runs(uri).column("run_id").to_pylist() == ["r1"]
    assert main(["sql", "--atlas", uri, "SELECT DISTINCT run_id FROM neurons", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["run_id", "r1"]

    # Within the retention, vacuum keeps the files (a live writer's look the same); past it, they go.
    assert main(["atlas", "vacuum", "--atlas", uri, "--dry-run", "--format", "json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["neurons_files"] == [] and kept["staging_runs"] == []
    assert main(["atlas", "vacuum", "--atlas", uri, "--retention-hours", "0", "--dry-run", "--format", "json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["neurons_files"] == ["model=tiny-gpt2/concept=royalty/part-00000-dead.parquet"]
    assert planned["staging_runs"] == ["dead"] and orphan in s3.keys(bucket)
    assert main(["atlas", "vacuum", "--atlas", uri, "--retention-hours", "0"]) == 0
    assert "removed 1 unreferenced data file and 1 staging directory" in capsys.readouterr().err
    assert orphan not in s3.keys(bucket) and s3.keys(bucket, "atlas/_staging/") == []
    # Committed data is untouched and every version still reads.
    assert top_neurons(uri, concept="royalty", top=48).equals(before)
    assert top_neurons(uri, concept="royalty", top=48, as_of=1).equals(before)
    assert [h for h in atlas_history(uri).column("operation").to_pylist()] == [
        "VACUUM END", "VACUUM START", "WRITE", "CREATE TABLE"]


def test_credentials_stay_out_of_the_atlas(s3, bucket, make_rows):
    from cluster.config import config_from_dict

    uri = f"s3://{bucket}/atlas"
    config = config_from_dict({"model": "m", "concepts": "c.yaml", "atlas": uri, "storage_options": s3.storage_options},
                              source="job.yaml", base_dir=REPO)
    assert config.storage_options == s3.storage_options
    snapshot = config.snapshot()
    assert snapshot["storage_options"]["AWS_SECRET_ACCESS_KEY"] == "<redacted>"
    assert snapshot["storage_options"]["AWS_ENDPOINT_URL"] == s3.endpoint
    commit_run(uri, make_rows("r1"), run_id="r1", metadata={"config": snapshot}, storage_options=config.storage_options)
    with pytest.raises(Exception, match="contains a credential"):
        commit_run(uri, make_rows("r2"), run_id="r2", metadata={"config": {"key": SECRET_KEY}},
                   storage_options=config.storage_options)
    fs, root = atlas_filesystem(uri, config.storage_options)
    for path in fs.find(root):  # the commit logs are plain JSON, the runs table's metadata is Parquet
        data = fs.cat_file(path)
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                data = json.dumps(pq.read_table(f).to_pylist(), default=str).encode()
        assert SECRET_KEY.encode() not in data, path
    assert SECRET_KEY not in repr(config)


def test_a_reader_during_a_commit_sees_the_previous_version_or_the_new_one_whole(s3, bucket, make_rows, tmp_path):
    """The commit is held open (a proxy in front of the server holds its log entry's PUT) while a reader
    reads: the reader runs inside the commit window, after the commit's data files are on the server,
    and sees the previous version whole; once the log entry lands it sees the new one whole."""
    import socket
    import threading

    from s3_server import _free_port

    uri = f"s3://{bucket}/atlas"
    options = s3.storage_options
    first = make_rows("r1", seed=1)
    commit_run(uri, first, run_id="r1", metadata={}, storage_options=options)
    second = make_rows("r2", seed=2, layers=4, neurons=500)
    before = [k for k in s3.keys(bucket, "atlas/neurons/") if k.endswith(".parquet")]
    control = tmp_path / "control"
    control.mkdir()
    port = _free_port()
    proxy = subprocess.Popen([sys.executable, str(TESTS / "held_commit_proxy.py"), s3.endpoint, str(port), str(control)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proxy.poll() is None and time.monotonic() < deadline, "proxy did not start"
                time.sleep(0.05)
        outcome = {}

        def write() -> None:
            try:
                outcome["version"] = commit_run(uri, second, run_id="r2", metadata={},
                                                storage_options=dict(options, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}"))
            except Exception as err:  # reported by the assertion below
                outcome["error"] = err

        writer = threading.Thread(target=write)
        writer.start()
        deadline = time.monotonic() + 120
        while not (control / "held").exists():
            assert writer.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.01)
        # Inside the window: the commit has started and its new data files are already on the server ...
        assert "_delta_log/" in (control / "held").read_text()
        written = [k for k in s3.keys(bucket, "atlas/neurons/") if k.endswith(".parquet")]
        held = (control / "held").read_text()
        if "/neurons/" in held:
            assert len(written) > len(before), (held, written)
        reads = []
        for _ in range(3):
            table = open_neurons(uri, options)
            reads.append((table.version(), table.to_pyarrow_dataset().count_rows(),
                          set(table.to_pyarrow_dataset().to_table(columns=["run_id"])["run_id"].to_pylist())))
            assert writer.is_alive() and "version" not in outcome  # ... and has not returned
        assert reads == [(1, first.num_rows, {"r1"})] * 3, reads
        (control / "release").write_text("")
        writer.join(timeout=120)
        assert not writer.is_alive() and outcome.get("version") == 2, outcome
        table = open_neurons(uri, options)
        assert (table.version(), table.to_pyarrow_dataset().count_rows()) == (2, first.num_rows + second.num_rows)
    finally:
        (control / "release").write_text("")
        proxy.kill()
        proxy.wait()

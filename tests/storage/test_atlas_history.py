"""Versions and time travel (history, --as-of, sql --run) and vacuum on a local atlas."""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from storage.commit import commit_run
from storage.errors import AtlasError
from storage.history import atlas_history, vacuum_atlas
from storage.read import list_runs, open_neurons, parse_as_of, sql_query, top_neurons
from storage.staging import write_shard


@pytest.fixture
def three_runs(atlas, make_rows):
    """r1 (royalty, music), r2 (royalty, music), r3 (negation): versions 1, 2, 3; the time between r1 and r2."""
    commit_run(atlas, make_rows("r1", seed=1), run_id="r1", metadata={})
    time.sleep(0.05)
    between = datetime.now(timezone.utc)
    time.sleep(0.05)
    commit_run(atlas, make_rows("r2", seed=2), run_id="r2", metadata={})
    commit_run(atlas, make_rows("r3", seed=3, concepts=("negation",), model="tiny-llama"), run_id="r3", metadata={})
    return atlas, between


def test_history_lists_every_version_with_its_run(three_runs, capsys):
    atlas, _ = three_runs
    history = atlas_history(atlas)
    assert history.column("version").to_pylist() == [3, 2, 1, 0]
    assert history.column("operation").to_pylist() == ["WRITE", "WRITE", "WRITE", "CREATE TABLE"]
    top = history.to_pylist()[0]
    assert (top["run_id"], top["model"], top["model_revision"], top["concepts"], top["methods"], top["rows"]) == (
        "r3", "tiny-llama", "rev0", ["negation"], ["neat"], 24)
    assert history.to_pylist()[2]["concepts"] == ["music", "royalty"]
    assert all(h["time"].tzinfo is not None for h in history.to_pylist())
    assert main(["atlas", "history", "--atlas", atlas, "--limit", "2", "--format", "json"]) == 0
    assert [h["run_id"] for h in json.loads(capsys.readouterr().out)] == ["r3", "r2"]
    assert main(["atlas", "history", "--atlas", atlas]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["version", "time", "operation", "run_id"] and len(lines) == 5


def test_query_as_of_a_version_or_a_time_sees_the_atlas_as_it_was(three_runs, capsys):
    atlas, between = three_runs
    assert set(top_neurons(atlas, concept="royalty").column("run_id").to_pylist()) == {"r2"}
    assert set(top_neurons(atlas, concept="royalty", as_of=1).column("run_id").to_pylist()) == {"r1"}
    assert set(top_neurons(atlas, concept="royalty", as_of=between).column("run_id").to_pylist()) == {"r1"}
    with pytest.raises(AtlasError, match="concept 'negation' is not in the atlas"):
        top_neurons(atlas, concept="negation", as_of=2)  # r3 came later
    stamp = between.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert main(["query", "--atlas", atlas, "--concept", "royalty", "--as-of", stamp, "--format", "json"]) == 0
    assert {r["run_id"] for r in json.loads(capsys.readouterr().out)} == {"r1"}
    assert main(["query", "--atlas", atlas, "--concept", "royalty", "--as-of", "9"]) == 2
    assert "as-of version 9 is not in the atlas" in capsys.readouterr().err
    assert main(["query", "--atlas", atlas, "--concept", "royalty", "--as-of", "yesterday"]) == 2
    assert "neither a version number nor an ISO 8601 time" in capsys.readouterr().err
    before = (between - timedelta(days=365)).isoformat()
    assert main(["query", "--atlas", atlas, "--concept", "royalty", "--as-of", before]) == 2
    assert "has no such version" in capsys.readouterr().err


def test_sql_as_of_and_for_one_run(three_runs, capsys):
    atlas, _ = three_runs
    assert sql_query(atlas, "SELECT DISTINCT run_id FROM neurons ORDER BY 1", as_of=2).column(0).to_pylist() == ["r1", "r2"]
    assert sql_query(atlas, "SELECT run_id FROM runs ORDER BY 1", as_of=1).column(0).to_pylist() == ["r1"]
    assert sql_query(atlas, "SELECT DISTINCT run_id FROM latest", run_id="r1").column(0).to_pylist() == ["r1"]
    assert main(["sql", "--atlas", atlas, "--run", "r2", "--as-of", "2", "--format", "csv",
                 "SELECT run_id, count(*) AS n FROM neurons GROUP BY ALL"]) == 0
    assert capsys.readouterr().out.splitlines() == ["run_id,n", "r2,48"]
    assert main(["sql", "--atlas", atlas, "--run", "r3", "--as-of", "2", "SELECT 1"]) == 2
    assert "run 'r3' is not in the atlas" in capsys.readouterr().err
    assert list_runs(atlas, as_of=0).num_rows == 0


def test_parse_as_of():
    assert parse_as_of("12") == 12 and parse_as_of(3) == 3 and parse_as_of(None) is None
    assert parse_as_of("2026-11-22T07:00:00Z") == datetime(2026, 11, 22, 7, tzinfo=timezone.utc)
    assert parse_as_of("2026-11-22 07:00") == datetime(2026, 11, 22, 7, tzinfo=timezone.utc)  # naive: UTC
    with pytest.raises(AtlasError, match="must be >= 0"):
        parse_as_of(-1)


def _age(path: Path, hours: float) -> None:
    old = time.time() - hours * 3600
    os.utime(path, (old, old))


def test_vacuum_removes_only_unreferenced_files_past_the_retention(three_runs, make_rows, capsys):
    atlas, _ = three_runs
    root = Path(atlas)
    before = {v: open_neurons(atlas, as_of=v).to_pyarrow_table() for v in (1, 2, 3)}
    committed = sorted(str(p) for p in (root / "neurons").rglob("*.parquet"))
    # A crashed writer's data file (old and new), stale and fresh staging, a committed run's leftover staging.
    crashed = root / "neurons" / "model=tiny-gpt2" / "concept=royalty" / "part-crashed.parquet"
    pq.write_table(make_rows("dead"), crashed)
    _age(crashed, 30)
    fresh = root / "neurons" / "model=tiny-gpt2" / "concept=royalty" / "part-writing.parquet"
    pq.write_table(make_rows("live"), fresh)
    write_shard(make_rows("dead"), atlas, run_id="dead", shard_id="s1")
    for path in [*(root / "_staging" / "dead").rglob("*"), root / "_staging" / "dead"]:
        _age(path, 30)
    write_shard(make_rows("live"), atlas, run_id="live", shard_id="s1")
    write_shard(make_rows("r1"), atlas, run_id="r1", shard_id="s1")  # committed: its staging is leftover

    dry = vacuum_atlas(atlas, retention_hours=24, dry_run=True)
    assert dry.neurons_files == ("model=tiny-gpt2/concept=royalty/part-crashed.parquet",)
    assert dry.staging_runs == ("dead", "r1") and crashed.exists()
    assert main(["atlas", "vacuum", "--atlas", atlas, "--retention-hours", "24"]) == 0
    assert "removed 1 unreferenced data file and 2 staging directories" in capsys.readouterr().err
    assert not crashed.exists() and fresh.exists()
    assert sorted(p.name for p in (root / "_staging").iterdir()) == ["live"]
    # Every committed file stays, and every version still reads the same rows.
    assert all(Path(p).exists() for p in committed)
    for version, table in before.items():
        assert open_neurons(atlas, as_of=version).to_pyarrow_table().equals(table)
    # Retention 0 takes the fresh file too (why the retention must exceed the longest job).
    assert vacuum_atlas(atlas, retention_hours=0).neurons_files == ("model=tiny-gpt2/concept=royalty/part-writing.parquet",)
    assert open_neurons(atlas).to_pyarrow_table().num_rows == 48 + 48 + 24
    with pytest.raises(AtlasError, match="whole number >= 0"):
        vacuum_atlas(atlas, retention_hours=-1)
    assert main(["atlas", "vacuum", "--atlas", atlas, "--retention-hours", "-1"]) == 2


def test_vacuum_and_history_of_an_empty_atlas(atlas):
    assert atlas_history(atlas).num_rows == 0
    report = vacuum_atlas(atlas, retention_hours=0)
    assert report.neurons_files == () and report.staging_runs == ()


def test_hostile_run_names_are_refused_before_any_sql(three_runs, capsys):
    atlas, _ = three_runs
    for hostile in ("r1' OR 1=1 --", "../r1", "R1"):
        assert main(["sql", "--atlas", atlas, "--run", hostile, "SELECT count(*) FROM neurons"]) == 2
        assert "is not a valid name" in capsys.readouterr().err
        assert main(["neuron", "--atlas", atlas, "--layer", "0", "--neuron", "0", "--run", hostile]) == 2
        assert "is not a valid name" in capsys.readouterr().err
        assert main(["diff", "--atlas", atlas, "--concept", "royalty", "--run-a", hostile, "--run-b", "r2"]) == 2
        assert "is not a valid name" in capsys.readouterr().err

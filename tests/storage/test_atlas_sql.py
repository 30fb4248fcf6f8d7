"""Read-only SQL over the atlas: SELECTs on neurons/latest/runs work, everything else is refused."""
import os

import pytest

from storage.commit import commit_run
from storage.errors import AtlasError
from storage.read import sql_query


@pytest.fixture
def two_runs(atlas, make_rows):
    commit_run(atlas, make_rows("r1", seed=1), run_id="r1", metadata={"n": 1})
    commit_run(atlas, make_rows("r2", seed=2, concepts=("royalty",)), run_id="r2", metadata={"n": 2})
    return atlas


def test_select_views(two_runs):
    top = sql_query(two_runs, "SELECT layer, neuron, rank FROM neurons WHERE run_id = 'r1' AND concept = 'music' ORDER BY rank LIMIT 3")
    assert top.column("rank").to_pylist() == [1, 2, 3]
    latest = sql_query(two_runs, "SELECT concept, run_id, count(*) AS n FROM latest GROUP BY ALL ORDER BY concept")
    # music exists only in r1, so r1 is still its latest run; royalty's latest is r2
    assert latest.to_pylist() == [{"concept": "music", "run_id": "r1", "n": 24}, {"concept": "royalty", "run_id": "r2", "n": 24}]
    runs = sql_query(two_runs, "WITH r AS (SELECT run_id, neurons_version FROM runs) SELECT * FROM r ORDER BY neurons_version")
    assert runs.column("run_id").to_pylist() == ["r1", "r2"]
    assert sql_query(two_runs, "SELECT json_extract(metadata_json, '$.n')::INT AS n FROM runs ORDER BY n;").column("n").to_pylist() == [1, 2]


def test_empty_atlas_has_empty_views(atlas):
    assert sql_query(atlas, "SELECT * FROM neurons").num_rows == 0
    assert sql_query(atlas, "SELECT * FROM latest").num_rows == 0
    assert sql_query(atlas, "SELECT * FROM runs").num_rows == 0


@pytest.mark.parametrize("query, message", [
    ("COPY (SELECT * FROM neurons) TO '{out}'", "only SELECT"),
    ("CREATE TABLE t AS SELECT * FROM neurons", "only SELECT"),
    ("INSERT INTO runs SELECT * FROM runs", "only SELECT"),
    ("ATTACH '{out}' AS other", "only SELECT"),
    ("INSTALL httpfs", "only SELECT"),
    ("LOAD httpfs", "only SELECT"),
    ("SET enable_external_access = true", "only SELECT"),
    ("PRAGMA database_list", "only SELECT"),
    ("SELECT 1; SELECT 2", "exactly one SELECT statement, got 2"),
    ("SELECT 1; COPY (SELECT 1) TO '{out}'", "exactly one SELECT statement, got 2"),
    ("", "exactly one SELECT statement, got 0"),
    ("SELEC 1", "not valid SQL"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read-only and reads only the views"),
    ("SELECT * FROM read_text('/etc/passwd')", "read-only and reads only the views"),
    ("SELECT * FROM read_parquet('{atlas}/neurons/**/*.parquet')", "read-only and reads only the views"),
    ("SELECT * FROM glob('/etc/*')", "read-only and reads only the views"),
    ("SELECT * FROM '/etc/passwd'", "query failed"),
])
def test_refuses_everything_but_reading_the_views(two_runs, tmp_path, query, message):
    out = str(tmp_path / "out.csv")
    with pytest.raises(AtlasError, match=message):
        sql_query(two_runs, query.format(out=out, atlas=two_runs))
    assert not os.path.exists(out)

"""Ranking and the commit protocol: one Delta version per run, exactly once, nothing on failure."""
import math
import os
import shutil
import threading
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from storage.commit import app_id, commit_run, committed_runs, rank_rows, run_committed
from storage.errors import AtlasError
from storage.read import list_runs, open_neurons, run_metadata
from storage.schema import ATLAS_SCHEMA, SHARD_SCHEMA


def _row(layer, neuron, score, concept="royalty", ablation="zero"):
    return {"model": "m", "model_revision": "r", "concept": concept, "method": "neat", "ablation": ablation,
            "run_id": "r1", "layer": layer, "neuron": neuron, "score": score, "effect": -score, "activation": 0.0}


def _neurons(atlas) -> pa.Table:
    return open_neurons(atlas).to_pyarrow_dataset().to_table()


def test_rank_rows_across_layers_with_deterministic_ties():
    rows = pa.Table.from_pylist(
        [_row(0, 7, 0.5), _row(2, 1, 0.9), _row(1, 5, 0.5), _row(0, 1, float("nan")), _row(1, 0, 0.1),
         _row(0, 0, 0.2, concept="music"), _row(1, 0, 0.3, concept="music")],
        schema=SHARD_SCHEMA,
    )
    before = repr(rows.to_pylist())  # repr: NaN != NaN
    ranked = rank_rows(rows)
    assert repr(rows.to_pylist()) == before  # pure
    assert ranked.schema.names == SHARD_SCHEMA.names + ["rank"]
    got = [(r["concept"], r["layer"], r["neuron"], r["rank"]) for r in ranked.to_pylist()]
    assert got == [
        ("music", 1, 0, 1), ("music", 0, 0, 2),
        # layer 2 wins across layers; the 0.5 tie goes to the lower layer; NaN ranks last
        ("royalty", 2, 1, 1), ("royalty", 0, 7, 2), ("royalty", 1, 5, 3), ("royalty", 1, 0, 4), ("royalty", 0, 1, 5),
    ]


def test_rank_rows_groups_by_method_and_ablation(make_rows):
    rows = make_rows("r1", methods=("neat", "atp"), ablations=("zero", "mean"), layers=2, neurons=4)
    ranked = rank_rows(rows)
    for key, group in _groups(ranked).items():
        assert group.column("rank").to_pylist() == list(range(1, 9)), key
        scores = group.column("score").to_pylist()
        assert scores == sorted(scores, reverse=True)
    keys = list(zip(*(ranked.column(c).to_pylist() for c in ("concept", "method", "ablation", "rank"))))
    assert keys == sorted(keys)


def _groups(table):
    out = {}
    for key in {tuple(r[c] for c in ("concept", "method", "ablation")) for r in table.select(["concept", "method", "ablation"]).to_pylist()}:
        mask = pc.and_(pc.and_(pc.equal(table.column("concept"), key[0]), pc.equal(table.column("method"), key[1])),
                       pc.equal(table.column("ablation"), key[2]))
        out[key] = table.filter(mask)
    return out


def test_commit_run_is_one_ranked_sorted_version(atlas, make_rows):
    rows = make_rows("r1")
    start = datetime.now(timezone.utc)
    version = commit_run(atlas, rows, run_id="r1", metadata={"dtype": "float32", "nested": {"a": [1, 2]}})
    dt = open_neurons(atlas)
    assert version == dt.version() == 1  # version 0 is the empty table's creation
    assert [h["operation"] for h in dt.history()] == ["WRITE", "CREATE TABLE"]
    assert dt.transaction_version(app_id("r1")) == version
    assert dt.metadata().partition_columns == ["model", "concept"]
    stored = _neurons(atlas)
    assert stored.schema.names == ATLAS_SCHEMA.names and stored.num_rows == rows.num_rows
    created = set(stored.column("created_at").to_pylist())
    assert len(created) == 1 and start - timedelta(seconds=1) <= created.pop() <= datetime.now(timezone.utc)
    expected = rank_rows(rows).to_pylist()
    got = stored.drop_columns(["created_at"]).sort_by([(c, "ascending") for c in ("concept", "method", "ablation", "rank")])
    assert got.to_pylist() == expected
    commit_info = dt.history(limit=1)[0]
    # One source of truth for run metadata: the runs table; the commit only names its run.
    assert commit_info["userMetadata"] == '{"run_id": "r1"}'
    assert commit_info["neuron_atlas.run_id"] == "r1"
    assert run_metadata(atlas, "r1") == {"dtype": "float32", "nested": {"a": [1, 2]}}


def test_data_files_put_top_neurons_first(atlas, make_rows):
    # 2 ablations x 3 layers x 7000 neurons: several row groups per file
    rows = make_rows("r1", concepts=("royalty",), ablations=("zero", "mean"), neurons=7000)
    commit_run(atlas, rows, run_id="r1", metadata={})
    files = open_neurons(atlas).file_uris()
    assert len(files) == 1
    pf = pq.ParquetFile(files[0])
    assert pf.metadata.num_row_groups > 1
    table = pf.read()
    keys = list(zip(table.column("method").to_pylist(), table.column("ablation").to_pylist(), table.column("rank").to_pylist()))
    assert keys == sorted(keys)
    first = pf.read_row_group(0)
    assert first.column("rank")[0].as_py() == 1 and first.column("ablation")[0].as_py() == "mean"


def test_committing_a_run_twice_is_a_noop(atlas, make_rows):
    rows = make_rows("r1")
    version = commit_run(atlas, rows, run_id="r1", metadata={"a": 1})
    again = commit_run(atlas, rows, run_id="r1", metadata={"a": 1})
    assert again == version and open_neurons(atlas).version() == version
    assert _neurons(atlas).num_rows == rows.num_rows
    assert list_runs(atlas).column("run_id").to_pylist() == ["r1"]
    assert run_committed(atlas, "r1") and not run_committed(atlas, "r2")
    assert committed_runs(atlas) == {"r1"}


def test_recommit_repairs_a_missing_runs_row(atlas, make_rows):
    # A driver that died between the neurons commit and the runs row: the retry adds only the row.
    rows = make_rows("r1")
    version = commit_run(atlas, rows, run_id="r1", metadata={"a": 1})
    before = list_runs(atlas)
    shutil.rmtree(os.path.join(atlas, "runs"))
    assert committed_runs(atlas) == {"r1"}  # still known from the neurons log
    assert commit_run(atlas, rows, run_id="r1", metadata={"a": 1}) == version
    assert list_runs(atlas).equals(before)
    assert open_neurons(atlas).version() == version


def test_two_runs_two_versions(atlas, make_rows):
    v1 = commit_run(atlas, make_rows("r1", seed=1), run_id="r1", metadata={"n": 1})
    v2 = commit_run(atlas, make_rows("r2", seed=2), run_id="r2", metadata={"n": 2})
    assert v2 == v1 + 1
    runs = list_runs(atlas)
    assert runs.column("run_id").to_pylist() == ["r2", "r1"]  # newest first
    assert runs.column("neurons_version").to_pylist() == [v2, v1]
    first = runs.to_pylist()[1]
    assert first["concepts"] == ["music", "royalty"] and first["methods"] == ["neat"] and first["ablations"] == ["zero"]
    assert first["rows"] == 48 and first["model"] == "tiny-gpt2" and first["model_revision"] == "rev0"
    assert committed_runs(atlas) == {"r1", "r2"}
    assert DeltaTable(os.path.join(atlas, "neurons"), version=v1).to_pyarrow_dataset().count_rows() == 48  # time travel


def test_concurrent_commits_serialise(atlas, make_rows):
    # Threads race for the same versions: each run lands exactly once, at the version its txn records.
    commit_run(atlas, make_rows("r0"), run_id="r0", metadata={})
    results, errors = {}, []

    def commit(run_id):
        try:
            results.setdefault(run_id, []).append(commit_run(atlas, make_rows(run_id), run_id=run_id, metadata={}))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(r,)) for r in ("r1", "r1", "r2", "r3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results["r1"])) == 1
    dt = open_neurons(atlas)
    assert dt.version() == 4
    for run_id in ("r1", "r2", "r3"):
        assert dt.transaction_version(app_id(run_id)) == results[run_id][0]
    assert _neurons(atlas).num_rows == 4 * 48
    assert sorted(list_runs(atlas).column("run_id").to_pylist()) == ["r0", "r1", "r2", "r3"]


def _bad(rows, case):
    if case == "schema":
        return rows.set_column(8, "score", rows.column("score").cast(pa.float64()))
    if case == "duplicate":
        return pa.concat_tables([rows, rows.slice(3, 1)])
    if case == "other run":
        return rows.set_column(5, "run_id", pa.array(["r1"] * 47 + ["r9"]))
    if case == "two models":
        return rows.set_column(0, "model", pa.array(["tiny-gpt2"] * 47 + ["other"]))
    if case == "bad concept":
        return rows.set_column(2, "concept", pa.array(["Royalty/../x"] * 48))
    if case == "null key":
        return rows.set_column(6, "layer", pa.array([None] + [0] * 47, pa.int32()))
    if case == "empty":
        return rows.slice(0, 0)
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("schema", r"rows of run 'r1': schema does not match: wrong types: score is double"),
    ("duplicate", r"rows of run 'r1': 1 neurons appear more than once, e.g. \(model='tiny-gpt2', concept='royalty', method='neat', ablation='zero', layer=0, neuron=3\) x2"),
    ("other run", r"rows carry run_id \['r9'\], expected only 'r1'"),
    ("two models", r"a run covers one model, got 2"),
    ("bad concept", r"concept 'Royalty/../x' is not a valid name"),
    ("null key", r"null values in key columns \['layer'\]"),
    ("empty", r"no rows to commit"),
])
def test_failed_commit_leaves_the_table_unchanged(atlas, make_rows, case, message):
    commit_run(atlas, make_rows("r0"), run_id="r0", metadata={})
    files_before = sorted(os.listdir(os.path.join(atlas, "neurons", "_delta_log")))
    with pytest.raises(AtlasError, match=message):
        commit_run(atlas, _bad(make_rows("r1"), case), run_id="r1", metadata={})
    assert open_neurons(atlas).version() == 1
    assert sorted(os.listdir(os.path.join(atlas, "neurons", "_delta_log"))) == files_before
    assert not run_committed(atlas, "r1") and committed_runs(atlas) == {"r0"}


def test_bad_run_id_and_metadata(atlas, make_rows):
    with pytest.raises(AtlasError, match=r"run 'R1' is not a valid name"):
        commit_run(atlas, make_rows("R1"), run_id="R1", metadata={})
    with pytest.raises(AtlasError, match=r"metadata of run 'r1' is not JSON"):
        commit_run(atlas, make_rows("r1"), run_id="r1", metadata={"logp": math.nan})
    with pytest.raises(AtlasError, match=r"metadata of run 'r1' is not JSON"):
        commit_run(atlas, make_rows("r1"), run_id="r1", metadata={"when": datetime.now()})
    assert open_neurons(atlas) is None


def test_atlas_from_before_the_statistics_columns_gains_them_at_the_next_commit(atlas, make_rows):
    """An atlas written before act_mean ... consistency existed stays readable and takes new runs."""
    from storage.read import top_neurons
    from storage.schema import STAT_COLUMNS
    from deltalake import write_deltalake

    old_schema = pa.schema([f for f in ATLAS_SCHEMA if f.name not in STAT_COLUMNS])
    old_rows = rank_rows(make_rows("old")).drop_columns(list(STAT_COLUMNS))
    old_rows = old_rows.append_column("created_at", pa.repeat(pa.scalar(datetime.now(timezone.utc),
                                                                          ATLAS_SCHEMA.field("created_at").type),
                                                                old_rows.num_rows)).cast(old_schema)
    write_deltalake(f"{atlas}/neurons", old_rows, partition_by=["model", "concept"])
    before = top_neurons(atlas, concept="royalty", run_id="old", top=3)
    assert before.schema == ATLAS_SCHEMA and before.column("act_mean").null_count == 3

    new = make_rows("new", seed=1)
    new = new.set_column(new.schema.get_field_index("selectivity"), "selectivity",
                         pa.array([0.5] * new.num_rows, pa.float32()))
    commit_run(atlas, new, run_id="new", metadata={})
    stored = _neurons(atlas)
    assert set(STAT_COLUMNS) <= set(stored.column_names)
    assert top_neurons(atlas, concept="royalty", run_id="old", top=3).equals(before)
    assert top_neurons(atlas, concept="royalty", run_id="new", top=3).column("selectivity").to_pylist() == [0.5] * 3

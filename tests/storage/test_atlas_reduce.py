"""The streaming reduce and the write-once commit: the same rows and ranks as the in-memory reference
(`rank_rows`), files written once, a lost race leaves no orphans, and a protocol every reader takes."""
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from storage.commit import commit_run, commit_staged_run, rank_rows
from storage.read import list_runs, open_neurons
from storage.schema import SHARD_SCHEMA
from storage.staging import write_shard

SORT = [(c, "ascending") for c in ("model", "concept", "method", "ablation", "run_id", "rank")]


def _stored(atlas: str, run_id: str) -> pa.Table:
    table = open_neurons(atlas).to_pyarrow_dataset().to_table(filter=pc.field("run_id") == run_id)
    return table.drop_columns(["created_at"]).select(SHARD_SCHEMA.names + ["rank"]).sort_by(SORT)


def _messy_rows(run_id: str) -> pa.Table:
    """Ties, NaN and null scores, several groups interleaved, rows in no particular order."""
    rng = np.random.default_rng(7)
    grid = [(c, m, a, layer, n) for c in ("royalty", "music") for m, a in (("neat", "zero"), ("neat", "mean"),
                                                                           ("neurgrad", "none"))
            for layer in range(4) for n in range(300)]
    score = rng.integers(0, 40, size=len(grid)).astype(np.float32) / 8  # many exact ties
    score[rng.choice(len(grid), 30, replace=False)] = np.nan
    mask = np.zeros(len(grid), bool)
    mask[rng.choice(len(grid), 30, replace=False)] = True
    order = rng.permutation(len(grid))
    pick = lambda values: [values[i] for i in order]  # noqa: E731
    return pa.table({
        "model": ["tiny"] * len(grid), "model_revision": ["rev"] * len(grid),
        "concept": pick([g[0] for g in grid]), "method": pick([g[1] for g in grid]),
        "ablation": pick([g[2] for g in grid]), "run_id": [run_id] * len(grid),
        "layer": pa.array(pick([g[3] for g in grid]), pa.int32()),
        "neuron": pa.array(pick([g[4] for g in grid]), pa.int32()),
        "score": pa.array(score[order], pa.float32(), mask=mask[order]),
        "effect": pa.array(-score[order], pa.float32()),
        "activation": pa.array(rng.normal(size=len(grid)).astype(np.float32)[order]),
        **{name: pa.nulls(len(grid), pa.float32()) for name in SHARD_SCHEMA.names[11:]},
    }, schema=SHARD_SCHEMA)


def test_streaming_reduce_of_staged_shards_equals_the_in_memory_reference(atlas):
    rows = _messy_rows("r1")
    shards = [f"s{i}" for i in range(5)]
    for i, shard in enumerate(shards):  # uneven shards, each holding several groups
        write_shard(rows.slice(i * 1500, 1500 if i < 4 else rows.num_rows), atlas, run_id="r1", shard_id=shard)
    version = commit_staged_run(atlas, run_id="r1", shard_ids=shards, metadata={"a": 1}, expected_rows=rows.num_rows)
    assert version == 1
    expected = rank_rows(rows).sort_by(SORT)
    got = _stored(atlas, "r1")
    assert repr(got.to_pylist()) == repr(expected.to_pylist())  # repr: NaN != NaN
    run = list_runs(atlas).to_pylist()[0]
    assert run["layers"] == [0, 1, 2, 3] and run["rows"] == rows.num_rows
    assert {(b["concept"], b["method"], b["ablation"], b["rows"]) for b in run["blocks"]} == {
        (c, m, a, 1200) for c in ("royalty", "music") for m, a in (("neat", "zero"), ("neat", "mean"),
                                                                   ("neurgrad", "none"))}
    # One file per concept, top neurons first, min/max stats on run id and rank for pruning.
    adds = pa.table(DeltaTable(f"{atlas}/neurons").get_add_actions(flatten=True)).to_pydict()
    assert len(adds["path"]) == 2 and set(adds["min.run_id"]) == set(adds["max.run_id"]) == {"r1"}
    assert adds["min.rank"] == [1, 1] and adds["max.rank"] == [1200, 1200]


def test_planned_row_count_mismatch_commits_nothing_and_leaves_no_files(atlas, make_rows):
    rows = make_rows("r1")
    write_shard(rows, atlas, run_id="r1", shard_id="s0")
    with pytest.raises(Exception, match="staged 48 rows, planned 50"):
        commit_staged_run(atlas, run_id="r1", shard_ids=["s0"], metadata={}, expected_rows=50)
    assert open_neurons(atlas).version() == 0
    assert not list(Path(atlas, "neurons").rglob("*.parquet"))


def test_protocol_stays_reader_1_writer_2(atlas, make_rows):
    commit_run(atlas, make_rows("r1"), run_id="r1", metadata={})
    for name in ("neurons", "runs"):
        protocol = DeltaTable(f"{atlas}/{name}").protocol()
        assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
        assert not protocol.reader_features and not protocol.writer_features


def test_a_lost_race_writes_no_second_copy_and_leaves_no_orphans(atlas, make_rows):
    # Four drivers commit the same run at once: one commit lands, the others remove their own files.
    rows = make_rows("r1", neurons=200)
    commit_run(atlas, make_rows("r0"), run_id="r0", metadata={})
    versions, errors = [], []

    def commit():
        try:
            versions.append(commit_run(atlas, rows, run_id="r1", metadata={}))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=commit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(versions)) == 1
    dt = open_neurons(atlas)
    referenced = {os.path.normpath(p) for p in dt.file_uris()}
    on_disk = {os.path.normpath(str(p)) for p in Path(atlas, "neurons").rglob("*.parquet")}
    assert on_disk == referenced  # no orphans: every losing writer removed what it wrote
    assert dt.to_pyarrow_dataset().count_rows() == 48 + rows.num_rows
    runs_dir = Path(atlas, "runs")
    assert {p.name for p in runs_dir.glob("*.parquet")} == {
        Path(p).name for p in DeltaTable(str(runs_dir)).file_uris()}
    assert sorted(list_runs(atlas).column("run_id").to_pylist()) == ["r0", "r1"]

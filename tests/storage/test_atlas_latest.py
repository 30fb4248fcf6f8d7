"""Which run a read shows: per (model, concept, method, ablation, layer) the newest run holding it, so a
one-layer rerun replaces only its layer; ranks recomputed across the layers shown; reads name their runs."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from storage.atlas import Atlas
from storage.commit import commit_run
from storage.read import describe_sources, sql_query, top_neurons

LAYERS = 4


def _reference_latest(runs: list[pa.Table], concept: str, method: str, ablation: str) -> list[tuple]:
    """Independent reference: later runs replace earlier ones layer by layer; rank by score, layer, neuron."""
    by_layer: dict[int, list[dict]] = {}
    for rows in runs:  # in commit order: a later run wins its layers
        mine = [r for r in rows.to_pylist() if (r["concept"], r["method"], r["ablation"]) == (concept, method, ablation)]
        for layer in {r["layer"] for r in mine}:
            by_layer[layer] = [r for r in mine if r["layer"] == layer]
    shown = [r for rows in by_layer.values() for r in rows]
    shown.sort(key=lambda r: (-r["score"], r["layer"], r["neuron"]))
    return [(i + 1, r["layer"], r["neuron"], r["run_id"]) for i, r in enumerate(shown)]


def _one_layer(rows: pa.Table, layer: int) -> pa.Table:
    return rows.filter(pc.equal(rows.column("layer"), layer))


@pytest.fixture
def full_then_one_layer(atlas, make_rows):
    full = make_rows("full", methods=("neat", "atp"), layers=LAYERS, neurons=30, seed=1)
    # A one-layer rerun of neat only, its layer 2 scores boosted so it takes the top ranks.
    rerun = _one_layer(make_rows("rerun", methods=("neat",), layers=LAYERS, neurons=30, seed=2), 2)
    rerun = rerun.set_column(rerun.schema.get_field_index("score"), "score",
                             pc.add(rerun.column("score"), pa.scalar(1.0, pa.float32())))
    commit_run(atlas, full, run_id="full", metadata={})
    commit_run(atlas, rerun, run_id="rerun", metadata={})
    return atlas, full, rerun


def test_a_one_layer_rerun_replaces_only_its_layer_in_query(full_then_one_layer):
    atlas, full, rerun = full_then_one_layer
    expected = _reference_latest([full, rerun], "royalty", "neat", "zero")
    top = top_neurons(atlas, concept="royalty", top=len(expected))
    got = list(zip(*(top.column(c).to_pylist() for c in ("rank", "layer", "neuron", "run_id"))))
    assert got == expected
    assert {layer for _, layer, _, run in got if run == "rerun"} == {2}
    assert {layer for _, layer, _, run in got if run == "full"} == {0, 1, 3}
    assert describe_sources(top) == "runs full (layers 0-1, 3), rerun (layer 2)"
    # The rerun scored neat only: atp still comes whole from the full run, ranks as committed.
    atp = top_neurons(atlas, concept="royalty", method="atp", top=5)
    assert atp.column("run_id").to_pylist() == ["full"] * 5 and atp.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    # Atlas.top is the same read.
    assert Atlas.open(atlas).top("royalty", 7).equals(top_neurons(atlas, concept="royalty", top=7))


def test_the_passport_keeps_the_full_runs_other_layers(full_then_one_layer):
    atlas, full, rerun = full_then_one_layer
    layer, neuron = 1, 4  # not in the rerun's layer: its rows must still come from the full run
    passport = Atlas.open(atlas).passport(layer, neuron, k=1000)
    got = {(r["concept"], r["method"], r["ablation"]): (r["rank"], r["run_id"]) for r in passport.to_pylist()}
    assert set(got) == {(c, m, "zero") for c in ("royalty", "music") for m in ("neat", "atp")}
    for concept in ("royalty", "music"):
        expected = {(l, n): (rank, run) for rank, l, n, run in _reference_latest([full, rerun], concept, "neat", "zero")}
        assert got[(concept, "neat", "zero")] == expected[(layer, neuron)]
        assert got[(concept, "atp", "zero")][1] == "full"
    # And a neuron of the rerun's layer comes from the rerun.
    rows = Atlas.open(atlas).passport(2, 4, k=1000).to_pylist()
    assert {r["run_id"] for r in rows if r["method"] == "neat"} == {"rerun"}


def test_the_latest_view_is_per_layer_and_per_method_with_ranks_recomputed(full_then_one_layer):
    atlas, full, rerun = full_then_one_layer
    latest = sql_query(atlas, "SELECT concept, method, ablation, rank, layer, neuron, run_id FROM latest "
                              "ORDER BY concept, method, ablation, rank")
    for concept in ("royalty", "music"):
        for method in ("neat", "atp"):
            mine = [r for r in latest.to_pylist() if (r["concept"], r["method"]) == (concept, method)]
            got = [(r["rank"], r["layer"], r["neuron"], r["run_id"]) for r in mine]
            assert got == _reference_latest([full, rerun], concept, method, "zero")
    assert latest.num_rows == 2 * 2 * LAYERS * 30


def test_ranks_with_deep_shadowing_read_past_the_first_ranks(atlas, make_rows):
    # The full run's top ranks all sit in the layer a rerun replaced: the union must read deeper.
    full = make_rows("full", concepts=("royalty",), layers=3, neurons=50, seed=3)
    boost = np.where(np.array(full.column("layer").to_pylist()) == 0, 10.0, 0.0).astype(np.float32)
    full = full.set_column(full.schema.get_field_index("score"), "score", pc.add(full.column("score"), pa.array(boost)))
    rerun = _one_layer(make_rows("rerun", concepts=("royalty",), layers=3, neurons=50, seed=4), 0)
    commit_run(atlas, full, run_id="full", metadata={})
    commit_run(atlas, rerun, run_id="rerun", metadata={})
    expected = _reference_latest([full, rerun], "royalty", "neat", "zero")[:60]
    top = top_neurons(atlas, concept="royalty", top=60)
    assert list(zip(*(top.column(c).to_pylist() for c in ("rank", "layer", "neuron", "run_id")))) == expected


def _everything(atlas: str, layer: int, neuron: int) -> dict:
    """What readers see: every row, the latest view, a query and a passport."""
    from storage.read import open_neurons

    key = [(c, "ascending") for c in ("run_id", "concept", "method", "ablation", "layer", "neuron")]
    return {
        "rows": open_neurons(atlas).to_pyarrow_dataset().to_table().sort_by(key).to_pylist(),
        "latest": sql_query(atlas, "SELECT * FROM latest ORDER BY concept, method, ablation, rank").to_pylist(),
        "query": top_neurons(atlas, concept="royalty", top=25).to_pylist(),
        "passport": Atlas.open(atlas).passport(layer, neuron, k=200).to_pylist(),
        "runs": sql_query(atlas, "SELECT * EXCLUDE (neurons_version) FROM runs ORDER BY run_id").to_pylist(),
    }


def test_optimize_compacts_and_checkpoints_with_identical_reads(full_then_one_layer, make_rows, capsys):
    import os

    from deltalake import DeltaTable

    from jobs.cli import main

    atlas, _, _ = full_then_one_layer
    for i in range(3):
        commit_run(atlas, make_rows(f"more{i}", concepts=("music",), layers=LAYERS, neurons=30, seed=10 + i),
                   run_id=f"more{i}", metadata={"i": i})
    before = _everything(atlas, 1, 4)
    files_before = len(DeltaTable(f"{atlas}/neurons").file_uris())
    assert main(["atlas", "optimize", "--atlas", atlas, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["neurons"]["files_removed"] == files_before and report["neurons"]["files_added"] == 2
    assert report["runs"]["files_added"] == 1
    for name in ("neurons", "runs"):
        dt = DeltaTable(f"{atlas}/{name}")
        assert any(f.endswith(".checkpoint.parquet") for f in os.listdir(f"{atlas}/{name}/_delta_log"))
        protocol = dt.protocol()
        assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2)
        assert not protocol.reader_features and not protocol.writer_features
    assert len(DeltaTable(f"{atlas}/neurons").file_uris()) == 2  # one per (model, concept)
    assert _everything(atlas, 1, 4) == before


def test_runs_rows_from_before_layers_and_blocks_read_their_coverage_from_the_rows(full_then_one_layer):
    from deltalake import DeltaTable, write_deltalake

    atlas, full, rerun = full_then_one_layer
    expected = top_neurons(atlas, concept="royalty", top=30)
    runs = pa.table(DeltaTable(f"{atlas}/runs").to_pyarrow_dataset().to_table()).drop_columns(["layers", "blocks"])
    write_deltalake(f"{atlas}/runs", runs, mode="overwrite", schema_mode="overwrite")  # as an older release wrote it
    assert "layers" not in pa.schema(DeltaTable(f"{atlas}/runs").schema().to_arrow()).names
    assert top_neurons(atlas, concept="royalty", top=30).equals(expected)

"""Readers: top neurons of the latest or a given run, through the Delta log only, with clear errors."""
import os
import shutil

import pyarrow.parquet as pq
import pytest

from storage.commit import commit_run
from storage.errors import AmbiguousModelError, AtlasError, UnknownConceptError
from storage.read import list_runs, open_neurons, run_metadata, sql_query, top_neurons
from storage.schema import ATLAS_SCHEMA
from storage.staging import write_shard


@pytest.fixture
def two_runs(atlas, make_rows):
    r1, r2 = make_rows("r1", seed=1), make_rows("r2", seed=2)
    commit_run(atlas, r1, run_id="r1", metadata={"n": 1})
    commit_run(atlas, r2, run_id="r2", metadata={"n": 2})
    return atlas


def _expected_top(rows, concept, k):
    own = [r for r in rows.to_pylist() if r["concept"] == concept]
    own.sort(key=lambda r: (-r["score"], r["layer"], r["neuron"]))
    return [(r["layer"], r["neuron"]) for r in own[:k]]


def test_top_neurons_latest_run_by_default(two_runs, make_rows):
    top = top_neurons(two_runs, concept="royalty", top=5)
    assert top.schema == ATLAS_SCHEMA
    assert top.column("run_id").to_pylist() == ["r2"] * 5
    assert top.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    pairs = list(zip(top.column("layer").to_pylist(), top.column("neuron").to_pylist()))
    assert pairs == _expected_top(make_rows("r2", seed=2), "royalty", 5)


def test_top_neurons_of_a_given_run(two_runs, make_rows):
    top = top_neurons(two_runs, concept="royalty", run_id="r1", model="tiny-gpt2", top=3)
    assert top.column("run_id").to_pylist() == ["r1"] * 3
    pairs = list(zip(top.column("layer").to_pylist(), top.column("neuron").to_pylist()))
    assert pairs == _expected_top(make_rows("r1", seed=1), "royalty", 3)
    with pytest.raises(AtlasError, match=r"run 'r9' has no rows for concept 'royalty' of model 'tiny-gpt2', method 'neat'; runs that do: \['r1', 'r2'\]"):
        top_neurons(two_runs, concept="royalty", run_id="r9")


def test_a_newer_run_of_another_concept_does_not_hide_older_ones(two_runs, make_rows):
    commit_run(two_runs, make_rows("r3", concepts=("negation",)), run_id="r3", metadata={})
    assert set(top_neurons(two_runs, concept="royalty").column("run_id").to_pylist()) == {"r2"}
    assert set(top_neurons(two_runs, concept="negation").column("run_id").to_pylist()) == {"r3"}


def test_unknown_concept_lists_available(two_runs):
    with pytest.raises(UnknownConceptError, match=r"concept 'royal' is not in the atlas at .*; available concepts: music, royalty") as e:
        top_neurons(two_runs, concept="royal")
    assert e.value.available == ["music", "royalty"]


def test_empty_atlas(atlas):
    with pytest.raises(UnknownConceptError, match="no committed runs yet") as e:
        top_neurons(atlas, concept="royalty")
    assert e.value.available == []
    assert open_neurons(atlas) is None
    assert list_runs(atlas).num_rows == 0


def test_ambiguous_model(two_runs, make_rows):
    commit_run(two_runs, make_rows("r3", model="tiny-llama", concepts=("royalty",)), run_id="r3", metadata={})
    with pytest.raises(AmbiguousModelError, match=r"several models: tiny-gpt2, tiny-llama; name one with model=") as e:
        top_neurons(two_runs, concept="royalty")
    assert e.value.models == ["tiny-gpt2", "tiny-llama"]
    assert set(top_neurons(two_runs, concept="royalty", model="tiny-llama").column("run_id").to_pylist()) == {"r3"}
    assert set(top_neurons(two_runs, concept="music").column("model").to_pylist()) == {"tiny-gpt2"}  # only one has it
    with pytest.raises(UnknownConceptError, match="for model 'tiny-llama'; available concepts: royalty"):
        top_neurons(two_runs, concept="music", model="tiny-llama")
    with pytest.raises(AtlasError, match=r"model 'gpt9' is not in the atlas .*models: \['tiny-gpt2', 'tiny-llama'\]"):
        top_neurons(two_runs, concept="music", model="gpt9")


def test_ablations_and_methods(atlas, make_rows):
    commit_run(atlas, make_rows("r1", methods=("neat", "atp"), ablations=("zero", "mean")), run_id="r1", metadata={})
    both = top_neurons(atlas, concept="music", top=2)
    assert list(zip(both.column("ablation").to_pylist(), both.column("rank").to_pylist())) == [
        ("mean", 1), ("mean", 2), ("zero", 1), ("zero", 2)]
    assert set(both.column("method").to_pylist()) == {"neat"}
    mean = top_neurons(atlas, concept="music", method="atp", ablation="mean", top=4)
    assert mean.column("ablation").to_pylist() == ["mean"] * 4 and set(mean.column("method").to_pylist()) == {"atp"}
    with pytest.raises(AtlasError, match=r"ablation 'range' has no rows for concept 'music' .*; ablations: \['mean', 'zero'\]"):
        top_neurons(atlas, concept="music", ablation="range")
    with pytest.raises(AtlasError, match=r"method 'neurgrad' has no rows .*; methods: \['atp', 'neat'\]"):
        top_neurons(atlas, concept="music", method="neurgrad")
    with pytest.raises(AtlasError, match="top 0 must be a positive integer"):
        top_neurons(atlas, concept="music", top=0)


def test_uncommitted_files_are_invisible(two_runs, make_rows):
    # A staged shard, and a data file a crashed commit left inside the table directory.
    write_shard(make_rows("r3", seed=3), two_runs, run_id="r3", shard_id="s0")
    stray = os.path.join(two_runs, "neurons", "model=tiny-gpt2", "concept=royalty")
    pq.write_table(pq.read_table(os.path.join(two_runs, "_staging", "r3", "s0.parquet")), os.path.join(stray, "part-orphan.parquet"))
    assert set(top_neurons(two_runs, concept="royalty").column("run_id").to_pylist()) == {"r2"}
    counts = sql_query(two_runs, "SELECT run_id, count(*) AS n FROM neurons GROUP BY run_id ORDER BY run_id").to_pylist()
    assert counts == [{"run_id": "r1", "n": 48}, {"run_id": "r2", "n": 48}]
    assert list_runs(two_runs).column("run_id").to_pylist() == ["r2", "r1"]


def test_run_metadata(two_runs):
    assert run_metadata(two_runs, "r1") == {"n": 1}
    with pytest.raises(AtlasError, match=r"run 'r7' is not in the atlas at .*; runs \(newest first\): r2, r1"):
        run_metadata(two_runs, "r7")


def test_readers_survive_a_deleted_staging_dir(two_runs):
    shutil.rmtree(os.path.join(two_runs, "_staging"), ignore_errors=True)
    assert top_neurons(two_runs, concept="music", top=1).num_rows == 1


def test_given_ablation_picks_the_latest_run_holding_it(atlas, make_rows):
    commit_run(atlas, make_rows("r1", ablations=("zero", "mean")), run_id="r1", metadata={})
    commit_run(atlas, make_rows("r2", ablations=("zero",)), run_id="r2", metadata={})
    # Each ablation shows its own newest run: r2 re-scored zero only, so mean still comes from r1.
    every = top_neurons(atlas, concept="music")
    assert set(zip(every.column("ablation").to_pylist(), every.column("run_id").to_pylist())) == {
        ("mean", "r1"), ("zero", "r2")}
    mean = top_neurons(atlas, concept="music", ablation="mean")
    assert set(mean.column("run_id").to_pylist()) == {"r1"} and mean.num_rows == 20
    with pytest.raises(AtlasError, match=r"run 'r2' has no rows for .*, ablation 'mean'; runs that do: \['r1'\]"):
        top_neurons(atlas, concept="music", ablation="mean", run_id="r2")

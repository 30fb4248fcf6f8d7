"""The notebook API (`Atlas.open`) and its CLI twins `neuron` and `diff`, checked against brute force
over the whole table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as pds
import pytest

from jobs.cli import main
from storage.atlas import Atlas
from storage.commit import commit_run
from storage.errors import AmbiguousModelError, AtlasError, UnknownConceptError
from storage.read import top_neurons


@pytest.fixture
def runs(atlas, make_rows):
    """r1 and r2: same model, concepts royalty and music, zero ablation, 3 layers x 40 neurons; r3 another model."""
    commit_run(atlas, make_rows("r1", seed=1, neurons=40), run_id="r1", metadata={})
    commit_run(atlas, make_rows("r2", seed=2, neurons=40, concepts=("royalty", "music", "negation")), run_id="r2",
               metadata={})
    return atlas


def _all(atlas) -> pd.DataFrame:
    return Atlas.open(atlas).table().to_pandas()


def test_open_top_table_and_duckdb(runs):
    atlas = Atlas.open(runs)
    assert repr(atlas) == f"Atlas({runs!r}, version=2)"
    assert atlas.top("royalty", 5).equals(top_neurons(runs, concept="royalty", top=5))
    assert atlas.top("royalty", 5, run="r1", as_of=1).column("run_id").to_pylist() == ["r1"] * 5
    assert atlas.table(run="r1").num_rows == 2 * 3 * 40
    assert atlas.table(columns=["rank"], filter=pds.field("rank") == 1).num_rows == 5  # 2 + 3 (concept, run) blocks
    assert atlas.runs().column("run_id").to_pylist() == ["r2", "r1"]
    assert atlas.history().column("version").to_pylist() == [2, 1, 0]
    con = atlas.duckdb()
    try:
        got = con.sql("SELECT concept, run_id FROM latest WHERE rank = 1 ORDER BY concept").fetchall()
        assert got == [("music", "r2"), ("negation", "r2"), ("royalty", "r2")]
    finally:
        con.close()
    with pytest.raises(AtlasError, match="no atlas at"):
        Atlas.open(runs + "-nothing-here")


def test_passport_is_every_concept_the_neuron_ranks_top_k_for(runs, capsys):
    rows = _all(runs)
    latest = rows[rows.run_id == "r2"]
    best = latest.sort_values("rank").iloc[0]
    layer, neuron = int(best.layer), int(best.neuron)
    passport = Atlas.open(runs).passport(layer, neuron, k=30).to_pandas()
    mine = latest[(latest.layer == layer) & (latest.neuron == neuron) & (latest["rank"] <= 30)]
    assert sorted(passport.concept) == sorted(mine.concept) and len(passport) >= 1
    assert list(passport["rank"]) == sorted(passport["rank"])
    for row in passport.itertuples():
        expected = mine[mine.concept == row.concept].iloc[0]
        assert (row.rank, row.effect, row.activation, row.run_id) == (
            expected["rank"], expected.effect, expected.activation, "r2")
    older = Atlas.open(runs).passport(layer, neuron, k=30, run="r1").to_pandas()
    r1 = rows[(rows.run_id == "r1") & (rows.layer == layer) & (rows.neuron == neuron) & (rows["rank"] <= 30)]
    assert sorted(older.concept) == sorted(r1.concept)
    assert main(["neuron", "--atlas", runs, "--layer", str(layer), "--neuron", str(neuron), "--k", "30",
                 "--format", "json"]) == 0
    assert sorted(r["concept"] for r in json.loads(capsys.readouterr().out)) == sorted(mine.concept)
    assert main(["neuron", "--atlas", runs, "--layer", "-1", "--neuron", "0"]) == 2
    assert "layer -1 must be an integer >= 0" in capsys.readouterr().err


def test_diff_matches_brute_force(runs, capsys):
    rows = _all(runs)
    a = rows[(rows.run_id == "r1") & (rows.concept == "royalty")].set_index(["layer", "neuron"])["rank"]
    b = rows[(rows.run_id == "r2") & (rows.concept == "royalty")].set_index(["layer", "neuron"])["rank"]
    k = 10
    diff = Atlas.open(runs).diff("r1", "r2", "royalty", k=k)
    top_a, top_b = set(a[a <= k].index), set(b[b <= k].index)
    entered = list(zip(diff.entered.column("layer").to_pylist(), diff.entered.column("neuron").to_pylist()))
    left = list(zip(diff.left.column("layer").to_pylist(), diff.left.column("neuron").to_pylist()))
    assert set(entered) == top_b - top_a and set(left) == top_a - top_b
    assert diff.entered.column("rank_b").to_pylist() == sorted(diff.entered.column("rank_b").to_pylist())
    assert diff.kept == len(top_a & top_b) and diff.neurons == 120 and diff.ablation == "zero"
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1)
    pearson_of_ranks = np.corrcoef(joined["a"].rank(), joined["b"].rank())[0, 1]  # Spearman's definition
    assert diff.spearman == pytest.approx(pearson_of_ranks, abs=1e-12)
    same = Atlas.open(runs).diff("r2", "r2", "royalty", k=k)
    assert same.spearman == pytest.approx(1.0) and same.entered.num_rows == 0 and same.kept == k
    assert main(["diff", "--atlas", runs, "--concept", "royalty", "--run-a", "r1", "--run-b", "r2", "--k", "10",
                 "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spearman"] == pytest.approx(diff.spearman) and len(out["entered"]) == len(entered)
    assert main(["diff", "--atlas", runs, "--concept", "royalty", "--run-a", "r1", "--run-b", "r2", "--k", "10"]) == 0
    captured = capsys.readouterr()
    assert "Spearman rho" in captured.err and captured.out.splitlines()[0].split()[-1] == "change"
    with pytest.raises(AtlasError, match=r"run 'r1' has no rows for concept 'negation'"):
        Atlas.open(runs).diff("r1", "r2", "negation")
    with pytest.raises(UnknownConceptError, match="concepts: music, negation, royalty"):
        Atlas.open(runs).diff("r1", "r2", "weather")


def test_several_models_need_a_name(runs, make_rows):
    commit_run(runs, make_rows("r3", model="tiny-llama"), run_id="r3", metadata={})
    with pytest.raises(AmbiguousModelError, match="several models: tiny-gpt2, tiny-llama"):
        Atlas.open(runs).passport(0, 0)
    assert set(Atlas.open(runs).passport(0, 0, model="tiny-llama", k=1000).column("model").to_pylist()) <= {"tiny-llama"}
    with pytest.raises(AtlasError, match="model 'nope' is not in the atlas"):
        Atlas.open(runs).passport(0, 0, model="nope")


def test_spearman_of_reversed_ranking_is_minus_one():
    from storage.atlas import _spearman

    assert _spearman(np.arange(1, 101), np.arange(100, 0, -1)) == pytest.approx(-1.0)

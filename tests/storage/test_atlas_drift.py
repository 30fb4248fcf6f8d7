"""The `drift` table: a run compared with the previous run of its family, checked against brute force
(sets for the top-k churn, Spearman from ranks computed here), stored once, readable as a SQL view."""
from __future__ import annotations

import json

import numpy as np
import pytest

from storage.commit import commit_run
from storage.drift import alert_line, commit_drift, compute_drift, read_drift
from storage.read import sql_query


def _meta(family: str) -> dict:
    return {"fingerprint": {"id": "fp:x", "family": family, "concept_set": "c", "components": {}}}


def _ranking(rows, run_id, concept):
    """{(layer, neuron): rank} of a run's concept, ranked here: score descending, then (layer, neuron)."""
    items = [r for r in rows.to_pylist() if r["run_id"] == run_id and r["concept"] == concept]
    items.sort(key=lambda r: (-r["score"], r["layer"], r["neuron"]))
    return {(r["layer"], r["neuron"]): i + 1 for i, r in enumerate(items)}


def test_drift_against_brute_force_and_stored_once(atlas, make_rows):
    first = make_rows("night-1", model="ckpt-1", seed=1, layers=4, neurons=16)
    other = make_rows("other-1", model="other", seed=5, layers=4, neurons=16)  # another family: never compared
    second = make_rows("night-2", model="ckpt-2", seed=2, layers=4, neurons=16)
    commit_run(atlas, first, run_id="night-1", metadata=_meta("nightly"))
    commit_run(atlas, other, run_id="other-1", metadata=_meta("other"))
    commit_run(atlas, second, run_id="night-2", metadata=_meta("nightly"))

    assert compute_drift(atlas, "night-1", k=10).num_rows == 0  # a family's first run has nothing to compare
    rows = compute_drift(atlas, "night-2", k=10, max_churn=0.5, min_spearman=0.5, movers=3)
    assert sorted(rows.column("concept").to_pylist()) == ["music", "royalty"]
    for row in rows.to_pylist():
        assert row["previous_run_id"] == "night-1" and row["family"] == "nightly"
        assert (row["model"], row["previous_model"]) == ("ckpt-2", "ckpt-1")
        a, b = _ranking(first, "night-1", row["concept"]), _ranking(second, "night-2", row["concept"])
        top_a = {n for n, r in a.items() if r <= 10}
        top_b = {n for n, r in b.items() if r <= 10}
        assert row["kept"] == len(top_a & top_b)
        assert row["entered"] == len(top_b - top_a) and row["left"] == len(top_a - top_b)
        assert row["churn"] == pytest.approx(len(top_a - top_b) / 10)
        keys = sorted(a)
        ra, rb = np.array([a[n] for n in keys], float), np.array([b[n] for n in keys], float)
        rho = np.corrcoef(ra, rb)[0, 1]  # Pearson of ranks = Spearman (no ties)
        assert row["spearman"] == pytest.approx(rho, abs=1e-12)
        movers = json.loads(row["movers_json"])
        assert len(movers) == 3
        biggest = max(abs(a[n] - b[n]) for n in keys if n in top_a | top_b)
        assert abs(movers[0]["rank_change"]) == biggest
        assert movers[0]["rank_change"] == movers[0]["rank_a"] - movers[0]["rank_b"]
        assert [tuple(p) for p in json.loads(row["entered_json"])] == sorted(top_b - top_a, key=lambda n: b[n])
        # random seeds: the rankings are unrelated, so both thresholds are crossed
        assert row["drifted"] and "churn:" in row["reason"] and "spearman:" in row["reason"]
        line = alert_line(row)
        assert line.startswith("neuron-atlas DRIFT run=night-2 previous=night-1 family=nightly model=ckpt-2 ")
        assert f"concept={row['concept']} method=neat ablation=zero k=10 churn={row['churn']:.3f}" in line

    assert commit_drift(atlas, rows, run_id="night-2") is True
    assert commit_drift(atlas, rows, run_id="night-2") is False  # once per run: a second writer finds it
    stored = read_drift(atlas)
    assert stored.num_rows == 2 and read_drift(atlas, model="nightly").num_rows == 2
    assert read_drift(atlas, model="ckpt-2").num_rows == 2 and read_drift(atlas, model="other").num_rows == 0
    viewed = sql_query(atlas, "SELECT concept, kept, churn FROM drift ORDER BY concept").to_pylist()
    assert [(r["concept"], r["kept"]) for r in viewed] == sorted(
        (r["concept"], r["kept"]) for r in rows.to_pylist())


def test_identical_rankings_do_not_drift(atlas, make_rows):
    commit_run(atlas, make_rows("a", seed=3), run_id="a", metadata=_meta("f"))
    commit_run(atlas, make_rows("b", seed=3), run_id="b", metadata=_meta("f"))
    rows = compute_drift(atlas, "b", k=5, max_churn=0.0, min_spearman=1.0).to_pylist()
    assert rows and all(r["spearman"] == pytest.approx(1.0) and r["churn"] == 0 and not r["drifted"] for r in rows)
    assert all(r["reason"] == "" and json.loads(r["movers_json"])[0]["rank_change"] == 0 for r in rows)
    assert sql_query(atlas, "SELECT count(*) AS n FROM drift").to_pylist() == [{"n": 0}]  # nothing stored yet

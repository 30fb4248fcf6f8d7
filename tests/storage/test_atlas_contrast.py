"""Contrastive rankings: the formula against brute force, and neurons shared by every concept drop out."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from storage.commit import rank_rows
from storage.contrast import contrastive_table, generic_neurons
from storage.errors import AtlasError
from storage.schema import SHARD_SCHEMA, STAT_COLUMNS, shard_table


def run_rows(scores: dict[str, np.ndarray]) -> pa.Table:
    """Rows of one run: concept -> scores [layers, neurons]."""
    columns = {name: [] for name in SHARD_SCHEMA.names if name not in STAT_COLUMNS}
    for concept, grid in scores.items():
        for layer in range(grid.shape[0]):
            for neuron in range(grid.shape[1]):
                for name, value in (("model", "m"), ("model_revision", "r"), ("concept", concept), ("method", "neat"),
                                    ("ablation", "zero"), ("run_id", "run"), ("layer", layer), ("neuron", neuron),
                                    ("score", float(grid[layer, neuron])), ("effect", -float(grid[layer, neuron])),
                                    ("activation", 1.0)):
                    columns[name].append(value)
    return rank_rows(shard_table(columns))


def test_contrastive_score_is_score_minus_the_best_other_concept():
    rng = np.random.default_rng(0)
    scores = {c: rng.random((3, 8)) for c in ("a", "b", "c")}
    table = contrastive_table(run_rows(scores), "a")
    assert table.num_rows == 24
    for row in table.to_pylist():
        layer, neuron = row["layer"], row["neuron"]
        others = {c: scores[c][layer, neuron] for c in ("b", "c")}
        closest = max(others, key=others.get)
        assert row["contrastive_score"] == pytest.approx(scores["a"][layer, neuron] - others[closest], abs=1e-6)
        assert row["closest_concept"] == closest
    assert table.column("contrastive_rank").to_pylist() == list(range(1, 25))
    assert all(x >= y for x, y in zip(table.column("contrastive_score").to_pylist(),
                                      table.column("contrastive_score").to_pylist()[1:]))


def test_a_neuron_that_tops_every_concept_leaves_the_contrastive_top():
    rng = np.random.default_rng(1)
    scores = {c: rng.random((2, 10)) * 0.1 for c in ("a", "b", "c")}
    for grid in scores.values():
        grid[0, 3] = 5.0  # generic: strongest for every concept
    scores["a"][1, 7] = 1.0  # specific to a
    rows = run_rows(scores)
    table = contrastive_table(rows, "a")
    assert (table.column("layer")[0].as_py(), table.column("neuron")[0].as_py()) == (1, 7)
    generic = [r for r in table.to_pylist() if (r["layer"], r["neuron"]) == (0, 3)][0]
    assert generic["rank"] == 1 and generic["contrastive_score"] == 0.0  # raw rank 1, no specificity left
    assert generic["contrastive_rank"] > 1
    generic = generic_neurons(rows, k=1)
    assert generic.select(["layer", "neuron"]).to_pylist() == [{"layer": 0, "neuron": 3}]


def test_a_run_with_one_concept_has_no_contrast():
    with pytest.raises(AtlasError, match="needs a run with it and other concepts"):
        contrastive_table(run_rows({"a": np.ones((1, 4))}), "a")

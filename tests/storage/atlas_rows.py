"""Small deterministic runs built as SHARD_SCHEMA tables (a plain module: `conftest` names clash across folders)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage.schema import shard_table


def build_rows(
    run_id: str,
    *,
    model: str = "tiny-gpt2",
    revision: str = "rev0",
    concepts: tuple[str, ...] = ("royalty", "music"),
    methods: tuple[str, ...] = ("neat",),
    ablations: tuple[str, ...] = ("zero",),
    layers: int = 3,
    neurons: int = 8,
    seed: int = 0,
) -> pa.Table:
    """One row per (concept, method, ablation, layer, neuron) with seeded random effects."""
    rng = np.random.default_rng(seed)
    grid = [(c, m, a, layer, n) for c in concepts for m in methods for a in ablations
            for layer in range(layers) for n in range(neurons)]
    effect = rng.normal(size=len(grid)).astype(np.float32)
    return shard_table(
        {
            "model": [model] * len(grid),
            "model_revision": [revision] * len(grid),
            "concept": [g[0] for g in grid],
            "method": [g[1] for g in grid],
            "ablation": [g[2] for g in grid],
            "run_id": [run_id] * len(grid),
            "layer": pa.array([g[3] for g in grid], pa.int32()),
            "neuron": pa.array([g[4] for g in grid], pa.int32()),
            "score": pa.array(np.abs(effect), pa.float32()),
            "effect": pa.array(effect, pa.float32()),
            "activation": pa.array(rng.normal(size=len(grid)).astype(np.float32), pa.float32()),
        },
    )

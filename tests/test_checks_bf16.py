"""checks.bf16 (cluster/checks.py): a bf16 run's scores compared with the float32 engine on a seeded sample,
without Ray (the driver calls the same actor method; tests/test_run.py checks the run's metadata)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from attribution.stats import spearman
from cluster.checks import bf16_agreement, bf16_sample
from cluster.config import load_job_config
from cluster.plan import Shard, resolve_job
from cluster.scorer import ScorerSpec, ShardScorer

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


def test_the_sample_is_seeded_sorted_and_spans_the_layers():
    sample = bf16_sample((0, 3, 5), 96, 50)
    assert sample == bf16_sample((0, 3, 5), 96, 50)  # the same on every machine and run
    assert sum(len(neurons) for _, neurons in sample) == 50 and {layer for layer, _ in sample} <= {0, 3, 5}
    assert all(list(neurons) == sorted(set(neurons)) and max(neurons) < 96 for _, neurons in sample)
    assert sum(len(n) for _, n in bf16_sample((0,), 96, 512)) == 96  # never more than there are


def test_bf16_agreement_compares_the_runs_rows_with_the_float32_engine(tmp_path, tiny_sources):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": tiny_sources["llama"].path, "concepts": str(UNSEEN), "layers": [0, 3],
                                    "atlas": str(tmp_path / "atlas"), "dtype": "bf16", "batch_rows": 32,
                                    "run_id": "r", "cluster": {"actors": 1}}))
    plan = resolve_job(load_job_config(path))
    scorer = ShardScorer(ScorerSpec.from_plan(plan))
    import pyarrow as pa

    rows = pa.concat_tables([scorer.score_table(Shard("neat", layer, 0, plan.d_mlp)) for layer in (0, 3)])
    sample = bf16_sample(plan.layers, plan.d_mlp, 64)
    exact = scorer.float32_effects(sample)
    checks = bf16_agreement(rows, sample, exact, ablation="zero")
    assert [c["concept"] for c in checks] == sorted(rc.concept.name for rc in plan.concepts)
    for check in checks:
        by_key = {(r["layer"], r["neuron"]): r["effect"] for r in rows.to_pylist() if r["concept"] == check["concept"]}
        low = torch.tensor([by_key[(layer, n)] for layer, neurons in sample for n in neurons])
        high = torch.tensor(exact[check["concept"]])
        assert check["neurons"] == 64 and check["top_k"] == 6
        assert check["spearman"] == round(spearman(low.abs(), high.abs()), 6) and check["spearman"] > 0.99
        assert check["max_abs_diff"] == float((low - high).abs().max()) <= 0.02 * float(high.abs().max())
        assert check["top_k_agreement"] >= 5 / 6
    # A sample the rows do not cover (a screened run) is skipped, not guessed.
    assert bf16_agreement(rows, ((1, (0, 1, 2)),), {"weather": [0.0, 0.0, 0.0]}, ablation="zero") == []

"""Every method through the whole service: a Ray run writes each method's rows, equal to the pure
scoring functions called directly, with the method-specific columns, and the run records how the
methods agree."""
from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
import yaml

from attribution.concepts import load_concept_file, resolve_targets
from attribution.integrated_gradients import ig_scores
from attribution.neurgrad import neg_slopes, neurgrad_scores
from attribution.prompts import concept_prompts
from cluster.config import load_job_config
from cluster.driver import run_job
from cluster.plan import resolve_job, sample_neurons
from storage.read import open_neurons, run_metadata

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"
LAYERS = [0, 3]


pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def gradient_run(tmp_path_factory, tiny_sources):
    """One run of the prompt-gradient methods on the tiny Llama: (atlas rows, metadata)."""
    tmp = tmp_path_factory.mktemp("methods")
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump({
        "model": tiny_sources["llama"].path, "concepts": str(UNSEEN), "layers": LAYERS, "atlas": str(tmp / "atlas"),
        "methods": ["neurgrad", "neg", "ig"], "run_id": "grads", "cluster": {"actors": 2},
        "method_options": {"neg_sample": 6, "neg_points": 6, "ig_steps": 8},
    }))
    plan = resolve_job(load_job_config(path))
    assert sorted({s.method for s in plan.shards}) == ["ig", "neg", "neurgrad"]
    run_job(plan)
    return open_neurons(str(tmp / "atlas")).to_pyarrow_table(), run_metadata(str(tmp / "atlas"), "grads")


def _spearman(a: list[float], b: list[float]) -> float:
    """1 - 6 sum d^2 / (n (n^2 - 1)); the effects compared have no ties."""
    assert len(set(a)) == len(a) and len(set(b)) == len(b)
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=lambda i: xs[i]))}  # noqa: E731
    ra, rb, n = rank(a), rank(b), len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def _of(rows, method: str, concept: str) -> dict[tuple[int, int], dict]:
    part = rows.filter(pc.and_(pc.equal(rows["method"], method), pc.equal(rows["concept"], concept)))
    return {(r["layer"], r["neuron"]): r for r in part.to_pylist()}


def test_gradient_methods_rows_equal_the_scoring_functions(gradient_run, tiny_models):
    rows, meta = gradient_run
    model = tiny_models["llama"]
    for concept in load_concept_file(UNSEEN):
        prompts = concept_prompts(model.tokenizer, concept, resolve_targets(model.tokenizer, concept).ids)
        expected = {"neurgrad": neurgrad_scores(model, prompts), "ig": ig_scores(model, prompts, steps=8)}
        for method, scores in expected.items():
            got = _of(rows, method, concept.name)
            assert len(got) == len(LAYERS) * model.d_mlp
            for (layer, neuron), row in got.items():
                assert row["ablation"] == "none"
                assert row["effect"] == pytest.approx(float(scores.effect[layer, neuron]), abs=1e-6, rel=1e-5)
                assert row["score"] == pytest.approx(float(scores.ranking_score[layer, neuron]), abs=1e-6, rel=1e-5)
                assert row["activation"] == pytest.approx(float(scores.activation[layer, neuron]), abs=1e-6, rel=1e-5)
        # NEG: only the seeded sample of each layer, its slopes as effects.
        neg = _of(rows, "neg", concept.name)
        sample = [(layer, n) for layer in LAYERS for n in sample_neurons(layer, model.d_mlp, 6)]
        assert sorted(neg) == sorted(sample)
        slopes = neg_slopes(model, prompts, sample, points=6)
        for key, slope in zip(sample, slopes.tolist()):
            assert neg[key]["effect"] == pytest.approx(slope, abs=1e-6, rel=1e-5)
        assert sorted(r["rank"] for r in neg.values()) == list(range(1, len(sample) + 1))
    agreement = {c["concept"]: c for c in meta["checks"]["neg_vs_neurgrad"]}
    assert set(agreement) == {"weather", "music"}
    for concept, check in agreement.items():  # recomputed from the committed rows, by the textbook formula
        neg, grad = _of(rows, "neg", concept), _of(rows, "neurgrad", concept)
        keys = sorted(neg)
        assert check["neurons"] == len(keys) == 12
        for name, f in (("spearman_signed", lambda x: x), ("spearman_abs", abs)):
            a, b = [f(neg[k]["effect"]) for k in keys], [f(grad[k]["effect"]) for k in keys]
            assert check[name] == pytest.approx(round(_spearman(a, b), 4), abs=1e-12), (concept, name)
    assert set(meta["timings"]["methods"]) == {"neurgrad", "neg", "ig"}


def test_probing_methods_and_range_ablation_through_a_run(tmp_path, tiny_sources, tiny_models):
    from attribution.neat import clean_pass, concept_vector
    from attribution.neuronlens import neuronlens_scores
    from attribution.selectivity import selectivity_scores

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "model": tiny_sources["llama"].path, "concepts": str(UNSEEN), "layers": LAYERS, "atlas": str(tmp_path / "atlas"),
        "methods": ["neat", "neuronlens", "selectivity"], "ablation": ["mean", "range"], "run_id": "probe",
        "shard_neurons": 200, "cluster": {"actors": 2},
    }))
    run_job(resolve_job(load_job_config(path)))
    rows = open_neurons(str(tmp_path / "atlas")).to_pyarrow_table()
    model = tiny_models["llama"]
    for concept in load_concept_file(UNSEEN):
        lens, sel = neuronlens_scores(model, concept), selectivity_scores(model, concept)
        for method, scores, columns in (("neuronlens", lens, ("act_mean", "act_std", "range_low", "range_high")),
                                        ("selectivity", sel, ("selectivity", "consistency", "act_mean", "act_std"))):
            got = _of(rows, method, concept.name)
            assert len(got) == len(LAYERS) * model.d_mlp
            for (layer, neuron), row in got.items():
                assert row["ablation"] == "none"
                assert row["score"] == pytest.approx(float(scores.ranking_score[layer, neuron]), abs=1e-5)
                for column in columns:
                    assert row[column] == pytest.approx(float(scores.extra[column][layer, neuron]), abs=1e-5)
                assert row["range_low" if method == "selectivity" else "selectivity"] is None
        # Range ablation: the mean-ablation effect where the concept vector's activation lies inside
        # the concept's range, no effect where it does not.
        targets = resolve_targets(model.tokenizer, concept).ids
        acts = clean_pass(model, concept_vector(model, concept.examples), targets).acts
        neat = rows.filter(pc.and_(pc.equal(rows["method"], "neat"), pc.equal(rows["concept"], concept.name)))
        by_mode = {mode: {(r["layer"], r["neuron"]): r["effect"] for r in neat.to_pylist() if r["ablation"] == mode}
                   for mode in ("mean", "range")}
        inside = 0
        for (layer, neuron), effect in by_mode["range"].items():
            a = float(acts[layer, neuron])
            if float(lens.extra["range_low"][layer, neuron]) <= a <= float(lens.extra["range_high"][layer, neuron]):
                inside += 1
                assert effect == pytest.approx(by_mode["mean"][(layer, neuron)], abs=1e-5, rel=1e-4)
            else:
                assert effect == 0.0
        assert 0 < inside < len(by_mode["range"])  # both cases are exercised

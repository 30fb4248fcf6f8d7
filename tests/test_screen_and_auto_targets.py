"""The AtP screen scores exactly the neurons it selects, with the full engine's values, and reports
its agreement; a concept without targets gets derived ones, recorded in the run."""
from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
import yaml

from attribution.ablation import read_reference_texts
from attribution.auto_targets import derive_targets, promoted_tokens
from attribution.concepts import load_concept_file, resolve_targets
from attribution.neat import clean_pass, concept_vector, neat_effects
from cluster.config import load_job_config
from cluster.driver import run_job
from cluster.plan import resolve_job
from cluster.screen import screen_sample
from storage.read import open_neurons, run_metadata

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


pytestmark = pytest.mark.usefixtures("local_ray")


def _rows(atlas: Path, method: str) -> list[dict]:
    table = open_neurons(str(atlas)).to_pyarrow_table()
    return table.filter(pc.equal(table["method"], method)).to_pylist()


def test_screen_scores_atp_top_k_plus_sample_exactly(tmp_path, tiny_sources, tiny_models):
    source, model = tiny_sources["llama"], tiny_models["llama"]
    config_path = tmp_path / "screen.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": source.path, "concepts": str(UNSEEN), "layers": [0, 2, 3], "atlas": str(tmp_path / "atlas"),
        "methods": ["neat"], "run_id": "screened", "shard_neurons": 40, "batch_rows": 32,
        "method_options": {"screen_top": 10, "screen_sample": 25}, "cluster": {"actors": 2},
    }))
    plan = resolve_job(load_job_config(config_path))
    assert [s.method for s in plan.shards] == ["atp"] * 3  # NEAT shards come from the AtP pass
    run_job(plan)

    atp, neat = _rows(tmp_path / "atlas", "atp"), _rows(tmp_path / "atlas", "neat")
    assert len(atp) == 2 * 3 * 96
    sample = set(screen_sample(plan))
    for concept in load_concept_file(UNSEEN):
        by_atp = sorted((r for r in atp if r["concept"] == concept.name), key=lambda r: (-r["score"], r["layer"], r["neuron"]))
        scored = {(r["layer"], r["neuron"]): r for r in neat if r["concept"] == concept.name}
        # Every concept's AtP top-10 and the shared sample are scored, and nothing else is.
        top = {(r["layer"], r["neuron"]) for r in by_atp[:10]}
        assert top <= set(scored) and sample <= set(scored)
        assert len(scored) < 3 * 96
        # ... with the values of the full exact engine.
        targets = resolve_targets(model.tokenizer, concept).ids
        clean = clean_pass(model, concept_vector(model, concept.examples), targets)
        for layer in (0, 2, 3):
            neurons = sorted(n for (l, n) in scored if l == layer)
            full = neat_effects(model, clean, targets, layer, range(96), torch.zeros(96))
            for neuron in neurons:
                assert scored[(layer, neuron)]["effect"] == pytest.approx(float(full[neuron]), abs=1e-5, rel=1e-4)
        assert sorted(r["rank"] for r in scored.values()) == list(range(1, len(scored) + 1))
    report = run_metadata(str(tmp_path / "atlas"), "screened")["checks"]["atp_screen"]
    assert {r["concept"] for r in report} == {"weather", "music"}
    for entry in report:
        assert entry["sample"] == 25 and -1.0 <= entry["sample_spearman"] <= 1.0
        assert entry["estimated_missed_top100"] >= 0


def test_screen_needs_neat(tmp_path, tiny_sources):
    from cluster.config import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": tiny_sources["llama"].path, "concepts": str(UNSEEN), "atlas": "a",
                                    "methods": ["atp"], "method_options": {"screen_top": 5}}))
    with pytest.raises(ConfigError, match="methods must include neat"):
        resolve_job(load_job_config(path))


def test_derived_targets_are_the_word_tokens_the_concept_vector_promotes_most(smollm2):
    concept = next(c for c in load_concept_file(Path(__file__).parent.parent / "configs/concepts/builtin.yaml")
                   if c.name == "royalty")
    vector = concept_vector(smollm2, concept.examples)
    baseline = concept_vector(smollm2, read_reference_texts())
    targets = derive_targets(smollm2, vector, baseline, concept="royalty")
    assert targets.derived and len(targets.ids) == 8 and len(set(targets.ids)) == 8
    gain = promoted_tokens(smollm2, vector, baseline)
    # Each chosen token is a whole word, and no word token outside the set is promoted more.
    assert all(w.isalpha() and len(w) >= 3 for w in targets.words)
    weakest = min(float(gain[i]) for i in targets.ids)
    for token_id in torch.argsort(gain, descending=True)[:200].tolist():
        text = smollm2.tokenizer.decode([token_id])
        if float(gain[token_id]) > weakest and text.startswith(" ") and text.strip().isalpha() and len(text.strip()) >= 3:
            assert token_id in targets.ids or text.strip().lower() in {w.lower() for w in targets.words}
    # Royalty's vector promotes royal words: most of them are words a person would list for it.
    royal = {"throne", "royal", "prince", "palace", "monarch", "noble", "sovereign", "majesty", "princess",
             "kingdom", "empress", "queen", "king", "crown", "court", "pharaoh", "coron", "emperor", "reign"}
    assert len({w.lower() for w in targets.words} & royal) >= 5, targets.words

def test_a_concept_without_targets_runs_and_records_the_derived_ones(tmp_path, tiny_sources):
    concepts = tmp_path / "no_targets.yaml"
    concepts.write_text(yaml.safe_dump({"concepts": [
        {"name": "weather", "examples": ["Heavy rain is forecast for the weekend.", "Snow fell all night."]}]}))
    config_path = tmp_path / "auto.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": tiny_sources["gpt2"].path, "concepts": str(concepts), "layers": [3], "atlas": str(tmp_path / "atlas"),
        "run_id": "auto", "cluster": {"actors": 1},
    }))
    plan = resolve_job(load_job_config(config_path))
    assert plan.concepts[0].targets.pending
    run_job(plan)
    recorded = run_metadata(str(tmp_path / "atlas"), "auto")["concepts"][0]
    assert recorded["targets_derived"] and len(recorded["target_ids"]) == 8
    assert len(_rows(tmp_path / "atlas", "neat")) == 128

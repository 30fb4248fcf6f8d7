"""The in-distribution method of a run (`prompt`, screened by `prompt-atp`): the plan adds the screen,
the actor's rows equal a plain one-prompt-at-a-time loop, the screen takes prompt AtP's top neurons of
each concept, and the specificity rows of the prompt methods are checked by value."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
import yaml

import naive_neat
from attribution.prompt_effects import prompt_atp
from attribution.prompts import concept_prompts
from cluster.config import ConfigError, load_job_config
from cluster.plan import resolve_job
from cluster.scorer import ScorerSpec, ShardScorer
from cluster.screen import prompt_screen_shards
from storage.specificity import prompt_specificity_rows

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


def _plan(tmp_path, source, **extra):
    data = {"model": source.path, "concepts": str(UNSEEN), "layers": [0, 3], "atlas": str(tmp_path / "atlas"),
            "methods": ["prompt"], "ablation": ["zero", "mean"], "batch_rows": 16, "run_id": "prompts",
            "method_options": {"prompt_screen": 3}, **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return resolve_job(load_job_config(path))


def test_the_plan_adds_the_prompt_screen_and_needs_zero_or_mean(tmp_path, tiny_sources):
    plan = _plan(tmp_path, tiny_sources["llama"], ablation=["zero", "range"])
    assert plan.config.methods == ("prompt-atp", "prompt")
    assert "method prompt: added method prompt-atp (the screen's first pass)" in plan.warnings
    assert {s.method for s in plan.shards} == {"prompt-atp"}  # the exact pass is planned after the screen
    # Range ablation is NeuronLens's per-concept range: a prompt sets every position, so only zero is kept.
    assert plan.rows_per_neuron("prompt-atp") == 2 and plan.rows_per_neuron("prompt", "music") == 1
    with pytest.raises(ConfigError, match="method prompt sets a neuron at every position of a prompt, so it needs "
                                          "zero or mean"):
        _plan(tmp_path, tiny_sources["llama"], ablation=["range"])


def test_prompt_rows_equal_a_plain_loop_and_the_screen_takes_prompt_atps_top(tmp_path, tiny_sources, tiny_models):
    plan = _plan(tmp_path, tiny_sources["llama"])
    scorer = ShardScorer(ScorerSpec.from_plan(plan))
    screen = pa.concat_tables([scorer.score_table(shard) for shard in plan.shards])
    model = tiny_models["llama"]
    hf, tokenizer = naive_neat.load(tiny_sources["llama"].path)
    largest, estimates = {}, {}
    for rc in plan.concepts:
        prompts = concept_prompts(model.tokenizer, rc.concept, rc.targets.ids)
        for mode in ("zero", "mean"):
            values = scorer._ablate_to(rc, mode)
            atp = prompt_atp(model, prompts, values)  # [n_layers, d_mlp]
            rows = screen.filter(pc.and_(pc.equal(screen["concept"], rc.concept.name), pc.equal(screen["ablation"], mode)))
            got = {(r["layer"], r["neuron"]): r["effect"] for r in rows.to_pylist()}
            assert len(got) == 2 * plan.d_mlp
            assert max(abs(got[(layer, i)] - float(atp[layer, i])) for layer, i in got) < 1e-6
            largest.setdefault(rc.concept.name, set()).update(sorted(got, key=lambda key: -abs(got[key]))[:3])
            estimates[(rc.concept.name, mode)] = got
    shards = prompt_screen_shards(plan, screen)  # no reference contrast here: the other concept is the contrast
    picks = {}
    for shard in shards:
        picks.setdefault(shard.concept, set()).update((shard.layer, n) for n in shard.neurons)
    names = sorted(picks)
    for name in names:
        other = next(n for n in names if n != name)
        assert largest[name] <= picks[name] and len(picks[name]) <= 2 * 6  # the largest estimates, per ablation
        for mode in ("zero", "mean"):
            own, off = estimates[(name, mode)], estimates[(other, mode)]
            # The specific candidates carry the concept; the first maximises |e| - 10 |off| (plain greedy step 1).
            first = max((key for key in own if own[key] < 0), key=lambda key: -own[key] - 10 * abs(off[key]))
            assert first in picks[name]
        assert all(any(estimates[(name, m)][key] < 0 for m in ("zero", "mean")) for key in picks[name] - largest[name])

    exact = pa.concat_tables([scorer.score_table(shard) for shard in shards])
    assert exact.num_rows == sum(2 * len(s.neurons) for s in shards)  # its own concept only, both ablations
    changes = []
    for row in exact.to_pylist():
        rc = next(rc for rc in plan.concepts if rc.concept.name == row["concept"])
        values = scorer._ablate_to(rc, row["ablation"])
        prompts = concept_prompts(model.tokenizer, rc.concept, rc.targets.ids)
        neuron = [(row["layer"], row["neuron"])]
        change = np.mean([naive_neat.prompt_log_p(hf, tokenizer, p, neuron, values)
                          - naive_neat.prompt_log_p(hf, tokenizer, p, [], values) for p in prompts])
        assert row["method"] == "prompt" and row["score"] == pytest.approx(abs(row["effect"]))
        assert abs(row["effect"] - change) < 2e-5, row
        changes.append(change)
    assert max(abs(c) for c in changes) > 1e-3, "the effects compared must be far from zero"


def test_prompt_specificity_rows_by_value():
    """Two run concepts on one layer of 6 neurons, two reference concepts: the prompt rows of concept a
    (its 4 screened neurons) against the reference prompt AtP and concept b's prompt AtP."""
    d = 6
    atp = {"a": [-0.9, -0.5, 0.8, -0.3, 0.05, -0.2], "b": [-0.8, 0.1, 0.0, 0.05, 0.3, 0.0]}
    reference = {"zero": np.array([[[0.1, 0.02, -0.4, 0.03, 0.0, 0.01]],
                                   [[-0.2, 0.04, 0.1, -0.06, 0.0, 0.0]]], dtype=np.float32)}  # [2, 1 layer, 6]
    screened = {1: -0.6, 2: 0.7, 3: -0.4, 5: -0.25}  # concept a's exact prompt effects
    rows = []
    for concept, effects in atp.items():
        rows += [{"concept": concept, "method": "prompt-atp", "ablation": "zero", "layer": 0, "neuron": i,
                  "effect": e} for i, e in enumerate(effects)]
    rows += [{"concept": "a", "method": "prompt", "ablation": "zero", "layer": 0, "neuron": i, "effect": e}
             for i, e in screened.items()]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("concept", pa.string()), ("method", pa.string()), ("ablation", pa.string()), ("layer", pa.int32()),
        ("neuron", pa.int32()), ("effect", pa.float32())]))
    out = prompt_specificity_rows(table, reference, ["ref1", "ref2"], run_id="r", model="m", layers=[0])
    mine = {r["neuron"]: r for r in out.to_pylist() if r["method"] == "prompt"}
    assert sorted(mine) == sorted(screened)
    for i, effect in screened.items():
        off = {"ref1": reference["zero"][0, 0, i], "ref2": reference["zero"][1, 0, i], "b": atp["b"][i]}
        worst = max(off, key=lambda name: abs(off[name]))
        assert mine[i]["off_target"] == pytest.approx(abs(off[worst])) and mine[i]["off_target_concept"] == worst
        floor = 0.05 * max(abs(e) for e in screened.values())
        assert mine[i]["specificity"] == pytest.approx(abs(effect) / max(abs(off[worst]), floor), rel=1e-5)
    # Only carrying neurons (effect < 0) are ranked; the first maximises |e| - 10 max|off| (1: 0.6 - 10*0.1 = -0.4,
    # 3: 0.4 - 10*0.06 = -0.2, 5: 0.25 - 10*0.01 = 0.15).
    assert mine[2]["specific_rank"] is None
    assert mine[5]["specific_rank"] == 1
    assert sorted(r["specific_rank"] for r in mine.values() if r["specific_rank"]) == [1, 2, 3]
    screen_rows = [r for r in out.to_pylist() if r["method"] == "prompt-atp" and r["concept"] == "a"]
    assert len(screen_rows) == d
    assert {r["neuron"] for r in screen_rows if r["specific_rank"] is not None} <= {0, 1, 3, 5}

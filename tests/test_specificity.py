"""The specific ranking: the greedy set selection's properties on known effects, the reference
contrast equals AtP, and a run stores a specificity table that query, validate and report use."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attribution.measured_selection import CONFIRMED, PENALTIES
from attribution.specificity import CARRY_PENALTY, generic_mask, specific_order, specificity_ratio

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"


def test_specific_order_prefers_neurons_that_move_only_the_concept():
    # Neurons 0-1: large own effects, as large on contrast concept 0 (generic). Neurons 2-4: medium own
    # effects, little elsewhere (specific). Neuron 5: large and opposite in sign, but it moves concept 1.
    # Neurons 6-7: specific, opposite in sign to 2-4 (their sum would cancel).
    effect = torch.tensor([5.0, 4.0, 2.0, 2.0, 1.5, -3.0, -1.0, -0.9])
    off = torch.tensor([[5.0, 4.5, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.1, 0.0, 0.2, 2.0, 0.0, 0.0]])
    order = specific_order(effect, off, k=3, penalty=5.0).tolist()
    assert set(order) == {2, 3, 4}  # the specific ones of one sign, before the generic and the cancelling
    assert specific_order(effect, off, k=100).numel() == len(effect)
    # With no penalty the largest own effects come first, as raw NEAT ranks them.
    assert specific_order(effect, off, k=2, penalty=0.0).tolist() == [0, 1]


def test_specificity_ratio_and_generic_mask():
    effect = torch.tensor([2.0, 2.0, 0.001])
    off = torch.tensor([[1.0, 0.0, 0.0], [-4.0, 0.0, 0.0]])
    ratio = specificity_ratio(effect, off, floor=0.1)
    assert ratio.tolist() == pytest.approx([0.5, 20.0, 0.01])
    effects = torch.rand(4, 200, generator=torch.Generator().manual_seed(0)) * 0.1
    effects[:, 7] = 10.0  # top of every concept
    effects[0, 8] = 10.0  # top of one concept only
    assert generic_mask(effects).nonzero().flatten().tolist() == [7]


def test_reference_effects_equal_atp_of_each_concept(tiny_models):
    from attribution.atp import atp_effects, log_p_gradients
    from attribution.concepts import resolve_targets
    from attribution.neat import clean_pass, concept_vector
    from attribution.reference import reference_concepts, reference_effects

    model = tiny_models["llama"]
    concepts = reference_concepts()[:2]
    mean = torch.randn(model.n_layers, model.d_mlp, generator=torch.Generator().manual_seed(0))
    result = reference_effects(model, concepts, {"zero": torch.zeros(model.n_layers, model.d_mlp), "mean": mean})
    assert result.concepts == tuple(c.name for c in concepts)
    for i, concept in enumerate(concepts):
        ids = resolve_targets(model.tokenizer, concept).ids
        clean = clean_pass(model, concept_vector(model, concept.examples), ids)
        grads = log_p_gradients(model, clean, ids)
        for mode, values in (("zero", torch.zeros(model.n_layers, model.d_mlp)), ("mean", mean)):
            for layer in range(model.n_layers):
                expected = atp_effects(grads, clean, layer, range(model.d_mlp), values[layer])
                assert torch.allclose(result.effects[mode][i, layer], expected, atol=1e-6)


def test_reference_set_is_broad_clean_and_disjoint():
    """30+ concepts of 10+ examples each, every target one token of SmolLM2's tokenizer, no target token
    shared between concepts, nothing shared with the built-ins or the benchmark's held-out concepts."""
    from pathlib import Path

    from attribution.concepts import load_concept_file
    from attribution.reference import reference_concepts
    from tiny_models import smollm2_tokenizer

    root = Path(__file__).resolve().parent.parent
    reference = reference_concepts()
    others = (load_concept_file(root / "configs" / "concepts" / "builtin.yaml")
              + load_concept_file(root / "benchmarks" / "data" / "heldout_concepts.yaml"))
    tokenizer = smollm2_tokenizer()
    assert len(reference) >= 30 and all(len(c.examples) >= 10 and len(c.targets) >= 5 for c in reference)
    owner = {}
    for concept in reference + others:
        for word in concept.targets:
            ids = tokenizer.encode(" " + word, add_special_tokens=False)
            assert len(ids) == 1, (concept.name, word)
            assert owner.setdefault(ids[0], concept.name) == concept.name, (concept.name, word, owner[ids[0]])
    assert not {c.name for c in reference} & {c.name for c in others}
    examples = {e for c in reference for e in c.examples}
    assert not examples & {e for c in others for e in c.examples}


def _scored_run(tmp_path, source, run_id: str, *, contrast: bool = True) -> str:
    """A run scored and committed without Ray: every shard through ShardScorer, the reference contrast
    dealt to two scorer calls as the driver deals it to two actors, then the specificity table."""
    from pathlib import Path

    import pyarrow as pa
    import yaml

    from attribution.reference import reference_concepts
    from cluster.config import load_job_config
    from cluster.contrast_step import merge_reference_parts, specificity_table
    from cluster.plan import resolve_job
    from cluster.scorer import ScorerSpec, ShardScorer
    from storage.commit import commit_run
    from storage.specificity import write_specificity

    data = {"model": source.path, "concepts": str(Path(__file__).parent / "data" / "unseen_concepts.yaml"),
            "layers": [0, 3], "atlas": str(tmp_path / "atlas"), "ablation": "zero", "shard_neurons": 96,
            "batch_rows": 64, "run_id": run_id, "methods": ["neat"]}
    path = tmp_path / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(data))
    plan = resolve_job(load_job_config(path))
    scorer = ShardScorer(ScorerSpec.from_plan(plan))
    rows = pa.concat_tables([scorer.score_table(shard) for shard in plan.shards])
    names = [c.name for c in reference_concepts()]
    merged = merge_reference_parts(names, [scorer.reference_effects(names[0::2]), scorer.reference_effects(names[1::2])])
    atlas = str(tmp_path / "atlas")
    from cluster.driver import run_metadata

    metadata = run_metadata(plan, [scorer.describe()], [], resumed=0, wall_seconds=0.0)
    commit_run(atlas, rows, run_id=run_id, metadata=metadata)
    if contrast:
        write_specificity(atlas, specificity_table(rows, merged, run_id=run_id, model=plan.model.name, layers=[0, 3]))
    return atlas


def test_a_run_stores_the_specific_ranking_that_query_shows_by_default(tmp_path, tiny_sources, tiny_models, capsys):
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from attribution.reference import reference_concepts, reference_effects
    from jobs.cli import main
    from storage.read import open_neurons

    atlas = _scored_run(tmp_path, tiny_sources["llama"], "spec1")
    table = DeltaTable(f"{atlas}/specificity").to_pyarrow_table()
    model = tiny_models["llama"]
    assert table.num_rows == 2 * 2 * model.d_mlp  # concepts x layers x neurons
    # The stored ranking is the greedy selection recomputed here from the run's effects and an
    # in-process reference contrast.
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    reference = reference_effects(model, reference_concepts(), {"zero": zeros}).effects["zero"][:, [0, 3]]
    rows = open_neurons(atlas).to_pyarrow_table().sort_by([("layer", "ascending"), ("neuron", "ascending")])
    effect = {c: torch.tensor(rows.filter(pc.equal(rows["concept"], c))["effect"].to_pylist()) for c in ("music", "weather")}
    off = torch.cat([reference.reshape(reference.shape[0], -1), effect["weather"][None]])
    expected = specific_order(effect["music"], off, k=5).tolist()
    music = table.filter(pc.equal(table["concept"], "music")).sort_by("specific_rank").slice(0, 5)
    position = {0: 0, 3: 1}  # the run's layers, in order
    assert [position[r["layer"]] * model.d_mlp + r["neuron"] for r in music.to_pylist()] == expected
    assert main(["query", "--atlas", atlas, "--concept", "music", "--top", "5"]) == 0
    assert "ranked by specificity" in capsys.readouterr().err
    assert main(["query", "--atlas", atlas, "--concept", "music", "--top", "5", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["specific_rank"] for r in shown] == [1, 2, 3, 4, 5]
    assert [(r["layer"], r["neuron"]) for r in shown] == [(r["layer"], r["neuron"]) for r in music.to_pylist()]
    assert main(["query", "--atlas", atlas, "--concept", "music", "--top", "3", "--rank-by", "score",
                 "--format", "json"]) == 0
    assert [r["rank"] for r in json.loads(capsys.readouterr().out)] == [1, 2, 3]
    out = tmp_path / "report.html"
    assert main(["report", "--atlas", atlas, "--concept", "music", "--top", "5", "--out", str(out)]) == 0
    assert "the specific ranking" in capsys.readouterr().err and "specific rank" in out.read_text()


def test_without_the_reference_contrast_query_falls_back_to_scores_and_says_so(tmp_path, tiny_sources, capsys):
    from jobs.cli import main

    atlas = _scored_run(tmp_path, tiny_sources["gpt2"], "plain", contrast=False)
    assert main(["query", "--atlas", atlas, "--concept", "music", "--top", "3"]) == 0
    assert "ranked by score (raw neat): run plain has no reference contrast" in capsys.readouterr().err


@pytest.mark.usefixtures("local_ray")
def test_the_driver_records_the_reference_contrast_and_writes_the_specificity_table(tmp_path, tiny_sources, capsys):
    """Also the prompt method through Ray: its screen's second pass, the reference concepts' prompt AtP,
    the prompt rows' specificity, its screen check, and `query --sign`."""
    from pathlib import Path

    import yaml
    from deltalake import DeltaTable

    from attribution.reference import reference_concepts
    from cluster.config import load_job_config
    from cluster.driver import run_job
    from cluster.plan import resolve_job
    from jobs.cli import main
    from storage.read import open_neurons, run_metadata

    atlas = tmp_path / "atlas"
    # validate's random baseline of music's prompts, which the run's measured choice caches: removed
    # first, so that finding it below shows this run made it.
    baseline = _music_baseline(tiny_sources["gpt2"].path)
    baseline["path"].unlink(missing_ok=True)
    for state in baseline["neutral_states"]:
        state.unlink(missing_ok=True)
    # "off" has one actor: it is there for its metadata and its absence from the specificity table (the
    # reference contrast is dealt to 2 actors in "on"); a second actor would only add its start-up.
    for run_id, extra in (("on", {"methods": ["neat", "prompt"], "method_options": {"prompt_screen": 4}}),
                          ("off", {"reference_contrast": False, "cluster": {"actors": 1, "cpus_per_actor": 1}})):
        data = {"model": tiny_sources["gpt2"].path, "layers": [1], "atlas": str(atlas), "ablation": "zero",
                "concepts": str(Path(__file__).parent / "data" / "unseen_concepts.yaml"), "run_id": run_id,
                "cluster": {"actors": 2, "cpus_per_actor": 1}, **extra}
        path = tmp_path / f"{run_id}.yaml"
        path.write_text(yaml.safe_dump(data))
        run_job(resolve_job(load_job_config(path)))
    on = run_metadata(str(atlas), "on")
    assert on["reference_contrast"]["concepts"] == [c.name for c in reference_concepts()]
    assert on["reference_contrast"]["ablations"] == on["reference_contrast"]["prompt_ablations"] == ["zero"]
    assert run_metadata(str(atlas), "off")["reference_contrast"]["enabled"] is False
    stored = DeltaTable(f"{atlas}/specificity").to_pyarrow_table()
    assert set(stored["run_id"].to_pylist()) == {"on"} and set(stored["concept"].to_pylist()) == {"music", "weather"}
    assert set(stored["method"].to_pylist()) == {"neat", "prompt-atp", "prompt"}

    rows = open_neurons(str(atlas)).to_pyarrow_table().filter(pc_equal("run_id", "on"))
    for concept in ("music", "weather"):
        screen = rows.filter(pc_equal("method", "prompt-atp")).filter(pc_equal("concept", concept)).to_pylist()
        exact = rows.filter(pc_equal("method", "prompt")).filter(pc_equal("concept", concept)).to_pylist()
        # Scored exactly: the concept's own prompt AtP top 4 and up to 4 specific candidates that carry it.
        top = {r["neuron"] for r in sorted(screen, key=lambda r: -r["score"])[:4]}
        estimate = {r["neuron"]: r["effect"] for r in screen}
        scored = {r["neuron"] for r in exact}
        assert top <= scored and len(scored) <= 8 and all(estimate[n] < 0 for n in scored - top)
        check = next(c for c in on["checks"]["prompt_screen"] if c["concept"] == concept)
        assert check["scored_exactly"] == len(scored) and -1 <= check["spearman"] <= 1
        prompt_ranked = stored.filter(pc_equal("method", "prompt")).filter(pc_equal("concept", concept)).to_pylist()
        assert all(r["effect"] < 0 for r in prompt_ranked if r["specific_rank"] is not None)
        # The measured choice (cluster/measured_step.py): every penalty's set measured, the rule applied,
        # and the stored ranking leads with the chosen set.
        made = on["measured_choice"][concept]["zero"]
        by_penalty = {c["penalty"]: c for c in made["candidates"]}
        assert sorted(by_penalty) == sorted(PENALTIES)
        best = max(c["specificity"] for c in made["candidates"])
        assert (made["chosen_penalty"] == CARRY_PENALTY if by_penalty[CARRY_PENALTY]["specificity"] >= CONFIRMED
                else by_penalty[made["chosen_penalty"]]["specificity"] == best)
        ranked = sorted((r for r in prompt_ranked if r["specific_rank"] is not None), key=lambda r: r["specific_rank"])
        chosen = [tuple(n) for n in made["neurons"]]
        assert chosen and [(r["layer"], r["neuron"]) for r in ranked][:len(chosen)] == chosen

    capsys.readouterr()
    assert main(["query", "--atlas", str(atlas), "--concept", "music", "--run", "on", "--method", "prompt-atp",
                 "--sign", "suppress", "--top", "5", "--format", "json"]) == 0
    import json

    shown = json.loads(capsys.readouterr().out)
    raised = sorted((r for r in rows.filter(pc_equal("method", "prompt-atp")).filter(pc_equal("concept", "music"))
                     .to_pylist() if r["effect"] > 0), key=lambda r: -r["effect"])[:5]
    assert [r["neuron"] for r in shown] == [r["neuron"] for r in raised]
    # Without --method, query shows the in-distribution method where the run scored it, and says so.
    assert main(["query", "--atlas", str(atlas), "--concept", "music", "--run", "on", "--top", "3"]) == 0
    err = capsys.readouterr().err
    assert "method prompt (ablation on the concept's own prompts" in err and "that carry music" in err
    made = on["measured_choice"]["music"]["zero"]
    assert f"{made['specificity']:.1f}x the largest change of a reference or run concept" in err
    page = tmp_path / "music.html"  # the report's top table says the same
    assert main(["report", "--atlas", str(atlas), "--concept", "music", "--run", "on", "--out", str(page)]) == 0
    assert f"{made['specificity']:.1f}x the largest change of a reference or run concept" in page.read_text()
    # Each concept's own candidates: no cross-concept contrast of raw scores exists for method prompt.
    assert main(["query", "--atlas", str(atlas), "--concept", "music", "--run", "on", "--rank-by", "contrastive"]) == 2
    assert "method prompt scores each concept's own candidates only" in capsys.readouterr().err
    # validate judges a prompt ranking on the prompts first; the concept vector's columns are vector_*.
    assert main(["validate", "--atlas", str(atlas), "--concept", "music", "--run", "on", "--k", "2", "--draws", "2",
                 "--device", "cpu"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[:4] == ["k", "prompt_change", "prompt_random", "prompt_specificity"]
    assert "vector_specificity" in header and "specificity" not in header
    # What the run measured for its chosen set is what validate measures: the same panel (the reference
    # set and the run's other concepts), every prompt of each.
    made = on["measured_choice"]["music"]["zero"]
    assert main(["validate", "--atlas", str(atlas), "--concept", "music", "--run", "on", "--k",
                 str(len(made["neurons"])), "--draws", "2", "--device", "cpu", "--format", "json"]) == 0
    (validated,) = json.loads(capsys.readouterr().out)
    assert abs(validated["prompt_change"] - made["own_change"]) < 1e-5
    assert validated["prompt_specificity"] == pytest.approx(made["specificity"], rel=1e-3) or made["own_change"] >= 0
    # validate with its defaults reads the random draws' prompt changes the run cached, and they are
    # the ones computed here.
    assert baseline["path"].exists()
    assert all(state.exists() for state in baseline["neutral_states"])  # and the neutral text's clean states
    assert main(["validate", "--atlas", str(atlas), "--concept", "music", "--run", "on", "--device", "cpu",
                 "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "random draws' changes (4 k x 20) from the cache" in captured.err
    direct = baseline["compute"]()
    rows = json.loads(captured.out)  # k 1, 5, 10, 50 (a row's k is its set's size: the ranking may be shorter)
    assert len(rows) == 4
    for k, row in zip((1, 5, 10, 50), rows):
        assert row["prompt_random_mean"] == pytest.approx(sum(direct[k]) / 20, abs=2e-5)


def _music_baseline(model_path: str) -> dict:
    """The cache file of validate's default random baseline on music's prompts (zero, layer 1), a
    function computing those changes afresh, and the clean-state files of the neutral text."""
    from attribution.ablation import read_reference_texts
    from attribution.baseline_cache import DEFAULT_DRAWS, DEFAULT_KS, DEFAULT_SEED, baseline_key
    from attribution.clean_cache import states_key
    from attribution.concepts import load_concept_file, resolve_targets
    from attribution.models import cache_dir, load_model, resolve_model_source
    from attribution.prompts import concept_prompts
    from attribution.validation import draws_by_k, random_prompt_changes

    model = load_model(resolve_model_source(model_path), device="cpu")
    music = next(c for c in load_concept_file(str(UNSEEN)) if c.name == "music")
    prompts = concept_prompts(model.tokenizer, music, resolve_targets(model.tokenizer, music).ids)
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    key = baseline_key(model, prompts, zeros, None, [1], list(DEFAULT_KS), DEFAULT_DRAWS, DEFAULT_SEED)
    assert key is not None
    return {"path": cache_dir() / "validate-baselines" / f"{key}.json",
            "neutral_states": [cache_dir() / "clean-states" / f"{states_key(model, ids)}.npy"
                               for ids in model.tokenizer(read_reference_texts())["input_ids"]],
            "compute": lambda: random_prompt_changes(model, prompts, draws_by_k([1], model.d_mlp, list(DEFAULT_KS),
                                                                               DEFAULT_DRAWS, DEFAULT_SEED), zeros)}


def pc_equal(column: str, value):
    """An Arrow filter expression column == value."""
    import pyarrow.compute as pc

    return pc.field(column) == value


def test_sql_has_a_specificity_view(tmp_path, tiny_sources, capsys):
    from jobs.cli import main
    from storage.read import sql_query

    atlas = _scored_run(tmp_path, tiny_sources["gpt2"], "sq")
    top = sql_query(atlas, "SELECT layer, neuron FROM specificity WHERE concept = 'music' AND specific_rank <= 3 "
                           "ORDER BY specific_rank").to_pylist()
    assert main(["query", "--atlas", atlas, "--concept", "music", "--top", "3", "--format", "json"]) == 0
    assert [(r["layer"], r["neuron"]) for r in json.loads(capsys.readouterr().out)] == \
        [(r["layer"], r["neuron"]) for r in top]
    empty = tmp_path / "empty"
    empty.mkdir()
    _scored_run(empty, tiny_sources["gpt2"], "none", contrast=False)
    assert sql_query(str(empty / "atlas"), "SELECT count(*) AS n FROM specificity").to_pylist() == [{"n": 0}]


def test_validate_ablates_the_specific_ranking_against_the_panel_by_default(tmp_path, tiny_sources, capsys):
    from attribution.reference import reference_concepts
    from jobs.cli import main
    from storage.specificity import specific_neurons
    from storage.validation import read_validations

    atlas = _scored_run(tmp_path, tiny_sources["gpt2"], "val")
    assert main(["validate", "--atlas", atlas, "--concept", "music", "--k", "1,3", "--draws", "3", "--device", "cpu",
                 "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "ranked by specificity" in captured.err and "validate: own prompts" in captured.err  # the ranking, progress
    rows = json.loads(captured.out)
    assert [r["method"] for r in rows] == ["neat/specific"] * 2
    panel = {"weather"} | {c.name for c in reference_concepts()}
    assert set(rows[0]["other_changes"]) == panel and rows[0]["panel"] == len(panel)
    for row in rows:
        assert row["specificity"] == pytest.approx(abs(row["top_change"]) /
                                                   max(abs(v) for v in row["other_changes"].values()))
        # On real text: the panel's prompts (4 each by default), own prompt change against the largest.
        assert set(row["prompt_other_changes"]) == panel
        assert row["prompt_specificity"] == pytest.approx(abs(row["prompt_change"]) /
                                                          max(abs(v) for v in row["prompt_other_changes"].values()))
    stored = read_validations(atlas, concept="music")
    assert stored["specificity"].to_pylist() == pytest.approx([r["specificity"] for r in rows])
    assert stored["prompt_specificity"].to_pylist() == pytest.approx([r["prompt_specificity"] for r in rows])
    # The ablated top-1 is the specific ranking's first neuron: its change is that neuron's effect.
    first = specific_neurons(atlas, run_id="val", concept="music", top=1).to_pylist()[0]
    assert rows[0]["top_change"] == pytest.approx(first["effect"], abs=1e-4)

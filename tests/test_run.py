"""End to end on local Ray with tiny real models: the atlas equals an independent naive NEAT,
1 and 2 actors give identical rows, an interrupted run resumes, a failed run changes nothing."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
import yaml

import naive_neat
from attribution.concepts import load_concept_file
from cluster.config import load_job_config
from cluster.driver import RunError, run_job, todo_shards
from cluster.plan import Shard, resolve_job
from cluster.scorer import ScorerSpec, ShardScorer
from jobs.cli import main
from storage.errors import AtlasError
from storage.read import open_neurons, run_metadata, top_neurons
from storage.staging import claim_staging

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"
NEUTRAL = Path(__file__).resolve().parent.parent / "configs" / "reference" / "neutral.txt"
KEY = ["concept", "ablation", "layer", "neuron"]


pytestmark = pytest.mark.usefixtures("local_ray")


def make_config(tmp_path: Path, source, *, atlas: Path, actors: int = 2, **extra):
    data = {"model": source.path, "concepts": str(UNSEEN), "layers": [0, 3], "atlas": str(atlas),
            "ablation": ["zero", "mean"], "shard_neurons": 40, "batch_rows": 32,
            "cluster": {"actors": actors, "cpus_per_actor": 1}, **extra}
    path = tmp_path / f"job-{actors}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_job_config(path)


def atlas_rows(atlas: Path, run_id: str):
    table = open_neurons(str(atlas)).to_pyarrow_table()
    table = table.filter(pc.equal(table["run_id"], run_id))
    return table.drop_columns(["run_id", "created_at"]).sort_by([(k, "ascending") for k in KEY])


@pytest.fixture(scope="module")
def shared_run(local_ray, tmp_path_factory, tiny_sources):
    """shared_run(family, **config) -> (plan, atlas, summary): a run of make_config's job (2 actors) committed
    once per module and read by every test that needs that same run (a run costs ~10-20 s, mostly its actors'
    start). Tests only read it; a test that writes to an atlas copies it first (`copy_atlas`)."""
    made = {}

    def run(family: str, **extra):
        key = (family, tuple(sorted(extra.items())))
        if key not in made:
            directory = tmp_path_factory.mktemp(f"shared-{family}")
            run_id = "-".join(["shared", family, *(str(value) for _, value in key[1])])  # e.g. shared-gpt2-zero
            plan = resolve_job(make_config(directory, tiny_sources[family], atlas=directory / "atlas", run_id=run_id,
                                           **extra))
            made[key] = (plan, directory / "atlas", run_job(plan))
        return made[key]

    return run


def copy_atlas(atlas: Path, tmp_path: Path) -> Path:
    """A copy of a shared run's local atlas (Delta logs hold relative paths) that a test may write to."""
    return Path(shutil.copytree(atlas, tmp_path / "atlas"))


def test_one_and_two_actors_give_identical_atlases(tmp_path, tiny_sources, shared_run):
    two, two_atlas, two_summary = shared_run("llama")  # 2 actors
    one = resolve_job(make_config(tmp_path, tiny_sources["llama"], atlas=tmp_path / "atlas1", actors=1, run_id="r1"))
    assert one.shards == two.shards and len(one.shards) >= 4
    assert one.config.cluster.actors == 1 and two.config.cluster.actors == 2
    for summary in (run_job(one), two_summary):
        assert summary.rows == 2 * 2 * 2 * 96 and summary.version == 1
    assert atlas_rows(tmp_path / "atlas1", "r1").equals(atlas_rows(two_atlas, two.run_id))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_atlas_scores_equal_an_independent_naive_neat(tiny_sources, shared_run, family):
    """Zero and mean ablation through Ray, against naive_neat's effects; its means come from the
    reference file read and tokenized here, one text at a time."""
    source = tiny_sources[family]
    plan, atlas, _ = shared_run(family)
    model, tokenizer = naive_neat.load(source.path)
    lines = [line.strip() for line in NEUTRAL.read_text().splitlines()]
    means = naive_neat.reference_means(model, tokenizer, [t for t in lines if t and not t.startswith("#")])
    d_mlp = plan.d_mlp
    for concept in load_concept_file(UNSEEN):
        for ablation, neurons in (("zero", range(d_mlp)), ("mean", range(0, d_mlp, 3))):
            rows = top_neurons(str(atlas), concept=concept.name, ablation=ablation, top=10_000).to_pylist()
            assert len(rows) == 2 * d_mlp and [r["rank"] for r in rows] == list(range(1, 2 * d_mlp + 1))
            assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
            for layer in (0, 3):
                expected = naive_neat.effects(model, tokenizer, concept.examples, concept.targets, layer, neurons,
                                              means=means if ablation == "mean" else None)
                got = {r["neuron"]: r for r in rows if r["layer"] == layer}
                for neuron, effect in zip(neurons, expected):
                    assert abs(got[neuron]["effect"] - effect) <= 1e-5 + 1e-4 * abs(effect), (ablation, layer, neuron)
                    assert got[neuron]["score"] == pytest.approx(abs(got[neuron]["effect"]))


def test_a_bf16_run_keeps_the_float32_ranking_and_records_its_dtype(tmp_path, tiny_sources, shared_run):
    from attribution.stats import spearman

    exact_plan, exact_atlas, _ = shared_run("llama")  # the same job in float32, zero and mean: its zero rows
    run_job(resolve_job(make_config(tmp_path, tiny_sources["llama"], atlas=tmp_path / "atlas", run_id="bf16",
                                    dtype="bf16", ablation="zero")))
    float32 = atlas_rows(exact_atlas, exact_plan.run_id)
    runs = {"float32": float32.filter(pc.equal(float32["ablation"], "zero")).drop_columns(["rank"]),
            "bf16": atlas_rows(tmp_path / "atlas", "bf16").drop_columns(["rank"])}
    assert run_metadata(str(exact_atlas), exact_plan.run_id)["dtype"] == "float32"
    assert run_metadata(str(tmp_path / "atlas"), "bf16")["dtype"] == "bf16"
    exact, fast = (torch.tensor(runs[d]["score"].to_pylist()) for d in ("float32", "bf16"))
    assert runs["float32"].drop_columns(["score", "effect"]).equals(runs["bf16"].drop_columns(["score", "effect"]))
    assert spearman(exact, fast) > 0.999 and float((exact - fast).abs().max()) <= 0.02 * float(exact.max())
    assert set(exact.topk(10).indices.tolist()) == set(fast.topk(10).indices.tolist())
    # The bf16 run checked itself against the float32 engine on a seeded sample (here: all 192 neurons of
    # layers 0 and 3), and recorded the precision flags in force.
    meta = run_metadata(str(tmp_path / "atlas"), "bf16")
    checks = {entry["concept"]: entry for entry in meta["checks"]["bf16"]}
    assert set(checks) == set(runs["bf16"]["concept"].to_pylist())
    for concept, entry in checks.items():
        mine = [r["concept"] == concept for r in runs["bf16"].to_pylist()]
        fast_c, exact_c = fast[torch.tensor(mine)], exact[torch.tensor(mine)]
        assert entry["neurons"] == len(fast_c) == 2 * 96 and entry["top_k"] == 19
        # The check's float32 engine reads the actor's bf16-held weights (upcast), so it measures the engine's
        # propagation error only, not the rounding of the weights: it agrees at least as well as this run pair.
        assert entry["spearman"] > 0.999 and entry["spearman"] >= spearman(exact_c, fast_c) - 1e-3
        assert entry["top_k_agreement"] > 0.9
        assert 0 < entry["max_abs_diff"] <= float((exact_c - fast_c).abs().max()) + 0.002 * float(exact_c.abs().max())
    assert meta["precision"]["float32_matmul_precision"] in ("highest", "high", "medium")
    assert meta["precision"]["pinned"] is False  # CPU: nothing to pin
    assert "bf16" not in run_metadata(str(exact_atlas), exact_plan.run_id)["checks"]


def test_interrupted_run_resumes_only_missing_shards_with_identical_rows(tmp_path, tiny_sources, shared_run):
    source = tiny_sources["llama"]
    reference, reference_atlas, _ = shared_run("llama")  # the same job, undisturbed
    plan = resolve_job(make_config(tmp_path, source, atlas=tmp_path / "resumed", run_id="same"))
    # A run that died after staging three shards (the driver claims the staging area first).
    claim_staging(str(tmp_path / "resumed"), run_id="same", fingerprint=plan.fingerprint)
    scorer = ShardScorer(ScorerSpec.from_plan(plan))
    for shard in plan.shards[:3]:
        scorer.score(shard)
    todo, done = todo_shards(plan)
    assert done == 3 and len(todo) == len(plan.shards) - 3
    # The same run id with another batch make-up would mix two computations: refused, nothing lost.
    changed = resolve_job(make_config(tmp_path, source, atlas=tmp_path / "resumed", run_id="same", batch_rows=16))
    with pytest.raises(AtlasError, match="staged shards of a different plan"):
        run_job(changed)
    assert todo_shards(plan)[1] == 3
    summary = run_job(plan)
    assert summary.shards_resumed == 3
    assert run_metadata(str(tmp_path / "resumed"), "same")["shards"] == {
        "planned": len(plan.shards), "resumed": 3, "computed": len(plan.shards) - 3}
    assert plan.shards == reference.shards
    assert atlas_rows(reference_atlas, reference.run_id).equals(atlas_rows(tmp_path / "resumed", "same"))


def test_failed_run_leaves_the_atlas_as_it_was(tmp_path, tiny_sources, shared_run):
    good = shared_run("gpt2")[0].run_id
    atlas = copy_atlas(shared_run("gpt2")[1], tmp_path)  # an atlas holding one committed run
    before = open_neurons(str(atlas)).version()
    plan = resolve_job(make_config(tmp_path, tiny_sources["gpt2"], atlas=atlas, run_id="bad"))
    broken = replace(plan, shards=plan.shards + (Shard("neat", 0, 120, 200),))  # past the 128 neurons
    with pytest.raises(RunError, match="shard neat-L000-n000120-000200 failed"):
        run_job(broken)
    assert open_neurons(str(atlas)).version() == before
    assert set(open_neurons(str(atlas)).to_pyarrow_table()["run_id"].to_pylist()) == {good}
    with pytest.raises(RunError, match="already committed"):
        run_job(resolve_job(make_config(tmp_path, tiny_sources["gpt2"], atlas=atlas, run_id=good)))


def test_run_metadata_records_targets_base_log_p_versions_and_timings(tiny_sources, shared_run):
    plan, atlas, _ = shared_run("gpt2")
    meta = run_metadata(str(atlas), plan.run_id)
    concepts = {c["name"]: c for c in meta["concepts"]}
    assert set(concepts) == {"weather", "music"}
    assert concepts["music"]["target_tokens"][0] == "Ġsong" and len(concepts["music"]["target_ids"]) == 8
    # base log p(T): the clean concept vector's log p of the recorded targets, by an independent forward
    model, tokenizer = naive_neat.load(tiny_sources["gpt2"].path)
    for concept in load_concept_file(UNSEEN):
        recorded = concepts[concept.name]
        assert recorded["target_ids"] == naive_neat.target_ids(tokenizer, concept.targets)
        vector = naive_neat.concept_vector(model, tokenizer, concept.examples)
        expected = naive_neat.log_p(model, vector, recorded["target_ids"])
        assert recorded["base_log_p"] == pytest.approx(expected, abs=1e-5), concept.name
    assert meta["config"]["layers"] == [0, 3] and meta["dtype"] == "float32" and meta["device"] == "cpu"
    assert {"torch", "transformers", "ray", "deltalake"} <= set(meta["versions"])
    assert meta["timings"]["wall_seconds"] > 0 and meta["timings"]["actors"]


def test_query_and_sql_commands_on_a_committed_run(shared_run, capsys):
    atlas = shared_run("gpt2", ablation="zero")[1]
    # Raw scores (the default ranking is the concept-specific one when the run holds the reference contrast).
    assert main(["query", "--atlas", str(atlas), "--concept", "weather", "--top", "5", "--format", "json",
                 "--rank-by", "score"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert {"model", "model_revision", "concept", "method", "run_id", "layer", "neuron", "score", "ablation",
            "effect", "activation", "rank", "created_at"} <= set(rows[0])
    assert main(["query", "--atlas", str(atlas), "--concept", "royalty"]) == 2
    err = capsys.readouterr().err
    assert "royalty" in err and "music" in err and "weather" in err
    assert main(["sql", "--atlas", str(atlas), "SELECT count(*) AS n FROM latest WHERE concept = 'music'",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["n", str(2 * 128)]  # tiny GPT-2: 2 layers x 128 neurons
    assert main(["sql", "--atlas", str(atlas), "COPY neurons TO '/tmp/x.csv'"]) == 2


def test_neat_and_atp_in_one_run(tmp_path, tiny_sources, capsys):
    atlas = tmp_path / "atlas"
    plan = resolve_job(make_config(tmp_path, tiny_sources["llama"], atlas=atlas, run_id="two",
                                   methods=["neat", "atp"], ablation="zero"))
    assert {s.method for s in plan.shards} == {"neat", "atp"}
    run_job(plan)
    table = open_neurons(str(atlas)).to_pyarrow_table()
    for method in ("neat", "atp"):
        rows = table.filter(pc.equal(table["method"], method))
        assert rows.num_rows == 2 * 2 * 96 and sorted(set(rows["rank"].to_pylist()))[:3] == [1, 2, 3]
    assert main(["query", "--atlas", str(atlas), "--concept", "music", "--method", "atp", "--top", "3",
                 "--format", "json"]) == 0
    assert [r["method"] for r in json.loads(capsys.readouterr().out)] == ["atp"] * 3


def test_validate_command_stores_and_shows_a_validation(tmp_path, shared_run, capsys):
    from storage.validation import read_validations

    plan, shared_atlas, _ = shared_run("gpt2", ablation="zero")
    atlas = copy_atlas(shared_atlas, tmp_path)  # validate stores its rows in the atlas
    assert main(["validate", "--atlas", str(atlas), "--concept", "music", "--k", "1,3", "--draws", "4",
                 "--device", "cpu", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # The panel: the run's other concept and the reference set.
    from attribution.reference import reference_concepts

    assert [r["k"] for r in rows] == [1, 3]
    assert set(rows[0]["other_changes"]) == {"weather"} | {c.name for c in reference_concepts()}
    assert rows[0]["specificity"] == pytest.approx(abs(rows[0]["top_change"]) /
                                                   max(abs(v) for v in rows[0]["other_changes"].values()))
    stored = read_validations(str(atlas), concept="music")
    assert stored.num_rows == 2 and set(stored["run_id"].to_pylist()) == {plan.run_id}
    assert set(stored["intervention"].to_pylist()) == {"zero"}
    # The music concept's prompts (text before a target word) moved, and the top-1 is shared or not.
    assert all(r["prompt_change"] is not None and r["shared_top_k"] in (0.0, 1.0) for r in rows[:1])
    # The top-k sets are checked against weather's top-k of the same run.
    weather = {(r["layer"], r["neuron"]) for r in top_neurons(str(atlas), concept="weather", top=3).to_pylist()}
    music = [(r["layer"], r["neuron"]) for r in top_neurons(str(atlas), concept="music", top=3).to_pylist()]
    assert rows[1]["shared_top_k"] == pytest.approx(sum(n in weather for n in music) / 3)
    assert main(["validate", "--atlas", str(atlas), "--concept", "music", "--k", "0"]) == 2


def test_query_ranked_by_contrastive_score(shared_run, capsys):
    from storage.contrast import contrastive_table

    plan, atlas, _ = shared_run("gpt2", ablation="zero")
    assert main(["query", "--atlas", str(atlas), "--concept", "music", "--rank-by", "contrastive", "--top", "5",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["contrastive_rank"] for r in rows] == [1, 2, 3, 4, 5]
    table = open_neurons(str(atlas)).to_pyarrow_table()
    expected = contrastive_table(table.filter(pc.equal(table["run_id"], plan.run_id)), "music").slice(0, 5)
    assert [(r["layer"], r["neuron"]) for r in rows] == list(zip(expected["layer"].to_pylist(),
                                                                  expected["neuron"].to_pylist()))
    assert all(r["closest_concept"] == "weather" for r in rows)

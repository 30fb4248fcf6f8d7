"""Big models (README "Big models"): capacity arithmetic on the real Llama-2-7B / Llama-3-70B layer
structures (meta device), the example cluster configs planned on CPU, split and suffix replicas that
score bit-identically to a whole one, and a local Ray run with suffix actors giving the same atlas."""
from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from attribution.models import load_model
from attribution.neat import NEAT_ENGINES, clean_pass, concept_vector
from cluster.capacity import (GB, activation_bytes, actor_memory, count_parameters, first_fitting_layer,
                              gpus_needed, model_bytes, moment_bytes, moment_build_bytes, replica_bytes, split_layers)
from cluster.config import ConfigError, apply_overrides, load_job_config
from cluster.plan import resolve_job
from cluster.replicas import SuffixScorer, group_costs, plan_replicas, prepared_concepts
from cluster.scorer import ScorerSpec, ShardScorer

REPO = Path(__file__).resolve().parent.parent
CONFIG_7B = REPO / "configs" / "cluster" / "llama-7b-gpu.yaml"
CONFIG_70B = REPO / "configs" / "cluster" / "llama-70b-8gpu.yaml"
# The published layer structures (config.json of meta-llama/Llama-2-7b-hf and Meta-Llama-3-70B).
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
LLAMA_3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
# Tiny widths, same layer count and query/key-value head ratio (MHA for 7B, GQA 8:1 for 70B).
TINY_7B = dict(LLAMA_2_7B, hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4)
TINY_70B = dict(LLAMA_3_70B, hidden_size=64, intermediate_size=224, num_attention_heads=8, num_key_value_heads=1)
EXAMPLES = ["The king wore a golden crown.", "The queen sat on her throne in the palace."]


def llama_config(**shape):
    from transformers import LlamaConfig

    return LlamaConfig(**shape, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def save_model_dir(directory: Path, shape: dict, *, weights: bool) -> Path:
    """A model directory with the SmolLM2 tokenizer: random weights, or (weights=False) the real
    structure's config.json with a placeholder safetensors file: planning never reads weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tiny_models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    config = llama_config(**{**shape, "vocab_size": shape["vocab_size"] if not weights else len(tokenizer)})
    directory.mkdir(parents=True, exist_ok=True)
    if weights:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # as tiny_models: single neurons must move log p measurably
            for name, param in model.named_parameters():
                if "mlp" in name and param.dim() == 2:
                    param.mul_(4.0)
        model.save_pretrained(directory, safe_serialization=True)
    else:
        config.save_pretrained(directory)
        save_file({"placeholder": torch.zeros(1)}, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("big-models")
    return {
        "7b": save_model_dir(root / "llama-2-7b", LLAMA_2_7B, weights=False),
        "70b": save_model_dir(root / "llama-3-70b", LLAMA_3_70B, weights=False),
        "tiny-7b": save_model_dir(root / "tiny-7b", TINY_7B, weights=True),
        "tiny-70b": save_model_dir(root / "tiny-70b", TINY_70B, weights=True),
    }


def example_plan(config_path: Path, model_dir: Path, atlas: Path, **cluster):
    config = apply_overrides(load_job_config(config_path), model=str(model_dir), atlas=str(atlas), run_id="r")
    if cluster:
        config = replace(config, cluster=replace(config.cluster, **cluster))
    return resolve_job(config)


# --- capacity arithmetic on the real structures (meta device: no weights, no memory) ---------------

def test_parameter_counts_of_the_real_7b_and_70b_structures():
    small, large = count_parameters(llama_config(**LLAMA_2_7B)), count_parameters(llama_config(**LLAMA_3_70B))
    assert small.total == 6_738_415_616 and large.total == 70_553_706_496
    assert small.embed == small.head - 4096 == 32000 * 4096  # untied: the head adds the final norm
    assert set(small.blocks) == {4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096}
    # GQA: K and V are 8 heads of 128, an eighth of Q
    assert set(large.blocks) == {2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192}
    assert set(large.unused_at_one_position) == {8192**2 + 8192 * 1024}
    assert model_bytes(llama_config(**LLAMA_2_7B), "float32").total == 4 * 6_738_415_616  # ~27 GB


def test_gpus_needed_for_weights_and_for_the_engines_replicas():
    small, large = llama_config(**LLAMA_2_7B), llama_config(**LLAMA_3_70B)
    gpu = 80 * GB
    assert gpus_needed(model_bytes(large, "bf16"), gpu_memory=gpu, headroom=0) == 2  # 141 GB of bf16 weights
    assert gpus_needed(model_bytes(small, "bf16"), gpu_memory=gpu, headroom=0) == 1
    # What an actor holds: float32 weights (+ folded o_proj), or every weight once in bf16 (+ folded GQA o_proj).
    headroom = {e: activation_bytes(large, engine=e, batch_rows=4096, concepts=6) for e in ("float32", "bf16")}
    assert 280 * GB < replica_bytes(large, engine="float32").total < 290 * GB
    bf16 = replica_bytes(large, engine="bf16")
    assert 141 * GB < bf16.total < 143 * GB and bf16.total / count_parameters(large).total < 2.03
    assert gpus_needed(replica_bytes(large, engine="float32"), gpu_memory=gpu, headroom=headroom["float32"]) == 4
    assert gpus_needed(replica_bytes(large, engine="bf16", concepts=6), gpu_memory=gpu, headroom=headroom["bf16"]) == 2
    # Head moments: d_model^2 float32 per concept (268 MB at 70B) plus one vocabulary chunk while building them,
    # on the head's part; the float32 engine has none.
    moments = replica_bytes(large, engine="bf16", concepts=6).head - bf16.head
    assert moments == 6 * moment_bytes(large) + moment_build_bytes(large) and 268e6 < moment_bytes(large) < 269e6
    assert replica_bytes(large, engine="float32", concepts=6) == replica_bytes(large, engine="float32")
    assert replica_bytes(small, engine="bf16").total == 2 * count_parameters(small).total  # MHA: no fold copy
    memory = actor_memory(small, engine="bf16", batch_rows=4096, concepts=6)
    assert memory.bytes_per_parameter == 2.0 and memory.total < 20 * GB
    # A suffix replica drops the earlier blocks, the input embeddings, and Q/K of the blocks it holds.
    suffix = replica_bytes(large, engine="bf16", first_layer=50)
    assert suffix.embed == 0 and suffix.blocks[:50] == (0,) * 50 and suffix.first_layer == 50
    assert suffix.blocks[50] < replica_bytes(large, engine="bf16").blocks[50]
    assert first_fitting_layer(large, engine="bf16", devices=1, gpu_memory=gpu, headroom=headroom["bf16"],
                               concepts=6) == 36
    assert first_fitting_layer(large, engine="float32", devices=2, gpu_memory=gpu, headroom=headroom["float32"]) == 35


def test_split_layers_is_the_best_contiguous_split_with_embed_first_and_head_last():
    from cluster.capacity import PartBytes

    import random

    rng = random.Random(0)
    for _ in range(20):
        n, devices = rng.randint(3, 8), rng.randint(1, 3)
        sizes = PartBytes(rng.randint(0, 49), tuple(rng.randint(1, 29) for _ in range(n)), rng.randint(0, 49))
        split = split_layers(sizes, devices)
        assert [layer for r in split.ranges for layer in r] == list(range(n))  # contiguous, in order, all
        assert sum(split.device_bytes) == sizes.total
        brute = min(  # every way to cut n blocks into `devices` non-empty ranges
            max(sum(sizes.blocks[a:b]) + (sizes.embed if d == 0 else 0) + (sizes.head if d == devices - 1 else 0)
                for d, (a, b) in enumerate(zip((0, *cuts), (*cuts, n))))
            for cuts in itertools.combinations(range(1, n), devices - 1))
        assert max(split.device_bytes) == brute


# --- the example configs, planned on CPU ------------------------------------------------------------

@pytest.mark.parametrize("cluster, message", [
    ({"suffix_actors": -1}, "key 'cluster.suffix_actors' has value -1: expected an integer >= 0"),
    ({"suffix_from_layer": 0}, "key 'cluster.suffix_from_layer' has value 0: expected an integer >= 1"),
    ({"gpu_memory_gb": 0}, "key 'cluster.gpu_memory_gb' has value 0: expected a number > 0"),
    ({"gpus_per_suffix_actor": "two"}, "key 'cluster.gpus_per_suffix_actor' has value 'two'"),
])
def test_big_model_cluster_keys_are_validated(cluster, message):
    from cluster.config import config_from_dict

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": "m", "concepts": "c", "atlas": "a", "cluster": cluster}, source="job.yaml",
                         base_dir=REPO)
    for path in (CONFIG_7B, CONFIG_70B):  # the examples parse, with their big-model keys
        assert load_job_config(path).cluster.gpu_memory_gb == 80


def test_7b_example_plans_eight_whole_replicas_on_one_gpu_each(model_dirs, tmp_path):
    plan = example_plan(CONFIG_7B, model_dirs["7b"], tmp_path / "atlas")
    assert (plan.n_layers, plan.d_mlp, len(plan.shards), plan.total_rows) == (32, 11008, 61, 352256 * 6)
    budget = plan.config.shard_neurons * plan.layer_cost[0]
    for layer in range(32):
        assert [n for s in plan.shards if s.layer == layer for n in s.neurons] == list(range(11008))
    assert max(len(s.neurons) * plan.layer_cost[s.layer] for s in plan.shards) <= budget
    assert sum(1 for s in plan.shards if s.layer == 0) == 3 and sum(1 for s in plan.shards if s.layer == 31) == 1
    replicas = plan_replicas(plan)
    assert replicas.full.placement is None and replicas.suffix is None  # one GPU holds a whole replica
    assert replicas.full.actors == 8 and replicas.full_gpus_needed == 1
    assert replicas.full.device_bytes[0] + replicas.full.headroom < 80 * GB
    assert 2 * plan.macs_per_block * sum(plan.shard_cost(s) for s in plan.shards) == pytest.approx(11.6e15, rel=0.01)


def test_70b_example_splits_full_replicas_over_2_gpus_and_gives_late_layers_to_suffix_actors(model_dirs, tmp_path):
    plan = example_plan(CONFIG_70B, model_dirs["70b"], tmp_path / "atlas")
    assert (plan.n_layers, plan.d_mlp, len(plan.shards)) == (80, 28672, 323)
    replicas = plan_replicas(plan)
    assert replicas == plan_replicas(plan)  # deterministic
    full, suffix = replicas.full, replicas.suffix
    # Full replicas: bf16 weights once (2.02 bytes per parameter with the folded GQA o_proj) and 6 concepts'
    # head moments on 2 x 80 GB, embeddings on the first GPU, head and moments on the last.
    assert full.placement.devices == 2 and full.placement.embed == 0 and full.placement.head == 1
    assert list(full.placement.blocks) == [0] * 41 + [1] * 39
    assert max(full.device_bytes) + full.headroom <= 80 * GB and full.memory.bytes_per_parameter < 2.1
    assert full.memory.moments == 6 * moment_bytes(llama_config(**LLAMA_3_70B)) + moment_build_bytes(
        llama_config(**LLAMA_3_70B))
    assert sum(full.device_bytes) == full.memory.weights + full.memory.moments
    # Suffix replicas: 2 GPUs hold any suffix, so the layer balances the cost per actor of the two kinds.
    assert replicas.suffix_from_layer == 41 and suffix.placement.suffix_only and suffix.placement.devices == 2
    assert suffix.placement.blocks[:41] == (None,) * 41 and set(suffix.placement.blocks[41:]) == {0, 1}
    assert max(suffix.device_bytes) + suffix.headroom <= 80 * GB and suffix.memory.bytes_per_parameter < 2.0
    late = [s for s in plan.shards if replicas.group_of(s) == "suffix"]
    assert late == [s for s in plan.shards if s.layer >= 41] and len(late) == 89
    costs = group_costs(plan, replicas)
    per_actor = costs["full"][1] / 6, costs["suffix"][1] / 2  # balanced within one layer's cost
    assert abs(per_actor[0] - per_actor[1]) < max(per_actor) * 0.1
    # Too few GPUs for a full replica, or a suffix that cannot fit, are refused naming the device and numbers.
    with pytest.raises(ConfigError, match=r"device cuda:0 would hold 145.1 GB .* \+ 5.5 GB headroom .* = 150.6 GB "
                                          r"> 80 GB; it needs 2 GPU"):
        plan_replicas(example_plan(CONFIG_70B, model_dirs["70b"], tmp_path / "a", gpus_per_actor=1))
    with pytest.raises(ConfigError, match="suffix_from_layer.*earliest that fits is 36"):
        plan_replicas(example_plan(CONFIG_70B, model_dirs["70b"], tmp_path / "b", suffix_from_layer=20,
                                   gpus_per_suffix_actor=1))
    # NEAT and AtP (the screen) run on a split replica; other methods are refused up front.
    screen = resolve_job(apply_overrides(load_job_config(CONFIG_70B), model=str(model_dirs["70b"]),
                                         atlas=str(tmp_path / "c"), run_id="r", methods=["neat", "atp"]))
    assert plan_replicas(screen).full.placement.devices == 2
    gradients = resolve_job(apply_overrides(load_job_config(CONFIG_70B), model=str(model_dirs["70b"]),
                                            atlas=str(tmp_path / "d"), run_id="r", methods=["neat", "neurgrad"]))
    with pytest.raises(ConfigError, match=r"split over 2 GPUs scores neat and atp only, and methods has \['neurgrad'\]"):
        plan_replicas(gradients)


def test_70b_dry_run_prints_the_replicas(model_dirs, tmp_path, capsys):
    from jobs.cli import main

    assert main(["run", str(CONFIG_70B), "--model", str(model_dirs["70b"]), "--atlas", str(tmp_path / "atlas"),
                 "--run-id", "r", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "split: 6 actors x 2 GPU, layers 0-79 (0: embed + L0-40 | 1: L41-79 + head)" in out
    assert "suffix: 2 actors x 2 GPU, layers 41-79 (0: L41-61 | 1: L62-79 + head); 89 shards" in out
    assert "2.02 bytes per parameter (bf16 engine); head moments of 6 concepts 2.69 GB" in out
    assert "a full replica (bf16 engine) needs 2 GPU(s) of 80 GB" in out


@pytest.mark.parametrize("config_path", [CONFIG_7B, CONFIG_70B])
def test_example_configs_plan_anywhere_from_their_shipped_architecture(config_path, tmp_path, capsys):
    """A fresh clone without the model in any cache: --dry-run plans from the config.json the config names."""
    from jobs.cli import main

    config = load_job_config(config_path)
    assert main(["run", str(config_path), "--atlas", str(tmp_path / "atlas"), "--run-id", "r", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "revision not on this machine" in out and "checked when the job starts" in out
    shape = LLAMA_2_7B if config_path == CONFIG_7B else LLAMA_3_70B
    from transformers import AutoConfig

    shipped = AutoConfig.from_pretrained(config.architecture, local_files_only=True)  # the published geometry
    assert {key: getattr(shipped, key) for key in shape} == shape
    per_parameter = [float(line.split()[1]) for line in out.splitlines() if "bytes per parameter" in line]
    assert per_parameter and max(per_parameter) <= 2.1
    # ... but running it here is refused at once: the weights are not on this machine.
    assert main(["run", str(config_path), "--atlas", str(tmp_path / "atlas"), "--run-id", "r"]) == 2
    assert "not a hub id in the local Hugging Face cache" in capsys.readouterr().err


# --- replicas of tiny-width models with the same layer structure, on CPU --------------------------

@pytest.mark.parametrize("shape, config_path", [("tiny-7b", CONFIG_7B), ("tiny-70b", CONFIG_70B)])
def test_split_and_suffix_replicas_score_exactly_like_a_whole_one(model_dirs, tmp_path, shape, config_path):
    plan = example_plan(config_path, model_dirs[shape], tmp_path / "atlas", gpus_per_actor=3, suffix_actors=1,
                        gpus_per_suffix_actor=2)
    replicas = plan_replicas(plan)
    first = replicas.suffix_from_layer
    assert replicas.full.placement.devices == 3 and replicas.suffix.placement.devices == 2
    whole = load_model(plan.model, device="cpu")
    split = load_model(plan.model, device="cpu", placement=replicas.full.placement)  # slots -> the CPU here
    suffix = load_model(plan.model, device="cpu", placement=replicas.suffix.placement)
    targets = plan.concepts[0].targets.ids
    clean = clean_pass(whole, concept_vector(whole, EXAMPLES), targets)
    # accelerate's device map places whole blocks, whose hooks move all their inputs (rotary cos/sin too)
    assert set(split.hf.hf_device_map) == {"model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head",
                                           *(f"model.layers.{i}" for i in range(plan.n_layers))}
    split_clean = clean_pass(split, concept_vector(split, EXAMPLES), targets)  # through accelerate's hooks
    assert split_clean.log_p == clean.log_p and torch.equal(split_clean.acts, clean.acts)
    assert all(torch.equal(a, b) for a, b in zip(split_clean.resid, clean.resid))
    zeros, neurons = torch.zeros(whole.d_mlp), range(0, 80)
    for engine in NEAT_ENGINES.values():
        for layer in (first, plan.n_layers - 1):
            expected = engine(whole, clean, targets, layer, neurons, zeros, batch_rows=64)
            assert float(expected.abs().max()) > 1e-4
            assert torch.equal(engine(split, clean, targets, layer, neurons, zeros, batch_rows=64), expected)
            assert torch.equal(engine(suffix, clean, targets, layer, neurons, zeros, batch_rows=64), expected)
    # The suffix replica holds exactly what capacity.py counts: blocks first.. without Q/K, norm and head.
    config = whole.hf.config
    held = sum(p.numel() * 4 for p in suffix.hf.parameters() if p.device.type != "meta")
    fold_cache = 4 * 64 * (64 // config.num_attention_heads) * config.num_key_value_heads  # float32 engine only
    expected_bytes = replica_bytes(config, engine="float32", first_layer=first).total
    assert held == expected_bytes - (plan.n_layers - first) * fold_cache
    assert suffix.hf.model.layers[first - 1].mlp.down_proj.weight.device.type == "meta"
    assert suffix.hf.model.layers[first].self_attn.q_proj.weight.device.type == "meta"


def test_suffix_scorer_takes_a_full_replicas_preparation_and_refuses_earlier_layers(tiny_sources, tmp_path):
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": tiny_sources["llama"].path, "concepts": str(REPO / "tests" / "data" / "unseen_concepts.yaml"),
        "atlas": str(tmp_path / "atlas"), "ablation": ["zero", "mean"], "batch_rows": 32, "shard_neurons": 40,
        "cluster": {"actors": 1, "suffix_actors": 1, "suffix_from_layer": 2}, "run_id": "r"}))
    plan = resolve_job(load_job_config(config_path))
    replicas = plan_replicas(plan)
    spec = ScorerSpec.from_plan(plan)
    full = ShardScorer(spec)
    suffix = SuffixScorer(replace(spec, placement=replicas.suffix.placement), prepared_concepts(full))
    assert suffix.describe()[1] == full.describe()[1]  # the same targets and base log p
    late = [s for s in plan.shards if replicas.group_of(s) == "suffix"]
    assert late and {s.layer for s in late} == {2, 3}
    for shard in late:
        assert suffix.score_table(shard).equals(full.score_table(shard))
    early = next(s for s in plan.shards if s.layer == 1)
    with pytest.raises(ValueError, match="scores only NEAT shards of those layers"):
        suffix.score_table(early)


# --- a real local Ray run with suffix actors ---------------------------------------------------------

def test_a_run_with_suffix_actors_commits_the_same_atlas(local_ray, tiny_sources, tmp_path):
    import pyarrow.compute as pc

    from cluster.driver import run_job
    from storage.read import open_neurons, run_metadata

    def run(name: str, cluster: dict):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": tiny_sources["llama"].path, "concepts": str(REPO / "tests" / "data" / "unseen_concepts.yaml"),
            "atlas": str(tmp_path / name), "ablation": ["zero", "mean"], "batch_rows": 32, "shard_neurons": 40,
            "cluster": {"cpus_per_actor": 1, **cluster}, "run_id": "same"}))
        plan = resolve_job(load_job_config(path))
        run_job(plan)
        table = open_neurons(str(tmp_path / name)).to_pyarrow_table()
        table = table.filter(pc.equal(table["run_id"], "same")).drop_columns(["created_at"])
        return plan, table.sort_by([(k, "ascending") for k in ("concept", "ablation", "layer", "neuron")])

    plain_plan, plain = run("plain", {"actors": 2})
    suffix_plan, with_suffix = run("suffix", {"actors": 1, "suffix_actors": 1, "suffix_from_layer": 2})
    assert plain_plan.shards == suffix_plan.shards
    assert with_suffix.equals(plain) and with_suffix.num_rows == 2 * 2 * 4 * 96
    meta = run_metadata(str(tmp_path / "suffix"), "same")
    assert meta["replicas"] == {"suffix_actors": 1, "suffix_from_layer": 2}
    # The suffix actor scores late-layer shards only; the full actor the rest, and late ones once idle.
    actors = meta["timings"]["actors"].values()
    late = sum(1 for s in suffix_plan.shards if s.layer >= 2)
    assert sum(entry["shards"] for entry in actors) == len(suffix_plan.shards)
    assert [1 <= entry["shards"] <= late for entry in actors if entry["kind"] == "suffix"] == [True]

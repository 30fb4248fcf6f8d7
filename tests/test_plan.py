"""The shard plan: covers every neuron once, balances cost, and does not depend on the pool size."""
from __future__ import annotations

from pathlib import Path

from cluster.config import apply_overrides, load_job_config
from cluster.plan import layer_costs, plan_shards, resolve_job

REPO = Path(__file__).resolve().parent.parent


def test_shards_cover_every_neuron_exactly_once():
    costs = layer_costs(30, 9.2)
    shards = plan_shards(method="neat", layers=tuple(range(30)), d_mlp=1536, costs=costs, shard_neurons=512)
    for layer in range(30):
        covered = [n for s in shards if s.layer == layer for n in s.neurons]
        assert covered == list(range(1536))
    assert len({s.shard_id for s in shards}) == len(shards)


def test_shards_are_balanced_by_cost_not_by_neuron_count():
    costs = layer_costs(30, 9.2)  # SmolLM2: the head costs about 9 blocks
    shards = plan_shards(method="neat", layers=tuple(range(30)), d_mlp=1536, costs=costs, shard_neurons=512)
    shard_costs = [len(s.neurons) * costs[s.layer] for s in shards]
    assert max(shard_costs) <= 512 * costs[0] + 1e-9
    # early-layer shards hold fewer neurons than late-layer shards
    first = max(len(s.neurons) for s in shards if s.layer == 0)
    last = min(len(s.neurons) for s in shards if s.layer == 29)
    assert first < last
    assert min(shard_costs) > 0.5 * max(shard_costs)


def test_plan_does_not_depend_on_the_number_of_actors():
    config = load_job_config(REPO / "configs" / "demo.yaml")
    one = resolve_job(apply_overrides(config, actors=1, run_id="r"))
    two = resolve_job(apply_overrides(config, actors=2, run_id="r"))
    assert one.shards == two.shards and one.total_rows == two.total_rows == 46080 * 6 * len(config.methods)


def test_smollm2_costs_match_the_measured_head_weight():
    plan = resolve_job(apply_overrides(load_job_config(REPO / "configs" / "demo.yaml"), run_id="r"))
    head_blocks = plan.layer_cost[-1]
    assert 8.5 < head_blocks < 10  # docs/design.md, "The NEAT engine": the LM head costs about 9 blocks
    assert abs(plan.layer_cost[0] - (29 + head_blocks)) < 1e-9


def test_default_run_id_is_a_valid_atlas_name():
    from storage.schema import validate_name

    plan = resolve_job(load_job_config(REPO / "configs" / "demo.yaml"))
    assert validate_name("run", plan.run_id) == plan.run_id

"""Resolve a JobConfig against the model's config and tokenizer, and cut the neuron space into shards.

Everything here runs on the driver before Ray starts: every problem becomes one clear error, and
only a resolved plan reaches the actors. The shard plan depends on the model and the config, never on
the number of actors, so any pool size computes the same shards in the same batches.
"""
from __future__ import annotations

import math
import time
import hashlib
import json
from dataclasses import dataclass

from attribution.concepts import Concept, TargetTokens, load_concept_file, resolve_targets
from attribution.models import ModelSource, load_tokenizer, read_model_config, resolve_model_source
from attribution.sites import architecture_for, head_macs
from cluster.config import ConfigError, JobConfig


@dataclass(frozen=True)
class Shard:
    """A contiguous range of neurons of one layer, scored for every concept and ablation of the run."""

    method: str
    layer: int
    start: int
    stop: int

    @property
    def neurons(self) -> range:
        return range(self.start, self.stop)

    @property
    def shard_id(self) -> str:  # stable: a retried shard rewrites the same staged file
        return f"{self.method}-L{self.layer:03d}-n{self.start:06d}-{self.stop:06d}"


@dataclass(frozen=True)
class ResolvedConcept:
    concept: Concept
    targets: TargetTokens


@dataclass(frozen=True)
class JobPlan:
    """A validated job: what the actors compute and where the rows go."""

    config: JobConfig
    model: ModelSource
    model_type: str
    n_layers: int
    d_mlp: int
    layers: tuple[int, ...]
    concepts: tuple[ResolvedConcept, ...]
    shards: tuple[Shard, ...]
    run_id: str
    layer_cost: tuple[float, ...]  # per layer: cost of one neuron-concept score, in block-equivalents
    macs_per_block: int
    warnings: tuple[str, ...] = ()

    @property
    def rows_per_neuron(self) -> int:  # one row per concept and ablation
        return len(self.concepts) * len(self.config.ablation)

    def shard_rows(self, shard: Shard) -> int:
        return len(shard.neurons) * self.rows_per_neuron

    @property
    def total_rows(self) -> int:
        return sum(self.shard_rows(s) for s in self.shards)

    def shard_cost(self, shard: Shard) -> float:
        if shard.method == "atp":  # a share of one forward + backward (~3 passes) per concept
            return 3.0 * (self.n_layers + self.layer_cost[-1]) * self.rows_per_neuron / len(self.layers)
        return len(shard.neurons) * self.layer_cost[shard.layer] * self.rows_per_neuron

    def estimated_flops(self) -> float:
        return 2.0 * self.macs_per_block * sum(self.shard_cost(s) for s in self.shards)


def layer_costs(n_layers: int, head_blocks: float) -> tuple[float, ...]:
    """Cost of scoring one neuron of layer L: the blocks after L plus the final norm and head."""
    return tuple((n_layers - 1 - layer) + head_blocks for layer in range(n_layers))


def plan_shards(*, method: str, layers: tuple[int, ...], d_mlp: int, costs: tuple[float, ...],
                shard_neurons: int) -> tuple[Shard, ...]:
    """Split each layer into equal-cost shards: a shard costs about `shard_neurons` layer-0 neurons."""
    budget = shard_neurons * max(costs)
    shards = []
    for layer in layers:
        count = max(1, math.ceil(d_mlp * costs[layer] / budget))
        bounds = [round(i * d_mlp / count) for i in range(count + 1)]
        shards.extend(Shard(method, layer, a, b) for a, b in zip(bounds, bounds[1:]) if b > a)
    return tuple(shards)


def default_run_id(config: JobConfig, model: ModelSource) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())  # UTC
    digest = hashlib.sha256(json.dumps([config.snapshot(), model.revision], sort_keys=True, default=str).encode())
    return f"{stamp}-{digest.hexdigest()[:8]}"


def resolve_job(config: JobConfig) -> JobPlan:
    """Check the config against the model (config + tokenizer, no weights) and plan the shards."""
    source = resolve_model_source(config.model)
    model_config = read_model_config(source)
    arch = architecture_for(model_config.model_type, model_name=source.name)
    n_layers = getattr(model_config, "num_hidden_layers", None) or model_config.n_layer
    layers = config.layers if config.layers is not None else tuple(range(n_layers))
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ConfigError(
                f"config {config.source}: key 'layers' has value {layer}: "
                f"layer not in 0..{n_layers - 1} for model {source.name}"
            )
    tokenizer = load_tokenizer(source)
    warnings: list[str] = []
    concepts = []
    for concept in load_concept_file(config.concepts):
        targets = resolve_targets(tokenizer, concept)
        warnings.extend(targets.warnings)
        concepts.append(ResolvedConcept(concept, targets))
    macs = arch.block_macs(model_config)
    costs = layer_costs(n_layers, head_macs(model_config) / macs)
    d_mlp = getattr(model_config, "intermediate_size", None) or model_config.n_inner or 4 * model_config.n_embd
    shards: tuple[Shard, ...] = ()
    for method in config.methods:
        if method == "atp":  # one backward per concept scores every layer: one shard per layer
            shards += tuple(Shard(method, layer, 0, d_mlp) for layer in layers)
        else:
            shards += plan_shards(method=method, layers=layers, d_mlp=d_mlp, costs=costs,
                                  shard_neurons=config.shard_neurons)
    return JobPlan(
        config=config, model=source, model_type=model_config.model_type, n_layers=n_layers, d_mlp=d_mlp,
        layers=layers, concepts=tuple(concepts), shards=shards,
        run_id=config.run_id or default_run_id(config, source),
        layer_cost=costs, macs_per_block=macs, warnings=tuple(warnings),
    )

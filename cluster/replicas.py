"""Which replica each actor holds and which shards it scores (README "Big models").

Full actors hold the whole model, split by layer over their GPUs when they own several. Suffix actors
hold only blocks L.. plus the final norm and head, and score the NEAT shards of layers >= L from the
clean passes a full actor computed (a suffix replica cannot run them). The shard plan is untouched:
only which actor scores a shard changes, and either kind runs the same kernels on the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from attribution.models import read_model_config
from attribution.placement import Placement
from cluster.capacity import (GB, ActorMemory, activation_bytes, actor_memory, first_fitting_layer, gpus_needed,
                              replica_bytes, split_layers)
from cluster.config import ConfigError
from cluster.plan import JobPlan, Shard
from cluster.prepare import PreparedConcepts
from cluster.progress import format_seconds
from cluster.scorer import ScorerSpec, ShardScorer

# Assumed sustained throughput of one actor on a GPU: 40% of an H100 SXM's dense peak (bf16 989
# TFLOP/s, float32 without TF32 67 TFLOP/s). A split replica computes on one of its GPUs at a time.
GPU_FLOPS = {"bf16": 0.4 * 989e12, "float32": 0.4 * 67e12}

# Methods a replica split over several GPUs scores: NEAT (its engines move rows between the devices) and
# AtP (one position forward and backward through accelerate's hooks: the AtP screen of a huge model).
SPLIT_METHODS = ("neat", "atp")


@dataclass(frozen=True)
class ReplicaGroup:
    """Actors holding the same kind of replica."""

    kind: str  # "full" | "suffix"
    actors: int
    gpus_per_actor: float
    placement: Placement | None  # None: the whole model on the actor's one device
    device_bytes: tuple[int, ...]  # weights, engine caches and head moments per device (cluster/capacity.py)
    headroom: int  # activations, trajectories and CUDA overhead reserved on every device
    memory: ActorMemory | None = None  # the replica's allocation by part (bytes per parameter...)

    @property
    def first_layer(self) -> int:
        return self.placement.first_layer if self.placement is not None else 0


@dataclass(frozen=True)
class ReplicaPlan:
    full: ReplicaGroup
    suffix: ReplicaGroup | None = None
    gpu_memory: float | None = None  # bytes per GPU, when the config gives it
    full_gpus_needed: int | None = None  # the fewest GPUs a full replica fits on

    @property
    def suffix_from_layer(self) -> int | None:
        return self.suffix.first_layer if self.suffix is not None else None

    def group_of(self, shard: Shard) -> str:
        """'suffix' for NEAT shards of layers >= suffix_from_layer when there are suffix actors, else 'full'."""
        if self.suffix is not None and shard.method == "neat" and shard.layer >= self.suffix.first_layer:
            return "suffix"
        return "full"


def plan_replicas(plan: JobPlan, *, model_config=None) -> ReplicaPlan:
    """Placements of the full and suffix replicas; checks they fit when cluster.gpu_memory_gb is given.

    suffix_from_layer, when not given, is the layer that balances the cost per actor of the two groups
    (each actor computes on one GPU at a time), no earlier than the first suffix that fits the
    suffix actors' GPUs; ties go to the later layer (a smaller replica).
    """
    cfg, cluster = plan.config, plan.config.cluster
    if not (cluster.suffix_actors or cluster.gpu_memory_gb or cluster.gpus_per_actor >= 2
            or cluster.suffix_from_layer is not None):  # whole replicas on one device each: nothing to plan
        return ReplicaPlan(ReplicaGroup("full", cluster.actors, cluster.gpus_per_actor, None, (), 0))
    model_config = model_config if model_config is not None else read_model_config(plan.model)
    engine = cfg.dtype
    gpu_memory = cluster.gpu_memory_gb * GB if cluster.gpu_memory_gb else None
    concepts, ablations = len(plan.concepts), len(cfg.ablation)
    headroom = activation_bytes(model_config, engine=engine, batch_rows=cfg.batch_rows, concepts=concepts,
                                ablations=ablations)
    name = plan.model.name

    full_bytes = replica_bytes(model_config, engine=engine, concepts=concepts)
    devices = _devices(cfg.source, "cluster.gpus_per_actor", cluster.gpus_per_actor)
    needed = gpus_needed(full_bytes, gpu_memory=gpu_memory, headroom=headroom) if gpu_memory else None
    if devices > plan.n_layers:
        raise ConfigError(f"config {cfg.source}: key 'cluster.gpus_per_actor' has value {cluster.gpus_per_actor}: "
                          f"more GPUs than the {plan.n_layers} layers of model {name}")
    others = [m for m in cfg.methods if m not in SPLIT_METHODS]
    if devices > 1 and others:  # the others' whole-model passes are not planned across devices
        raise ConfigError(f"config {cfg.source}: key 'cluster.gpus_per_actor' has value {cluster.gpus_per_actor}: "
                          f"a replica split over {devices} GPUs scores {' and '.join(SPLIT_METHODS)} only, and "
                          f"methods has {others}; run those methods in a job with whole replicas (gpus_per_actor <= 1)")
    split = split_layers(full_bytes, devices)
    if gpu_memory and cluster.gpus_per_actor > 0:
        usable = gpu_memory * min(1.0, cluster.gpus_per_actor)
        if max(split.device_bytes) + headroom > usable:
            slot = split.device_bytes.index(max(split.device_bytes))
            raise ConfigError(
                f"config {cfg.source}: key 'cluster.gpus_per_actor' has value {cluster.gpus_per_actor}: a full "
                f"replica of {name} does not fit: device cuda:{slot} would hold "
                f"{split.device_bytes[slot] / GB:.1f} GB ({engine} weights, engine caches"
                f"{', head moments' if slot == devices - 1 and engine == 'bf16' else ''}) + {headroom / GB:.1f} GB "
                f"headroom ({cfg.batch_rows}-row batches, {concepts} concepts' trajectories, CUDA overhead) = "
                f"{(split.device_bytes[slot] + headroom) / GB:.1f} GB > {usable / GB:g} GB; "
                f"it needs {needed or 'more than 64'} GPU(s)")
    memory = dict(engine=engine, batch_rows=cfg.batch_rows, concepts=concepts, ablations=ablations)
    full = ReplicaGroup("full", cluster.actors, cluster.gpus_per_actor,
                        Placement.from_ranges(split.ranges, plan.n_layers) if devices > 1 else None,
                        split.device_bytes, headroom, actor_memory(model_config, **memory))

    if not cluster.suffix_actors:
        if cluster.suffix_from_layer is not None:
            raise ConfigError(f"config {cfg.source}: key 'cluster.suffix_from_layer' has value "
                              f"{cluster.suffix_from_layer}, but cluster.suffix_actors is 0")
        return ReplicaPlan(full, None, gpu_memory, needed)
    if "neat" not in cfg.methods:
        raise ConfigError(f"config {cfg.source}: key 'cluster.suffix_actors' has value {cluster.suffix_actors}: "
                          f"suffix actors score NEAT shards, and methods {list(cfg.methods)} has no neat")
    gpus = cluster.gpus_per_suffix_actor if cluster.gpus_per_suffix_actor is not None else cluster.gpus_per_actor
    suffix_devices = _devices(cfg.source, "cluster.gpus_per_suffix_actor", gpus)
    earliest = 1
    suffix_headroom = activation_bytes(model_config, engine=engine, batch_rows=cfg.batch_rows, concepts=concepts,
                                       ablations=ablations, prepares=False)  # a suffix never runs texts
    if gpu_memory and gpus > 0:
        earliest = first_fitting_layer(model_config, engine=engine, devices=suffix_devices,
                                       gpu_memory=gpu_memory * min(1.0, gpus), headroom=suffix_headroom,
                                       concepts=concepts)
        if earliest is None:
            raise ConfigError(f"config {cfg.source}: key 'cluster.gpus_per_suffix_actor' has value {gpus}: "
                              f"not even the last layer of {name} fits {suffix_devices} GPU(s) of "
                              f"{cluster.gpu_memory_gb} GB with its final norm and head")
    layer = cluster.suffix_from_layer
    if layer is None:
        layer = balanced_suffix_layer(plan, earliest=earliest, full_actors=cluster.actors,
                                      suffix_actors=cluster.suffix_actors)
    elif not earliest <= layer < plan.n_layers:
        reason = (f"a suffix from layer {layer} does not fit {suffix_devices} GPU(s) of {cluster.gpu_memory_gb} GB "
                  f"(the earliest that fits is {earliest})" if layer < earliest
                  else f"layer not in 1..{plan.n_layers - 1} for model {name}")
        raise ConfigError(f"config {cfg.source}: key 'cluster.suffix_from_layer' has value {layer}: {reason}")
    if plan.n_layers - layer < suffix_devices:
        raise ConfigError(f"config {cfg.source}: key 'cluster.gpus_per_suffix_actor' has value {gpus}: more GPUs "
                          f"than the {plan.n_layers - layer} layers of a suffix from layer {layer}")
    suffix_split = split_layers(replica_bytes(model_config, engine=engine, first_layer=layer, concepts=concepts),
                                suffix_devices)
    suffix = ReplicaGroup("suffix", cluster.suffix_actors, gpus,
                          Placement.from_ranges(suffix_split.ranges, plan.n_layers, suffix=True),
                          suffix_split.device_bytes, suffix_headroom,
                          actor_memory(model_config, first_layer=layer, **memory))
    return ReplicaPlan(full, suffix, gpu_memory, needed)


def balanced_suffix_layer(plan: JobPlan, *, earliest: int, full_actors: int, suffix_actors: int) -> int:
    """The L >= earliest minimising the larger of (cost of the full actors' shards) / full_actors and
    (cost of NEAT shards of layers >= L) / suffix_actors; ties go to the later L."""
    neat = [0.0] * plan.n_layers
    total = 0.0
    for shard in plan.shards:
        cost = plan.shard_cost(shard)
        total += cost
        if shard.method == "neat":
            neat[shard.layer] += cost
    best, best_time = plan.n_layers - 1, float("inf")
    late = sum(neat[earliest:])
    for layer in range(earliest, plan.n_layers):
        slowest = max((total - late) / full_actors, late / suffix_actors)
        if slowest <= best_time:
            best, best_time = layer, slowest
        late -= neat[layer]
    return best


def group_costs(plan: JobPlan, replicas: ReplicaPlan) -> dict[str, tuple[int, float]]:
    """kind -> (shards, cost in block-equivalents) of the shards that group scores."""
    out = {"full": (0, 0.0), "suffix": (0, 0.0)}
    for shard in plan.shards:
        kind = replicas.group_of(shard)
        count, cost = out[kind]
        out[kind] = (count + 1, cost + plan.shard_cost(shard))
    return out


def describe_replicas(plan: JobPlan, replicas: ReplicaPlan) -> list[str]:
    """Lines for --dry-run: who holds what, memory per GPU, and the GPU time estimate."""
    cluster, dtype = plan.config.cluster, plan.config.dtype
    costs = group_costs(plan, replicas)
    total = sum(cost for _, cost in costs.values()) or 1.0
    lines = []
    for group in (replicas.full, replicas.suffix):
        if group is None:
            continue
        shards, cost = costs[group.kind]
        layers = f"layers {group.first_layer}-{plan.n_layers - 1}"
        split = group.placement is not None and group.placement.devices > 1
        where = group.placement.describe() if split else "one device"
        memory = ", ".join(f"{size / GB:.1f}" for size in group.device_bytes)
        kind = "split" if split and group.kind == "full" else group.kind
        lines.append(f"replicas    {kind}: {group.actors} actors x {group.gpus_per_actor:g} GPU, {layers} "
                     f"({where}); {shards} shards, {100 * cost / total:.1f}% of the cost")
        if group.memory is not None:
            parts = group.memory
            lines.append(f"  weights   {parts.bytes_per_parameter:.2f} bytes per parameter ({dtype} engine); "
                         f"head moments of {len(plan.concepts)} concepts {parts.moments / GB:.2f} GB "
                         f"(on the head's device)")
            lines.append(f"  memory    {memory} GB per device + {group.headroom / GB:.1f} GB headroom (activations "
                         f"{parts.peak / GB:.1f}, trajectories {parts.trajectories / GB:.2f}, CUDA {parts.overhead / GB:.0f})"
                         + (f" of {replicas.gpu_memory / GB:g} GB" if replicas.gpu_memory else ""))
        else:
            lines.append(f"  memory    {memory} GB per device + {group.headroom / GB:.1f} GB headroom"
                         + (f" (of {replicas.gpu_memory / GB:g} GB)" if replicas.gpu_memory else ""))
    if replicas.full_gpus_needed:
        lines.append(f"  capacity  a full replica ({dtype} engine) needs {replicas.full_gpus_needed} GPU(s) of "
                     f"{replicas.gpu_memory / GB:g} GB")
    if cluster.gpus_per_actor > 0:
        flops = 2.0 * plan.macs_per_block
        slowest = max(costs[g.kind][1] / g.actors for g in (replicas.full, replicas.suffix) if g is not None)
        lines.append(f"  GPU time  about {format_seconds(flops * slowest / GPU_FLOPS[dtype])} of scoring at an "
                     f"assumed {GPU_FLOPS[dtype] / 1e12:.0f} TFLOP/s per actor (40% of an H100's dense {dtype} peak)")
    return lines


def _devices(source: str, key: str, gpus: float) -> int:
    """Devices a replica is split over: 1 below 2 GPUs, else the whole number of GPUs."""
    if gpus < 2:
        return 1
    if gpus != int(gpus):
        raise ConfigError(f"config {source}: key {key!r} has value {gpus}: a replica split over several GPUs "
                          f"needs a whole number of them")
    return int(gpus)


def prepared_concepts(scorer: ShardScorer) -> PreparedConcepts:
    """A full replica's preparation of the run's concepts (on the CPU), for the other actors."""
    return scorer.prepared()


class SuffixScorer(ShardScorer):
    """An actor holding only blocks L.. (spec.placement is a suffix placement): scores NEAT shards of
    those layers from a full replica's PreparedConcepts (cluster/prepare.py), which it cannot compute.
    `SuffixScorer(spec, prepared).score(shard)`; on Ray, `prepared` is `[ObjectRef]` (see ShardScorer)."""

    def __init__(self, spec: ScorerSpec, prepared: PreparedConcepts | list):
        if spec.placement is None or not spec.placement.suffix_only:
            raise ValueError("SuffixScorer needs a suffix placement (Placement.from_ranges(..., suffix=True))")
        super().__init__(spec, prepared)
        self.first_layer = spec.placement.first_layer

    def score_table(self, shard: Shard):
        if shard.method != "neat" or shard.layer < self.first_layer:
            raise ValueError(f"shard {shard.shard_id}: a suffix replica of layers {self.first_layer}.. scores "
                             f"only NEAT shards of those layers")
        return super().score_table(shard)

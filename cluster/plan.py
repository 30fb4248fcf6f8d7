"""Resolve a JobConfig against the model's config and tokenizer, and cut the neuron space into shards.

Everything here runs on the driver before Ray starts: every problem becomes one clear error, and
only a resolved plan reaches the actors. The shard plan depends on the model and the config, never on
the number of actors, so any pool size computes the same shards in the same batches.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

from attribution.concepts import Concept, TargetTokens, load_concept_file, resolve_targets
from attribution.errors import AttributionError
from attribution.models import (PLANNED_ONLY, ModelSource, architecture_source, load_tokenizer, read_model_config,
                                resolve_model_source)
from attribution.sites import architecture_for, head_macs
from attribution.weight_files import check_weight_files
from cluster.config import PROMPT_METHODS, ConfigError, JobConfig


# Methods whose rows come once per ablation mode of the run; the others write ablation "none".
ABLATION_METHODS = ("neat", "atp", "prompt-atp", "prompt")
# In-distribution ablation on the concept's cloze prompts (attribution/prompt_effects.py): every
# position of a prompt is set to the value, so only the position-free modes apply (not range).
PROMPT_ABLATIONS = ("zero", "mean")
# What an encoder (no LM head) supports: the methods that read activations only.
ENCODER_METHODS = ("neuronlens", "selectivity")
# Methods that score every neuron of the model in one pass per concept: one shard per layer.
WHOLE_MODEL_METHODS = ("atp", "prompt-atp", "neurgrad", "neuronlens", "selectivity", "ig")


def ablations_for(method: str, ablations: tuple[str, ...]) -> tuple[str, ...]:
    if method in PROMPT_METHODS:
        return tuple(mode for mode in ablations if mode in PROMPT_ABLATIONS)
    return ablations if method in ABLATION_METHODS else ("none",)


@dataclass(frozen=True)
class Shard:
    """Neurons of one layer (the range start..stop, or an explicit sorted `picks`), scored for every
    concept and ablation of the run."""

    method: str
    layer: int
    start: int
    stop: int
    picks: tuple[int, ...] = ()  # a sample (NEG) or a screen's selection (NEAT after AtP)
    concept: str | None = None  # one concept only (a per-concept screen: prompt); None: every concept

    @property
    def neurons(self) -> range | tuple[int, ...]:
        return self.picks if self.picks else range(self.start, self.stop)

    @property
    def shard_id(self) -> str:  # stable: a retried shard rewrites the same staged file
        if self.picks:
            digest = hashlib.sha256(",".join(map(str, self.picks)).encode()).hexdigest()[:10]
            if self.concept is not None:
                return f"{self.method}-{self.concept}-L{self.layer:03d}-p{len(self.picks):06d}-{digest}"
            return f"{self.method}-L{self.layer:03d}-p{len(self.picks):06d}-{digest}"
        return f"{self.method}-L{self.layer:03d}-n{self.start:06d}-{self.stop:06d}"


def sample_neurons(layer: int, d_mlp: int, count: int, *, salt: str = "neg") -> tuple[int, ...]:
    """A seeded sample of `count` neurons of `layer`, sorted; the same on every machine and run."""
    rng = random.Random(f"{salt}:{layer}:{d_mlp}")
    return tuple(sorted(rng.sample(range(d_mlp), min(count, d_mlp))))


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
    encoder: bool = False  # a BERT-family encoder: no LM head, no target tokens

    def rows_per_neuron(self, method: str, concept: str | None = None) -> int:  # one per concept and ablation
        concepts = 1 if concept is not None else len(self.concepts)
        return concepts * len(ablations_for(method, self.config.ablation))

    def shard_rows(self, shard: Shard) -> int:
        return len(shard.neurons) * self.rows_per_neuron(shard.method, shard.concept)

    @property
    def total_rows(self) -> int:
        return sum(self.shard_rows(s) for s in self.shards)

    def shard_cost(self, shard: Shard) -> float:
        """Block-equivalents of one-position forwards; whole-model methods are estimated from their passes."""
        rows = self.rows_per_neuron(shard.method, shard.concept)
        full = self.n_layers + self.layer_cost[-1]  # one forward of one position
        examples = sum(len(rc.concept.examples) + len(rc.concept.negatives) for rc in self.concepts)
        per_layer = 1.0 / len(self.layers)
        if shard.method == "atp":  # a share of one forward + backward (~3 passes) per concept
            return 3.0 * full * rows * per_layer
        if shard.method in PROMPT_METHODS:  # forwards of the concept's prompts (~4 tokens each)
            prompts = sum(len(rc.concept.examples) for rc in self.concepts
                          if shard.concept is None or rc.concept.name == shard.concept)
            passes = 3.0 * per_layer if shard.method == "prompt-atp" else len(shard.neurons)
            return passes * full * 4 * prompts * len(ablations_for(shard.method, self.config.ablation))
        if shard.method in ("neurgrad", "neuronlens", "selectivity"):  # passes over the texts (~12 tokens)
            return 3.0 * full * 12 * examples * per_layer
        if shard.method == "ig":  # per prompt, a forward + backward of ig_steps rows at the last position
            return 3.0 * full * examples * self.config.method_options.ig_steps * len(self.concepts)
        if shard.method == "neg":  # one single-token forward per neuron, sweep point and prompt
            return (self.config.method_options.neg_points + 1) * len(shard.neurons) * full * examples
        return len(shard.neurons) * self.layer_cost[shard.layer] * rows

    @property
    def fingerprint(self) -> str:
        """What the scores depend on (model revision, layers, methods, concepts, batch make-up...),
        hashed: staged shards of a run id may only be resumed by a plan with the same fingerprint."""
        cfg = self.config
        what = {
            "model": [self.model.name, self.model.revision], "layers": list(self.layers),
            "methods": list(cfg.methods), "ablation": list(cfg.ablation), "dtype": cfg.dtype,
            "batch_rows": cfg.batch_rows, "shard_neurons": cfg.shard_neurons,
            "method_options": cfg.method_options.recorded(cfg.methods),
            "concepts": [[rc.concept.name, list(rc.concept.examples), list(rc.concept.negatives),
                          list(rc.targets.ids)] for rc in self.concepts],
        }
        return "sha256:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def estimated_flops(self) -> float:
        return 2.0 * self.macs_per_block * sum(self.shard_cost(s) for s in self.shards)


def _prompt_methods(config: JobConfig) -> tuple[JobConfig, list[str]]:
    """The prompt method needs zero or mean ablation and its AtP pass (the screen of its exact pass)."""
    if not any(mode in PROMPT_ABLATIONS for mode in config.ablation):
        raise ConfigError(f"config {config.source}: key 'ablation' has value {list(config.ablation)}: method prompt "
                          f"sets a neuron at every position of a prompt, so it needs {' or '.join(PROMPT_ABLATIONS)}")
    if "prompt-atp" in config.methods:
        return config, []
    at = config.methods.index("prompt")
    methods = (*config.methods[:at], "prompt-atp", *config.methods[at:])
    return replace(config, methods=methods), ["method prompt: added method prompt-atp (the screen's first pass)"]


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


@contextmanager
def config_value(config: JobConfig, key: str, value: object):
    """A problem with what a config key points at (a model, a concept file) names the config and the key."""
    try:
        yield
    except AttributionError as err:
        raise ConfigError(f"config {config.source}: key {key!r} has value {str(value)!r}: {err}") from None


def check_before_submit(config: JobConfig) -> str | None:
    """What `submit` can check on this machine: the concept file always (it travels with the job), and
    the whole plan when the model resolves here too. Returns a note when the model was left to the cluster."""
    with config_value(config, "concepts", config.concepts):
        load_concept_file(config.concepts)
    try:
        resolve_model_source(config.model)
    except AttributionError:  # a directory or cached hub id that only the cluster's nodes have
        return f"model {config.model!r} is not on this machine: the cluster checks it when the job starts"
    resolve_job(config)
    return None


def resolve_job(config: JobConfig, *, plan_only: bool = False) -> JobPlan:
    """Check the config against the model (config + tokenizer, no weights) and plan the shards.

    plan_only (--dry-run): a model that is not on this machine is planned from the config's
    `architecture` (its config.json); its target words are then left for the cluster to check.
    """
    with config_value(config, "model", config.model):
        try:
            source = resolve_model_source(config.model)
        except AttributionError:
            if not (plan_only and config.architecture):
                raise
            source = architecture_source(config.model, config.architecture)
        model_config = read_model_config(source)
        arch = architecture_for(model_config.model_type, model_name=source.name)
        tokenizer = None
        if source.revision != PLANNED_ONLY:  # planned from its architecture: no tokenizer, no weights here
            tokenizer = load_tokenizer(source)
            check_weight_files(source.path)  # headers only: a corrupt or truncated file fails here, not in an actor
    n_layers = getattr(model_config, "num_hidden_layers", None) or model_config.n_layer
    layers = config.layers if config.layers is not None else tuple(range(n_layers))
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ConfigError(
                f"config {config.source}: key 'layers' has value {layer}: "
                f"layer not in 0..{n_layers - 1} for model {source.name}"
            )
    warnings: list[str] = []
    if arch.encoder:
        unsupported = [m for m in config.methods if m not in ENCODER_METHODS]
        if unsupported:
            raise ConfigError(f"config {config.source}: key 'methods' has value {unsupported}: model {source.name} "
                              f"is an encoder ({model_config.model_type}, no LM head); it supports "
                              f"{', '.join(ENCODER_METHODS)}")
    concepts = []
    with config_value(config, "concepts", config.concepts):
        for concept in load_concept_file(config.concepts):
            # An encoder's probing methods read activations only: target words play no part.
            if arch.encoder or tokenizer is None:
                targets = TargetTokens((), (), ())
            else:
                targets = resolve_targets(tokenizer, concept)
            warnings.extend(targets.warnings)
            concepts.append(ResolvedConcept(concept, targets))
    if "selectivity" in config.methods:  # a probe needs texts without the concept
        lacking = [rc.concept.name for rc in concepts if not rc.concept.negatives]
        if lacking:
            raise ConfigError(f"config {config.source}: key 'concepts' has value {config.concepts!r}: method "
                              f"selectivity needs 'negatives' (texts without the concept) for every concept; "
                              f"missing for {', '.join(lacking[:10])}")
    macs = arch.block_macs(model_config)
    costs = layer_costs(n_layers, head_macs(model_config) / macs)
    d_mlp = getattr(model_config, "intermediate_size", None) or model_config.n_inner or 4 * model_config.n_embd
    if config.method_options.screen_top:
        if "neat" not in config.methods:
            raise ConfigError(f"config {config.source}: key 'method_options.screen_top' has value "
                              f"{config.method_options.screen_top}: the AtP screen selects neurons for exact "
                              f"NEAT, so methods must include neat (methods: {list(config.methods)})")
        if "atp" not in config.methods:  # the screen's first pass
            config = replace(config, methods=("atp", *config.methods))
            warnings.append("method_options.screen_top: added method atp (the screen's first pass)")
    if "prompt" in config.methods:
        config, more = _prompt_methods(config)
        warnings.extend(more)
    shards: tuple[Shard, ...] = ()
    for method in config.methods:
        if method in WHOLE_MODEL_METHODS:  # one pass per concept scores every layer: one shard per layer
            shards += tuple(Shard(method, layer, 0, d_mlp) for layer in layers)
        elif method == "neg":  # a seeded sample of each layer's neurons
            sample = config.method_options.neg_sample
            shards += tuple(Shard(method, layer, 0, d_mlp, sample_neurons(layer, d_mlp, sample)) for layer in layers)
        elif method == "neat" and config.method_options.screen_top:
            pass  # planned after the AtP pass: cluster/screen.py
        elif method == "prompt":
            pass  # planned after the prompt-atp pass: cluster/screen.py
        else:
            shards += plan_shards(method=method, layers=layers, d_mlp=d_mlp, costs=costs,
                                  shard_neurons=config.shard_neurons)
    return JobPlan(
        config=config, model=source, model_type=model_config.model_type, n_layers=n_layers, d_mlp=d_mlp,
        layers=layers, concepts=tuple(concepts), shards=shards,
        run_id=config.run_id or default_run_id(config, source),
        layer_cost=costs, macs_per_block=macs, warnings=tuple(warnings), encoder=arch.encoder,
    )

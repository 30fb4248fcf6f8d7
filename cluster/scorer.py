"""The actor: a plain class that loads one model replica and scores shards. Ray wraps it in the
driver; tests and notebooks can call it directly: `ShardScorer(spec).score(shard)`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from attribution.ablation import ablation_values, read_reference_texts, reference_means
from attribution.atp import atp_effects, log_p_gradients
from attribution.auto_targets import derive_targets
from attribution.models import ModelSource, load_model
from attribution.neat import NEAT_ENGINES, CleanPass, clean_pass, concept_vector
from attribution.neuron_scores import EXTRA_COLUMNS, NeuronScores
from attribution.placement import Placement
from cluster.config import MethodOptions
from cluster.plan import JobPlan, ResolvedConcept, Shard, ablations_for
from storage.schema import SHARD_SCHEMA

# The value columns of a row, after its key columns; the methods fill what they compute, the rest is null.
VALUE_COLUMNS = ("score", "effect", "activation", *EXTRA_COLUMNS)
from storage.staging import write_shard


@dataclass(frozen=True)
class ScorerSpec:
    """What an actor needs from the plan: small, picklable, no weights."""

    model: ModelSource
    concepts: tuple[ResolvedConcept, ...]
    ablations: tuple[str, ...]
    run_id: str
    atlas: str
    device: str
    dtype: str
    threads: int
    batch_rows: int
    method_options: MethodOptions = field(default_factory=MethodOptions)
    storage_options: dict | None = field(default=None, repr=False)  # may hold credentials: never printed
    placement: Placement | None = None  # a replica split over the actor's GPUs, or a suffix (cluster/replicas.py)

    @classmethod
    def from_plan(cls, plan: JobPlan) -> "ScorerSpec":
        cfg = plan.config
        return cls(model=plan.model, concepts=plan.concepts, ablations=cfg.ablation, run_id=plan.run_id,
                   atlas=cfg.atlas, device=cfg.device, dtype=cfg.dtype, threads=cfg.cluster.cpus_per_actor,
                   batch_rows=cfg.batch_rows, method_options=cfg.method_options,
                   storage_options=cfg.storage_options)


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    path: str
    rows: int
    neurons: int
    seconds: float
    actor: str


@dataclass(frozen=True)
class ConceptSummary:
    """Per concept, what the run's metadata records: target tokens and the clean log p(T)."""

    name: str
    target_ids: tuple[int, ...]
    target_tokens: tuple[str, ...]
    target_words: tuple[str, ...]
    base_log_p: float | None  # None for an encoder (no LM head)
    targets_derived: bool = False  # no targets in the concept file: derived from the concept vector


@dataclass
class ScorerInfo:
    actor: str
    device: str
    dtype: str
    threads: int
    load_seconds: float
    prepare_seconds: float
    versions: dict = field(default_factory=dict)


class ShardScorer:
    def __init__(self, spec: ScorerSpec):
        started = time.perf_counter()
        # The thread count fixes the float summation order: 1 or N actors give bit-identical scores.
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.model = load_model(spec.model, device=spec.device, dtype=spec.dtype, placement=spec.placement)
        loaded = time.perf_counter()
        self.clean: dict[str, CleanPass] = {}
        self.grads: dict[str, torch.Tensor] = {}  # concept -> d log p(T) / d a, [n_layers, d_mlp] (AtP)
        self.whole: dict[tuple, NeuronScores] = {}  # (method, concept, layer or None) -> neurons' scores
        self.concepts = self._with_targets(spec.concepts)  # concepts without targets get derived ones
        needs_reference = {"mean", "range"} & set(spec.ablations)
        reference = reference_means(self.model, read_reference_texts()) if needs_reference else None
        # range ablation sets an activation inside the concept's range to the neutral mean (_ablate_to)
        self.ablate_to = {mode: ablation_values(self.model, "mean" if mode == "range" else mode, reference)
                          for mode in spec.ablations}
        self.info = ScorerInfo(
            actor=f"{os.uname().nodename}:{os.getpid()}", device=str(self.model.device), dtype=spec.dtype,
            threads=torch.get_num_threads(), load_seconds=loaded - started,
            prepare_seconds=time.perf_counter() - loaded,
            versions=library_versions(),
        )

    def _with_targets(self, concepts: tuple[ResolvedConcept, ...]) -> tuple[ResolvedConcept, ...]:
        """Compute each concept's vector and clean pass; derive the targets of concepts that have none."""
        if self.model.arch.encoder:  # no LM head: the probing methods need neither
            return concepts
        out = []
        baseline = None
        for rc in concepts:
            vector = concept_vector(self.model, rc.concept.examples, concept=rc.concept.name)
            if rc.targets.pending:
                if baseline is None:  # the neutral text's mean hidden state, the same for every concept
                    baseline = concept_vector(self.model, read_reference_texts(), concept="neutral reference")
                rc = ResolvedConcept(rc.concept, derive_targets(self.model, vector, baseline, concept=rc.concept.name))
            self.clean[rc.concept.name] = clean_pass(self.model, vector, rc.targets.ids)
            out.append(rc)
        return tuple(out)

    def prepared(self):
        """Concepts, clean passes and ablation values on the CPU, for suffix actors (cluster/replicas.py)."""
        from cluster.replicas import prepared_concepts

        return prepared_concepts(self)

    def describe(self) -> tuple[ScorerInfo, tuple[ConceptSummary, ...]]:
        summaries = tuple(
            ConceptSummary(rc.concept.name, rc.targets.ids, rc.targets.strings, rc.targets.words,
                           self.clean[rc.concept.name].log_p if rc.concept.name in self.clean else None,
                           rc.targets.derived)
            for rc in self.concepts
        )
        return self.info, summaries

    def score_table(self, shard: Shard) -> pa.Table:
        """Rows (SHARD_SCHEMA) of one shard: every concept x ablation x neuron."""
        columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        neurons = list(shard.neurons)
        n = len(neurons)
        for rc in self.concepts:
            for mode in ablations_for(shard.method, self.spec.ablations):
                values = self._values(shard, rc, mode)
                columns["model"] += [self.spec.model.name] * n
                columns["model_revision"] += [self.spec.model.revision] * n
                columns["concept"] += [rc.concept.name] * n
                columns["method"] += [shard.method] * n
                columns["ablation"] += [mode] * n
                columns["run_id"] += [self.spec.run_id] * n
                columns["layer"] += [shard.layer] * n
                columns["neuron"] += neurons
                for name in VALUE_COLUMNS:
                    column = values.get(name)
                    columns[name] += [None] * n if column is None else column.float().tolist()
        return pa.table(columns, schema=SHARD_SCHEMA)

    def _values(self, shard: Shard, rc: ResolvedConcept, mode: str) -> dict[str, torch.Tensor]:
        """Column name -> [len(shard.neurons)] values of one concept and ablation mode."""
        name = rc.concept.name
        index = torch.tensor(list(shard.neurons), dtype=torch.long)
        if shard.method in ("neat", "atp"):
            clean = self.clean[name]
            ablate_to = self._ablate_to(rc, mode)[shard.layer]
            if shard.method == "atp":
                if name not in self.grads:  # one backward per concept serves every layer
                    self.grads[name] = log_p_gradients(self.model, clean, rc.targets.ids)
                effect = atp_effects(self.grads[name], clean, shard.layer, shard.neurons, ablate_to)
            else:
                engine = NEAT_ENGINES[self.spec.dtype]  # float32: exact; bf16: difference propagation
                effect = engine(self.model, clean, rc.targets.ids, shard.layer, shard.neurons, ablate_to,
                                batch_rows=self.spec.batch_rows)
            activation = clean.acts[shard.layer].float().cpu()[index]
            return {"score": effect.abs(), "effect": effect, "activation": activation}
        if shard.method == "neg":
            from attribution.neurgrad import neg_slopes

            slopes = neg_slopes(self.model, self._prompts(rc), [(shard.layer, i) for i in shard.neurons],
                                points=self.spec.method_options.neg_points)
            activation = self._whole("neurgrad", rc).activation[shard.layer][index]
            return {"score": slopes.abs(), "effect": slopes, "activation": activation}
        # IG integrates each layer on its own: an actor computes only its shard's layer.
        scores = self._whole(shard.method, rc, layer=shard.layer if shard.method == "ig" else None)
        out = {"score": scores.ranking_score, "effect": scores.effect, "activation": scores.activation,
               **scores.extra}
        return {key: value[shard.layer][index] for key, value in out.items()}

    def _whole(self, method: str, rc: ResolvedConcept, *, layer: int | None = None) -> NeuronScores:
        """A whole-model method's scores for every neuron (or one layer's), once per concept and actor."""
        key = (method, rc.concept.name, layer)
        if key not in self.whole:  # imported here: an actor loads only the methods its run uses
            options = self.spec.method_options
            if method == "neurgrad":
                from attribution.neurgrad import neurgrad_scores

                scores = neurgrad_scores(self.model, self._prompts(rc))
            elif method == "ig":
                from attribution.integrated_gradients import ig_scores

                scores = ig_scores(self.model, self._prompts(rc), steps=options.ig_steps,
                                   layers=None if layer is None else [layer])
            elif method == "neuronlens":
                from attribution.neuronlens import neuronlens_scores

                scores = neuronlens_scores(self.model, rc.concept, tau=options.range_tau)
            elif method == "selectivity":
                from attribution.selectivity import selectivity_scores

                scores = selectivity_scores(self.model, rc.concept)
            else:
                raise ValueError(f"method {method!r} is not a whole-model method")
            self.whole[key] = scores
        return self.whole[key]

    def _prompts(self, rc: ResolvedConcept):
        from dataclasses import replace

        from attribution.prompts import concept_prompts

        if rc.targets.derived:  # the prompts cut examples before a target word: the derived ones
            rc = ResolvedConcept(replace(rc.concept, targets=rc.targets.words), rc.targets)
        return concept_prompts(self.model.tokenizer, rc.concept, rc.targets.ids)

    def _ablate_to(self, rc: ResolvedConcept, mode: str) -> torch.Tensor:  # [n_layers, d_mlp]
        """The value each neuron is set to; range ablation changes only activations inside the concept's range."""
        if mode != "range":
            return self.ablate_to[mode]
        lens = self._whole("neuronlens", rc)
        acts = self.clean[rc.concept.name].acts.float().cpu()  # [n_layers, d_mlp] on the concept vector
        inside = (acts >= lens.extra["range_low"]) & (acts <= lens.extra["range_high"])
        return torch.where(inside, self.ablate_to["range"].cpu(), acts)

    def reference_effects(self, names: list[str]):
        """AtP effects of every neuron on the named reference concepts (attribution/reference.py) for the
        run's zero and mean ablations: (names, target ids, {mode: [concepts, n_layers, d_mlp] float32
        numpy}), or None where AtP does not run (an encoder, a split or suffix replica)."""
        from attribution.reference import reference_concepts, reference_effects

        if self.model.arch.encoder or self.spec.placement is not None:
            return None
        modes = {mode: values for mode, values in self.ablate_to.items() if mode in ("zero", "mean")}
        result = reference_effects(self.model, [c for c in reference_concepts() if c.name in names], modes)
        return result.concepts, result.target_ids, {mode: t.numpy() for mode, t in result.effects.items()}

    def score(self, shard: Shard) -> ShardResult:
        started = time.perf_counter()
        table = self.score_table(shard)
        path = write_shard(table, self.spec.atlas, run_id=self.spec.run_id, shard_id=shard.shard_id,
                           storage_options=self.spec.storage_options)
        return ShardResult(shard.shard_id, path, table.num_rows, len(shard.neurons),
                           time.perf_counter() - started, self.info.actor)


def library_versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("neuron-atlas", "torch", "transformers", "ray", "pyarrow", "deltalake", "duckdb"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out

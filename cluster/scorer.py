"""The actor: a plain class that loads one model replica and scores shards. Ray wraps it in the
driver; tests and notebooks can call it directly: `ShardScorer(spec).score(shard)`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from attribution.atp import atp_effects, log_p_gradients
from attribution.held_weights import hold_in_bf16
from attribution.lm_head import HeadMomentsCache, head_moments
from attribution.models import ModelSource, load_model
from attribution.neat import NEAT_ENGINES, CleanPass, placed
from attribution.neuron_scores import EXTRA_COLUMNS, NeuronScores
from attribution.placement import Placement
from cluster.config import PROMPT_METHODS, MethodOptions
from cluster.plan import JobPlan, ResolvedConcept, Shard, ablations_for
from cluster.prepare import PreparedConcepts, prepare_concepts
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
    baseline: str | None = None  # fingerprint of the clean pass every shard was scored against (prepare.py)


@dataclass
class ScorerInfo:
    actor: str
    device: str
    dtype: str
    threads: int
    load_seconds: float
    prepare_seconds: float
    versions: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)  # torch's matmul flags in force (attribution/models.py)


class ShardScorer:
    """Loads one replica and scores shards. `prepared`: a run's PreparedConcepts (cluster/prepare.py),
    or on Ray a one-element list holding the ObjectRef of the first actor's `prepared()` (Ray leaves a
    nested reference unresolved: this actor loads its replica meanwhile, and a restarted actor gets the
    same reference again); None: this actor prepares the concepts itself (the run's first actor)."""

    def __init__(self, spec: ScorerSpec, prepared: PreparedConcepts | list | None = None):
        started = time.perf_counter()
        # The thread count fixes the float summation order: 1 or N actors give bit-identical scores.
        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.model = load_model(spec.model, device=spec.device, dtype=spec.dtype, placement=spec.placement)
        if _holds_low_precision(self.model):  # a bf16 checkpoint loaded as is: its forwards read float32
            hold_in_bf16(self.model)
        loaded = time.perf_counter()
        if prepared is None:
            prepared = prepare_concepts(self.model, spec.concepts, ablations=spec.ablations, dtype=spec.dtype,
                                        options=spec.method_options)
        elif isinstance(prepared, list):
            import ray

            prepared = ray.get(prepared[0])
        self._prepared = prepared
        self.concepts = prepared.concepts
        self.clean: dict[str, CleanPass] = {name: placed(self.model, c) for name, c in prepared.clean.items()}
        if spec.dtype == "bf16" and self.model.has_lm_head:  # the clean baselines are float32: now hold bf16
            hold_in_bf16(self.model)
        # Every shard scores every concept: one concept's moments per concept (d_model^2 floats each).
        self.head_moments = HeadMomentsCache(capacity=max(1, len(self.concepts)))
        self.grads: dict[str, torch.Tensor] = {}  # concept -> d log p(T) / d a, [n_layers, d_mlp] (AtP)
        self.whole: dict[tuple, NeuronScores] = {}  # (method, concept, layer or None) -> neurons' scores
        self.prompt_atp: dict[tuple, torch.Tensor] = {}  # (concept, mode) -> [n_layers, d_mlp] prompt AtP
        self._reference_prompts: dict | None = None  # reference concept -> its cloze prompts (measure_sets)
        self.info = ScorerInfo(
            actor=f"{os.uname().nodename}:{os.getpid()}", device=str(self.model.device), dtype=spec.dtype,
            threads=torch.get_num_threads(), load_seconds=loaded - started,
            prepare_seconds=time.perf_counter() - loaded,  # preparing, or waiting for the first actor's
            versions=library_versions(), precision=self.model.precision,
        )

    def prepared(self) -> PreparedConcepts:
        """The run's preparation on the CPU, for every other actor (cluster/prepare.py)."""
        return self._prepared

    def _moments(self, name: str):
        """The concept's head moments on the head's device (bf16 engine), from the preparation."""
        def make():
            ready = self._prepared.moments.get(name)
            if ready is None:  # prepared for the float32 engine
                return head_moments(self.model, self.clean[name].resid[-1])
            return ready.to(self.model.head_device)
        return self.head_moments.get(name, make)

    def describe(self) -> tuple[ScorerInfo, tuple[ConceptSummary, ...]]:
        summaries = tuple(
            ConceptSummary(rc.concept.name, rc.targets.ids, rc.targets.strings, rc.targets.words,
                           self.clean[rc.concept.name].log_p if rc.concept.name in self.clean else None,
                           rc.targets.derived, self._prepared.baselines.get(rc.concept.name))
            for rc in self.concepts
        )
        return self.info, summaries

    def score_table(self, shard: Shard) -> pa.Table:
        """Rows (SHARD_SCHEMA) of one shard: every concept x ablation x neuron."""
        columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        neurons = list(shard.neurons)
        n = len(neurons)
        for rc in self.concepts:
            if shard.concept is not None and rc.concept.name != shard.concept:
                continue  # a per-concept shard (the prompt screen's exact pass)
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
                extra = {"moments": self._moments(name)} if self.spec.dtype == "bf16" else {}
                effect = engine(self.model, clean, rc.targets.ids, shard.layer, shard.neurons, ablate_to,
                                batch_rows=self.spec.batch_rows, **extra)
            activation = clean.acts[shard.layer].float().cpu()[index]
            return {"score": effect.abs(), "effect": effect, "activation": activation}
        if shard.method in PROMPT_METHODS:  # in-distribution: the concept's cloze prompts
            from attribution.prompt_effects import prompt_atp, prompt_neuron_effects

            ablate_to = self._ablate_to(rc, mode)
            if shard.method == "prompt-atp":
                if (name, mode) not in self.prompt_atp:  # one forward and backward serves every layer
                    self.prompt_atp[(name, mode)] = prompt_atp(self.model, self._prompts(rc), ablate_to)
                effect = self.prompt_atp[(name, mode)][shard.layer][index]
            else:
                from attribution.validation import prompt_batch_rows

                effect = prompt_neuron_effects(self.model, self._prompts(rc), shard.layer, shard.neurons, ablate_to,
                                               batch_rows=prompt_batch_rows(self.model.device, self.spec.batch_rows))
            return {"score": effect.abs(), "effect": effect}
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
        """The value each neuron is set to (range ablation: only activations inside the concept's range)."""
        return self._prepared.ablate_to[(rc.concept.name, mode)]

    def float32_effects(self, sample: tuple[tuple[int, tuple[int, ...]], ...]) -> dict[str, list[float]]:
        """concept -> float32 NEAT effects (the exact engine, first ablation mode) of the (layer, neurons)
        sample, in sample order: what a bf16 run's ranking is checked against (cluster/checks.py)."""
        from attribution.neat import neat_effects

        mode = self.spec.ablations[0]
        out = {}
        for rc in self.concepts:
            effects = [neat_effects(self.model, self.clean[rc.concept.name], rc.targets.ids, layer, neurons,
                                    self._ablate_to(rc, mode)[layer], batch_rows=self.spec.batch_rows)
                       for layer, neurons in sample]
            out[rc.concept.name] = torch.cat(effects).tolist()
        return out

    def reference_effects(self, names: list[str], *, vectors: bool = True, prompts: bool = False):
        """AtP effects of every neuron on the named reference concepts (attribution/reference.py) for the
        run's zero and mean ablations: (names, target ids, {mode: [concepts, n_layers, d_mlp] float32
        numpy} on the concept vectors or None, the same on the concepts' prompts or None), or None where
        AtP does not run (an encoder, a split or suffix replica)."""
        from attribution.reference import reference_concepts, reference_effects, reference_prompt_effects

        if self.model.arch.encoder or self.spec.placement is not None:
            return None
        # Zero and mean ablation values are the same for every concept of the preparation: [n_layers, d_mlp].
        modes = {mode: values for (_, mode), values in self._prepared.ablate_to.items() if mode in ("zero", "mean")}
        concepts = [c for c in reference_concepts() if c.name in names]
        on_vectors = reference_effects(self.model, concepts, modes) if vectors else None
        on_prompts = reference_prompt_effects(self.model, concepts, modes) if prompts else None
        result = on_vectors or on_prompts
        return (result.concepts, result.target_ids,
                None if on_vectors is None else {mode: t.numpy() for mode, t in on_vectors.effects.items()},
                None if on_prompts is None else {mode: t.numpy() for mode, t in on_prompts.effects.items()})

    def measure_sets(self, concept: str, mode: str, sets: dict, baseline_layers: list[int] | None = None) -> list:
        """The candidate top-k sets of one concept's prompt ranking, each ablated together on its prompts
        and on every prompt of the reference concepts and the run's other concepts (validate's panel)
        (attribution/measured_selection.py): [SetMeasure], one per penalty of `sets`.

        baseline_layers: the run's layers; then also `validate`'s random baseline on the concept's
        prompts at its defaults goes into the cache on this node (attribution/baseline_cache.py), so
        the first validate of the concept ablates only its top-k sets there; and the clean states of
        the panel's prompts and of the neutral text (attribution/clean_cache.py), so it runs no clean
        forward."""
        from attribution.measured_selection import measure_sets
        from attribution.reference import reference_concepts, reference_prompts

        mine = next(rc for rc in self.concepts if rc.concept.name == concept)
        if self._reference_prompts is None:  # the run's reference contrast resolved every one of them
            self._reference_prompts = {reference.name: reference_prompts(self.model.tokenizer, reference)[1]
                                       for reference in reference_concepts()}
        contrast = dict(self._reference_prompts)
        contrast.update({rc.concept.name: self._prompts(rc) for rc in self.concepts if rc.concept.name != concept})
        measured = measure_sets(self.model, sets, self._prompts(mine), contrast, self._ablate_to(mine, mode))
        if baseline_layers is not None and mode in ("zero", "mean"):  # validate's intervention for these rows
            from attribution.baseline_cache import (DEFAULT_DRAWS, DEFAULT_KS, DEFAULT_SEED,
                                                    cached_random_prompt_changes)

            cached_random_prompt_changes(self.model, self._prompts(mine), self._ablate_to(mine, mode), None,
                                         layers=list(baseline_layers), ks=list(DEFAULT_KS), draws=DEFAULT_DRAWS,
                                         seed=DEFAULT_SEED)
            # validate's neutral text: its clean states join the panel's (filled by measure_sets above)
            from attribution.ablation import read_reference_texts
            from attribution.clean_cache import cached_clean_starts

            cached_clean_starts(self.model, read_reference_texts(), set())
        return measured

    def score(self, shard: Shard) -> ShardResult:
        started = time.perf_counter()
        table = self.score_table(shard)
        path = write_shard(table, self.spec.atlas, run_id=self.spec.run_id, shard_id=shard.shard_id,
                           storage_options=self.spec.storage_options)
        return ShardResult(shard.shard_id, path, table.num_rows, len(shard.neurons),
                           time.perf_counter() - started, self.info.actor)


def _holds_low_precision(model) -> bool:
    """Some multiplied weight is held below float32 (a checkpoint loaded in its own bf16)."""
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in model.hf.parameters())


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

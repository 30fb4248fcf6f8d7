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
from attribution.models import ModelSource, load_model
from attribution.neat import NEAT_ENGINES, CleanPass, clean_pass, concept_vector
from cluster.plan import JobPlan, ResolvedConcept, Shard
from storage.schema import SHARD_SCHEMA
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
    storage_options: dict | None = field(default=None, repr=False)  # may hold credentials: never printed

    @classmethod
    def from_plan(cls, plan: JobPlan) -> "ScorerSpec":
        cfg = plan.config
        return cls(model=plan.model, concepts=plan.concepts, ablations=cfg.ablation, run_id=plan.run_id,
                   atlas=cfg.atlas, device=cfg.device, dtype=cfg.dtype, threads=cfg.cluster.cpus_per_actor,
                   batch_rows=cfg.batch_rows, storage_options=cfg.storage_options)


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
    base_log_p: float


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
        self.model = load_model(spec.model, device=spec.device, dtype=spec.dtype)
        loaded = time.perf_counter()
        self.clean: dict[str, CleanPass] = {}
        self.grads: dict[str, torch.Tensor] = {}  # concept -> d log p(T) / d a, [n_layers, d_mlp] (AtP)
        for rc in spec.concepts:
            vector = concept_vector(self.model, rc.concept.examples, concept=rc.concept.name)
            self.clean[rc.concept.name] = clean_pass(self.model, vector, rc.targets.ids)
        reference = reference_means(self.model, read_reference_texts()) if "mean" in spec.ablations else None
        self.ablate_to = {mode: ablation_values(self.model, mode, reference) for mode in spec.ablations}
        self.info = ScorerInfo(
            actor=f"{os.uname().nodename}:{os.getpid()}", device=str(self.model.device), dtype=spec.dtype,
            threads=torch.get_num_threads(), load_seconds=loaded - started,
            prepare_seconds=time.perf_counter() - loaded,
            versions=library_versions(),
        )

    def describe(self) -> tuple[ScorerInfo, tuple[ConceptSummary, ...]]:
        summaries = tuple(
            ConceptSummary(rc.concept.name, rc.targets.ids, rc.targets.strings, rc.targets.words,
                           self.clean[rc.concept.name].log_p)
            for rc in self.spec.concepts
        )
        return self.info, summaries

    def score_table(self, shard: Shard) -> pa.Table:
        """Rows (SHARD_SCHEMA) of one shard: every concept x ablation x neuron."""
        columns: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        n = len(shard.neurons)
        for rc in self.spec.concepts:
            clean = self.clean[rc.concept.name]
            activation = clean.acts[shard.layer, shard.start:shard.stop].float().cpu()
            for mode in self.spec.ablations:
                effect = self._effects(shard, rc, self.ablate_to[mode][shard.layer])
                columns["model"] += [self.spec.model.name] * n
                columns["model_revision"] += [self.spec.model.revision] * n
                columns["concept"] += [rc.concept.name] * n
                columns["method"] += [shard.method] * n
                columns["ablation"] += [mode] * n
                columns["run_id"] += [self.spec.run_id] * n
                columns["layer"] += [shard.layer] * n
                columns["neuron"] += list(shard.neurons)
                columns["score"] += effect.abs().tolist()
                columns["effect"] += effect.tolist()
                columns["activation"] += activation.tolist()
        return pa.table(columns, schema=SHARD_SCHEMA)

    def _effects(self, shard: Shard, rc: ResolvedConcept, ablate_to: torch.Tensor) -> torch.Tensor:  # [n]
        clean = self.clean[rc.concept.name]
        if shard.method == "atp":
            if rc.concept.name not in self.grads:  # one backward per concept serves every layer
                self.grads[rc.concept.name] = log_p_gradients(self.model, clean, rc.targets.ids)
            return atp_effects(self.grads[rc.concept.name], clean, shard.layer, shard.neurons, ablate_to)
        engine = NEAT_ENGINES[self.spec.dtype]  # float32: exact; bf16: difference propagation
        return engine(self.model, clean, rc.targets.ids, shard.layer, shard.neurons, ablate_to,
                      batch_rows=self.spec.batch_rows)

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

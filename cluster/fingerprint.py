"""A run's fingerprint: a hash of everything its scores depend on (model weights or hub commit, the
concept set, methods, ablations, method options, layers, dtype, the project's version). Stored with
every run; a scheduled job whose fingerprint equals the latest run's of its model and concept set
has nothing new to compute.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from attribution.concepts import Concept
from attribution.models import ModelSource
from cluster.config import JobConfig

SCHEDULED_FOR_ENV = "NEURON_ATLAS_SCHEDULED_FOR"  # set by the scheduler in a submitted job's environment


def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neuron-atlas")
    except PackageNotFoundError:
        return "unknown"


def concept_set_hash(concepts: Iterable[Concept]) -> str:
    """sha256 of the concepts as data (names, examples, targets, negatives, descriptions): the same
    for a file and its copy, whatever its YAML layout."""
    data = [dataclasses.asdict(c) for c in concepts]
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def concept_set_label(config: JobConfig) -> str:
    """The concept set's name: the schedule's `concept_set`, else the concept file's stem (as a slug)."""
    if config.schedule is not None and config.schedule.concept_set:
        return config.schedule.concept_set
    stem = Path(config.concepts.rstrip("/")).stem.lower()
    return re.sub(r"[^a-z0-9_.-]+", "-", stem).strip("-.") or "concepts"


def family_label(config: JobConfig, model: ModelSource) -> str:
    """Runs of one family are compared for drift: the schedule's `name`, else the model's atlas name."""
    if config.schedule is not None and config.schedule.name:
        return config.schedule.name
    return model.name


@dataclass(frozen=True)
class Fingerprint:
    id: str  # "fp:" + 16 hex digits over `components`
    family: str  # labels, not hashed: which runs this one is compared with
    concept_set: str
    components: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "family": self.family, "concept_set": self.concept_set, "components": self.components}


def job_fingerprint(config: JobConfig, *, model: ModelSource, concepts: Iterable[Concept]) -> Fingerprint:
    """The fingerprint of the job `config` would run on `model` with `concepts` (computed alike by the
    scheduler before it submits and by the driver when it commits)."""
    concepts = list(concepts)
    methods = set(config.methods)
    if config.method_options.screen_top:  # resolve_job adds the screen's AtP pass
        methods.add("atp")
    if "prompt" in methods:  # and the prompt method's AtP pass
        methods.add("prompt-atp")
    components = {
        "model": {"name": model.name, "revision": model.revision},
        "concepts": {"sha256": concept_set_hash(concepts), "names": sorted(c.name for c in concepts)},
        "methods": sorted(methods),
        "ablation": sorted(config.ablation),
        "method_options": config.method_options.recorded(config.methods),
        "layers": "all" if config.layers is None else sorted(config.layers),
        "dtype": config.dtype,
        "version": project_version(),
    }
    digest = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()[:16]
    return Fingerprint(id=f"fp:{digest}", family=family_label(config, model), concept_set=concept_set_label(config),
                       components=components)


def run_lineage(plan) -> dict[str, Any]:
    """What a run's metadata records about why it ran: its fingerprint and, for a scheduled run, the
    schedule and the time it was due (`plan` is a cluster.plan.JobPlan)."""
    config = plan.config
    out: dict[str, Any] = {
        "fingerprint": job_fingerprint(config, model=plan.model, concepts=[rc.concept for rc in plan.concepts]).as_dict()
    }
    if config.schedule is not None:
        schedule = config.schedule
        out["schedule"] = {"cron": schedule.cron, "timezone": schedule.timezone,
                           "name": family_label(config, plan.model), "concept_set": concept_set_label(config),
                           "scheduled_for": os.environ.get(SCHEDULED_FOR_ENV)}
    return out

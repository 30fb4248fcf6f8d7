"""One preparation per run: what every actor scores a concept against, computed once and shared.

Concept vectors, derived targets, clean passes with their clean trajectories, ablation values and (for
the bf16 engine) head moments are computed by one full replica (the driver's first actor) and reach
every other actor through Ray's object store, so every shard of a concept uses the same baseline,
whatever GPU type scored it. The baseline's fingerprint goes into the run's metadata.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from attribution.ablation import ablation_values, read_reference_texts, reference_means
from attribution.auto_targets import derive_targets
from attribution.lm_head import HeadMoments, head_moments
from attribution.models import SiteModel
from attribution.neat import CleanPass, clean_pass, concept_vector
from cluster.config import MethodOptions
from cluster.plan import ResolvedConcept


@dataclass(frozen=True)
class PreparedConcepts:
    """A run's per-concept baselines, on the CPU (picklable; shipped once through the object store)."""

    concepts: tuple[ResolvedConcept, ...]  # with derived targets filled in
    clean: dict[str, CleanPass] = field(repr=False)  # concept -> clean pass with its clean trajectory
    ablate_to: dict[tuple[str, str], torch.Tensor] = field(repr=False)  # (concept, mode) -> [n_layers, d_mlp]
    moments: dict[str, HeadMoments] = field(default_factory=dict, repr=False)  # bf16 engine only
    baselines: dict[str, str] = field(default_factory=dict)  # concept -> fingerprint of its clean pass


def baseline_fingerprint(clean: CleanPass, target_ids: tuple[int, ...]) -> str:
    """sha256 (16 hex digits) of a concept's targets and clean pass: vector, residuals, activations,
    trajectory and log p. Two actors that print the same fingerprint scored against the same baseline."""
    digest = hashlib.sha256(repr(tuple(target_ids)).encode())
    tensors = [clean.vector, *clean.resid, clean.acts,
               *(v for block in clean.blocks if block is not None for _, v in sorted(block.values.items()))]
    for tensor in tensors:
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(repr(float(clean.log_p)).encode())
    return "sha256:" + digest.hexdigest()[:16]


@torch.no_grad()
def prepare_concepts(model: SiteModel, concepts: tuple[ResolvedConcept, ...], *, ablations: tuple[str, ...],
                     dtype: str, options: MethodOptions | None = None) -> PreparedConcepts:
    """Everything per concept an actor needs before scoring, on a full replica, moved to the CPU.

    Runs in float32 (before the bf16 engine's weights are held in bf16): the clean passes, trajectories
    and head moments are the float32 baseline every difference is measured from."""
    options = options or MethodOptions()
    if model.arch.encoder:  # no LM head: the probing methods need no clean pass
        return PreparedConcepts(concepts, {}, {})
    resolved, clean = [], {}
    baseline = None
    for rc in concepts:
        vector = concept_vector(model, rc.concept.examples, concept=rc.concept.name)
        if rc.targets.pending:
            if baseline is None:  # the neutral text's mean hidden state, the same for every concept
                baseline = concept_vector(model, read_reference_texts(), concept="neutral reference")
            rc = ResolvedConcept(rc.concept, derive_targets(model, vector, baseline, concept=rc.concept.name))
        clean[rc.concept.name] = clean_pass(model, vector, rc.targets.ids).to("cpu")
        resolved.append(rc)
    needs_reference = {"mean", "range"} & set(ablations)
    reference = reference_means(model, read_reference_texts()) if needs_reference else None
    per_mode = {mode: ablation_values(model, "mean" if mode == "range" else mode, reference).cpu()
                for mode in ablations}
    ablate_to = {}
    for rc in resolved:
        for mode in ablations:
            ablate_to[(rc.concept.name, mode)] = _concept_ablation(model, rc, mode, per_mode[mode],
                                                                   clean[rc.concept.name], options)
    moments = ({name: head_moments(model, c.resid[-1]).to(torch.device("cpu")) for name, c in clean.items()}
               if dtype == "bf16" else {})
    baselines = {rc.concept.name: baseline_fingerprint(clean[rc.concept.name], rc.targets.ids) for rc in resolved}
    return PreparedConcepts(tuple(resolved), clean, ablate_to, moments, baselines)


def _concept_ablation(model: SiteModel, rc: ResolvedConcept, mode: str, values: torch.Tensor, clean: CleanPass,
                      options: MethodOptions) -> torch.Tensor:  # [n_layers, d_mlp] on the CPU
    """The value each neuron is set to; range ablation changes only activations inside the concept's
    NeuronLens range (to the neutral mean) and leaves the others at their clean value."""
    if mode != "range":
        return values
    from attribution.neuronlens import neuronlens_scores

    lens = neuronlens_scores(model, rc.concept, tau=options.range_tau)
    acts = clean.acts.float().cpu()  # [n_layers, d_mlp] on the concept vector
    inside = (acts >= lens.extra["range_low"].cpu()) & (acts <= lens.extra["range_high"].cpu())
    return torch.where(inside, values, acts)

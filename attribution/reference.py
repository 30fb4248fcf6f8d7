"""The reference contrast: AtP estimates of every neuron's effect on each concept of the reference set
(configs/concepts/reference.yaml), one forward and one backward of each concept vector. A run stores
them so that a concept's specific ranking contrasts with the same broad panel whatever else the run
holds (attribution/specificity.py). A run with the prompt method also stores each reference concept's
prompt AtP (one forward and one backward of its cloze prompts, attribution/prompt_effects.py): the
contrast of the in-distribution ranking.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from attribution.atp import log_p_gradients
from attribution.concepts import Concept, load_concept_file, resolve_targets
from attribution.models import SiteModel
from attribution.neat import clean_pass

REFERENCE_CONCEPTS = Path(__file__).resolve().parent.parent / "configs" / "concepts" / "reference.yaml"


@dataclass(frozen=True)
class ReferenceEffects:
    """AtP effects of every neuron on each reference concept, per ablation mode."""

    concepts: tuple[str, ...]
    target_ids: tuple[tuple[int, ...], ...]  # per concept
    effects: dict[str, Tensor]  # ablation mode -> [concepts, n_layers, d_mlp] float32 (CPU)


def reference_concepts(path: str | Path = REFERENCE_CONCEPTS) -> list[Concept]:
    return load_concept_file(path)


def reference_effects(model: SiteModel, concepts: list[Concept], ablate_to: dict[str, Tensor]) -> ReferenceEffects:
    """AtP effect (ablate_to - a) * d log p(T) / d a of every neuron, for each concept and mode.

    ablate_to: mode -> [n_layers, d_mlp] values the neurons are set to (zero or the neutral means).
    """
    from attribution.vector_cache import cached_concept_vectors

    effects = {mode: [] for mode in ablate_to}
    targets = []
    # Kept on disk: `validate` needs the same vectors for its panel.
    vectors = cached_concept_vectors(model, {concept.name: concept.examples for concept in concepts})
    for concept in concepts:
        ids = resolve_targets(model.tokenizer, concept).ids
        clean = clean_pass(model, vectors[concept.name], ids)
        grads = log_p_gradients(model, clean, ids)  # [n_layers, d_mlp]
        for mode, values in ablate_to.items():
            delta = values.to(clean.acts.device).float() - clean.acts.float()  # [n_layers, d_mlp]
            effects[mode].append((delta * grads.to(delta.device)).cpu())
        targets.append(ids)
    return ReferenceEffects(tuple(c.name for c in concepts), tuple(targets),
                            {mode: torch.stack(rows) for mode, rows in effects.items()})


def reference_prompt_effects(model: SiteModel, concepts: list[Concept], ablate_to: dict[str, Tensor]) -> ReferenceEffects:
    """Prompt AtP of every neuron on each concept's cloze prompts (the change of mean log p(gold) when the
    neuron is set to the mode's value at every position), per mode: [concepts, n_layers, d_mlp]."""
    from attribution.prompt_effects import prompt_atp

    effects = {mode: [] for mode in ablate_to}
    targets = []
    for concept in concepts:
        ids, prompts = reference_prompts(model.tokenizer, concept)
        for mode, values in ablate_to.items():
            effects[mode].append(prompt_atp(model, prompts, values))
        targets.append(ids)
    return ReferenceEffects(tuple(c.name for c in concepts), tuple(targets),
                            {mode: torch.stack(rows) for mode, rows in effects.items()})


def reference_prompts(tokenizer, concept: Concept):
    """A reference concept's target ids and cloze prompts under this tokenizer: (ids, [Prompt])."""
    from attribution.prompts import concept_prompts

    ids = resolve_targets(tokenizer, concept).ids
    return ids, concept_prompts(tokenizer, concept, ids)

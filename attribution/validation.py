"""Is a ranking causal, and specific? (DESIGN.md section 4, "Validation").

Ablate a method's top-k neurons together and measure the change of the concept's log p(T); compare
with k random neurons over many draws (mean, spread, z-score, empirical p-value), with the same
ablation's change on every other concept (specificity), and with the change of the next-token loss
on neutral text (collateral damage).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attribution.masking import NeuronMask, masked
from attribution.models import SiteModel
from attribution.neat import CleanPass, log_p_targets, text_batches

Neuron = tuple[int, int]  # (layer, neuron)


@dataclass(frozen=True)
class ConceptProbe:
    """One concept as the validation needs it: its clean pass and target tokens."""

    name: str
    clean: CleanPass
    target_ids: tuple[int, ...]


@dataclass(frozen=True)
class ValidationResult:
    concept: str
    k: int
    top_change: float  # log p(T | top-k ablated together) - log p(T)
    random_mean: float  # the same for k random neurons, over `draws` draws
    random_std: float
    z_score: float
    p_value: float  # two-sided, empirical: share of draws at least as far from 0 as the top-k
    draws: int
    other_changes: dict[str, float] = field(default_factory=dict)  # other concept -> its change
    neutral_loss_change: float = 0.0  # mean next-token loss on neutral text, ablated - clean (nats)


def _masks(neurons: list[Neuron], ablate_to: Tensor) -> list[NeuronMask]:
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(layer, []).append(neuron)
    return [NeuronMask(layer, tuple(ns), tuple(float(ablate_to[layer, n]) for n in ns))
            for layer, ns in sorted(by_layer.items())]


@torch.no_grad()
def ablation_change(model: SiteModel, probe: ConceptProbe, neurons: list[Neuron], ablate_to: Tensor) -> float:
    """log p(T | neurons ablated together) - log p(T), one full forward of the concept vector."""
    with masked(model, *_masks(neurons, ablate_to)):
        logits = model.hf(inputs_embeds=probe.clean.vector.view(1, 1, -1).to(model.device, model.dtype)).logits
    targets = torch.tensor(probe.target_ids, device=model.device)
    return float(log_p_targets(logits[:, -1], targets)[0]) - probe.clean.log_p


@torch.no_grad()
def neutral_loss(model: SiteModel, texts: list[str], masks: list[NeuronMask] = ()) -> float:
    """Mean next-token cross-entropy (nats) over the texts' real tokens, with the masks applied."""
    total, count = 0.0, 0
    with masked(model, *masks):
        for batch in text_batches(model, texts):
            logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts positions 1..
            nll = -log_probs.gather(-1, batch.input_ids[:, 1:, None])[..., 0]  # [texts, pos - 1]
            keep = batch.keep[:, 1:]
            total += float((nll * keep).sum())
            count += int(keep.sum())
    return total / count


def validate_ranking(model: SiteModel, probe: ConceptProbe, top: list[Neuron], ks: list[int], *,
                     others: list[ConceptProbe], ablate_to: Tensor, layers: list[int], draws: int = 20,
                     seed: int = 0, neutral_texts: list[str] = ()) -> list[ValidationResult]:
    """For each k: the top-k ablation against `draws` random k-neuron ablations from `layers`."""
    generator = torch.Generator().manual_seed(seed)
    clean_loss = neutral_loss(model, list(neutral_texts)) if neutral_texts else 0.0
    population = len(layers) * model.d_mlp
    results = []
    for k in ks:
        chosen = top[:k]
        top_change = ablation_change(model, probe, chosen, ablate_to)
        random_changes = []
        for _ in range(draws):
            picks = torch.randperm(population, generator=generator)[:k].tolist()
            neurons = [(layers[p // model.d_mlp], p % model.d_mlp) for p in picks]
            random_changes.append(ablation_change(model, probe, neurons, ablate_to))
        changes = torch.tensor(random_changes, dtype=torch.float64)
        mean, std = float(changes.mean()), float(changes.std()) if draws > 1 else 0.0
        as_far = int((changes.abs() >= abs(top_change)).sum())
        loss = neutral_loss(model, list(neutral_texts), _masks(chosen, ablate_to)) if neutral_texts else 0.0
        results.append(ValidationResult(
            concept=probe.name, k=len(chosen), top_change=top_change, random_mean=mean, random_std=std,
            z_score=(top_change - mean) / std if std > 0 else float("inf"),
            p_value=(as_far + 1) / (draws + 1), draws=draws,
            other_changes={o.name: ablation_change(model, o, chosen, ablate_to) for o in others},
            neutral_loss_change=loss - clean_loss,
        ))
    return results

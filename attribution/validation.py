"""Is a ranking causal, and specific? (docs/design.md, "Methods").

Ablate a method's top-k neurons together and measure the change of the concept's log p(T); compare
with k random neurons over many draws (mean, spread, z-score, empirical p-value), with the same
ablation's change on every other concept (specificity), and with the change of the next-token loss
on neutral text (collateral damage).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from attribution.masking import NeuronMask, layer_masks, masked
from attribution.models import SiteModel
from attribution.neat import CleanPass, log_p_targets, text_batches

Neuron = tuple[int, int]  # (layer, neuron)


@dataclass(frozen=True)
class ConceptProbe:
    """One concept as the validation needs it: its clean pass and target tokens."""

    name: str
    clean: CleanPass
    target_ids: tuple[int, ...]
    prompts: tuple = ()  # attribution.prompts.Prompt: the concept's cloze prompts with gold tokens


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
    # The same ablation on real text: mean log p(gold | prompt) over the concept's prompts, ablated -
    # clean, for the top-k and for the random draws (None when the probe has no prompts).
    prompt_change: float | None = None
    prompt_random_mean: float | None = None


@torch.no_grad()
def ablation_change(model: SiteModel, probe: ConceptProbe, neurons: list[Neuron], ablate_to: Tensor,
                    ranges: tuple[Tensor, Tensor] | None = None) -> float:
    """log p(T | neurons ablated together) - log p(T), one full forward of the concept vector."""
    with masked(model, *layer_masks(neurons, ablate_to, ranges)):
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


@torch.no_grad()
def prompts_log_p(model: SiteModel, prompts, masks: list[NeuronMask] = ()) -> float:
    """Mean over prompts of log p(gold | prompt) at the prompt's last real token, masks applied."""
    from attribution.prompts import prompt_batch

    batch = prompt_batch(model, list(prompts))
    with masked(model, *masks):
        logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    last = logits[torch.arange(len(prompts), device=logits.device), batch.last]  # [prompts, vocab]
    values = [log_p_targets(last[i:i + 1], torch.tensor(p.target_ids, device=last.device))[0]
              for i, p in enumerate(prompts)]
    return float(torch.stack(values).mean())


def validate_ranking(model: SiteModel, probe: ConceptProbe, top: list[Neuron], ks: list[int], *,
                     others: list[ConceptProbe], ablate_to: Tensor, layers: list[int], draws: int = 20,
                     ranges: tuple[Tensor, Tensor] | None = None,
                     seed: int = 0, neutral_texts: list[str] = ()) -> list[ValidationResult]:
    """For each k: the top-k ablation against `draws` random k-neuron ablations from `layers`."""
    generator = torch.Generator().manual_seed(seed)
    clean_loss = neutral_loss(model, list(neutral_texts)) if neutral_texts else 0.0
    clean_prompts = prompts_log_p(model, probe.prompts) if probe.prompts else 0.0

    def prompt_change(neurons: list[Neuron]) -> float | None:
        if not probe.prompts:
            return None
        return prompts_log_p(model, probe.prompts, layer_masks(neurons, ablate_to, ranges)) - clean_prompts

    population = len(layers) * model.d_mlp
    results = []
    for k in ks:
        chosen = top[:k]
        top_change = ablation_change(model, probe, chosen, ablate_to, ranges)
        random_changes, random_prompt_changes = [], []
        for _ in range(draws):
            picks = torch.randperm(population, generator=generator)[:k].tolist()
            neurons = [(layers[p // model.d_mlp], p % model.d_mlp) for p in picks]
            random_changes.append(ablation_change(model, probe, neurons, ablate_to, ranges))
            random_prompt_changes.append(prompt_change(neurons))
        changes = torch.tensor(random_changes, dtype=torch.float64)
        mean, std = float(changes.mean()), float(changes.std()) if draws > 1 else 0.0
        as_far = int((changes.abs() >= abs(top_change)).sum())
        loss = neutral_loss(model, list(neutral_texts), layer_masks(chosen, ablate_to, ranges)) if neutral_texts else 0.0
        results.append(ValidationResult(
            concept=probe.name, k=len(chosen), top_change=top_change, random_mean=mean, random_std=std,
            z_score=(top_change - mean) / std if std > 0 else float("inf"),
            p_value=(as_far + 1) / (draws + 1), draws=draws,
            other_changes={o.name: ablation_change(model, o, chosen, ablate_to, ranges) for o in others},
            neutral_loss_change=loss - clean_loss,
            prompt_change=prompt_change(chosen),
            prompt_random_mean=(float(torch.tensor(random_prompt_changes, dtype=torch.float64).mean())
                                if probe.prompts else None),
        ))
    return results

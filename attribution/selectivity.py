"""Selectivity probing (seed 004, the NeuroLens tool): does a neuron fire for the concept's examples
and not for its negatives, and does it do so consistently?

Per text, a neuron's activation is its mean over the text's real tokens. Over positives P
(examples) and negatives N (negatives):
    selectivity = (mean_P - mean_N) / sqrt((var_P + var_N) / 2)        (a pooled-std effect size)
    consistency = share of positives beyond the negatives' mean + one std, on the selective side
Importance (the tool's ablation effect) is NEAT's effect, scored by `neat` in the same run.
"""
from __future__ import annotations

import torch

from attribution.activations import text_activations
from attribution.concepts import Concept
from attribution.models import SiteModel
from attribution.neuron_scores import NeuronScores

EPS = 1e-6  # keeps a neuron that never varies from dividing by zero (its selectivity is then ~0)


def selectivity_scores(model: SiteModel, concept: Concept) -> NeuronScores:
    """selectivity, consistency, act_mean and act_std (over positives) of every neuron.

    effect = selectivity, score = |selectivity|, activation = mean over positives.
    """
    if not concept.negatives:
        raise ValueError(f"concept {concept.name!r} has no negatives: selectivity probing compares "
                         "the examples with negatives (add a 'negatives' list to the concept)")
    pos = text_activations(model, concept.examples, pooling="mean", concept=concept.name)  # [P, L, d]
    neg = text_activations(model, concept.negatives, pooling="mean", concept=concept.name)  # [N, L, d]
    return selectivity_from_activations(pos, neg)


def selectivity_from_activations(pos: torch.Tensor, neg: torch.Tensor) -> NeuronScores:
    """The statistics from per-text activations: pos [P, n_layers, d_mlp], neg [N, n_layers, d_mlp]."""
    mean_pos, mean_neg = pos.mean(dim=0), neg.mean(dim=0)
    var_pos, var_neg = pos.var(dim=0, unbiased=False), neg.var(dim=0, unbiased=False)
    selectivity = (mean_pos - mean_neg) / (torch.sqrt((var_pos + var_neg) / 2) + EPS)
    std_neg = var_neg.sqrt()
    above = (pos > mean_neg + std_neg).float().mean(dim=0)
    below = (pos < mean_neg - std_neg).float().mean(dim=0)
    consistency = torch.where(selectivity >= 0, above, below)
    return NeuronScores(effect=selectivity, activation=mean_pos, score=selectivity.abs(), extra={
        "selectivity": selectivity, "consistency": consistency, "act_mean": mean_pos, "act_std": var_pos.sqrt(),
    })

"""Selectivity probing (seed 004, the NeuroLens tool): does a neuron fire for a concept's examples and
not for its negatives (selectivity = (mean_pos - mean_neg) / pooled std), and on most examples
(consistency = share of positives past the negatives' mean + one std, on the selective side)?
The tool's third number, importance (the ablation effect), is NEAT's effect: `neat` in the same run.
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
    A text's activation is the neuron's mean over the text's real tokens (special tokens such as BOS,
    [CLS], [SEP] excluded), for causal LMs and encoders alike: it uses every token's evidence and, unlike
    the max, does not grow with the text's length. (The NeuroLens tool's code, dakshjain-1616/
    Neuron-Activation-Mapper, was not available to us; its write-up only says "activation difference".)
    """
    if not concept.negatives:
        raise ValueError(f"concept {concept.name!r} has no negatives: selectivity probing compares "
                         "the examples with negatives (add a 'negatives' list to the concept)")
    pos = text_activations(model, concept.examples, pooling="mean", concept=concept.name)  # [P, L, d]
    neg = text_activations(model, concept.negatives, pooling="mean", concept=concept.name)  # [N, L, d]
    return selectivity_from_activations(pos, neg)


def selectivity_from_activations(pos: torch.Tensor, neg: torch.Tensor) -> NeuronScores:
    """The statistics from per-text activations: pos [P, n_layers, d_mlp], neg [N, n_layers, d_mlp].

    Variances are population variances; pooled std = sqrt((var_P + var_N) / 2) (Cohen's d with equal
    weights). Threshold for consistency: mean_N + std_N for a neuron with selectivity >= 0 (the share of
    positives above it), mean_N - std_N otherwise (the share below it): a neuron that is selective by
    firing less on the concept is as consistent as one that fires more.
    """
    pos, neg = pos.float(), neg.float()
    mean_pos, mean_neg = pos.mean(dim=0), neg.mean(dim=0)  # [n_layers, d_mlp]
    var_pos, var_neg = pos.var(dim=0, unbiased=False), neg.var(dim=0, unbiased=False)
    selectivity = (mean_pos - mean_neg) / (torch.sqrt((var_pos + var_neg) / 2) + EPS)
    std_neg = var_neg.sqrt()
    above = (pos > mean_neg + std_neg).float().mean(dim=0)  # [n_layers, d_mlp]: share of positives
    below = (pos < mean_neg - std_neg).float().mean(dim=0)
    consistency = torch.where(selectivity >= 0, above, below)
    return NeuronScores(effect=selectivity, activation=mean_pos, score=selectivity.abs(), extra={
        "selectivity": selectivity, "consistency": consistency, "act_mean": mean_pos, "act_std": var_pos.sqrt(),
    })

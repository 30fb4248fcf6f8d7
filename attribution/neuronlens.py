"""NeuronLens ranges (seed 003, arXiv 2502.06809): a neuron carries a concept within a range of its
activation, not as a whole.

Per concept and neuron j, over the concept's examples (activation at the last real token; for an
encoder, the mean over the real tokens):
mu_j and sigma_j; the candidates are the 30% of neurons with the largest mean |activation| (over the
whole model); the concept's range is [mu_j - tau sigma_j, mu_j + tau sigma_j] (tau = 2). Range
ablation (attribution/masking.py) replaces an activation only inside that range, so the other
concepts a polysemantic neuron carries at other magnitudes stay intact.
"""
from __future__ import annotations

import torch

from attribution.activations import text_activations
from attribution.concepts import Concept
from attribution.models import SiteModel
from attribution.neuron_scores import NeuronScores

CANDIDATE_SHARE = 0.3  # NeuronLens: the top 30% of neurons by mean |activation| are the candidates


def neuronlens_scores(model: SiteModel, concept: Concept, *, tau: float = 2.0,
                      candidate_share: float = CANDIDATE_SHARE) -> NeuronScores:
    """mu, sigma and the range of every neuron; ranked by mean |activation| (rank <= 30%: candidates).

    effect = mu (signed), score = |mu|, activation = mu; extra act_mean, act_std, range_low, range_high.
    sigma is the population standard deviation over the examples (0 for a single example).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    # Causal LMs: the last real token has seen the whole text. Encoders see the whole text at every
    # position: the mean over the real tokens, as MiniLM pools its sentence embeddings.
    pooling = "mean" if model.arch.encoder else "last"
    acts = text_activations(model, concept.examples, pooling=pooling, concept=concept.name)  # [texts, L, d]
    mu = acts.mean(dim=0)  # [n_layers, d_mlp]
    sigma = acts.std(dim=0, unbiased=False)
    return NeuronScores(effect=mu, activation=mu, score=mu.abs(), extra={
        "act_mean": mu, "act_std": sigma, "range_low": mu - tau * sigma, "range_high": mu + tau * sigma,
    })


def candidate_mask(scores: NeuronScores, share: float = CANDIDATE_SHARE) -> torch.Tensor:  # [n_layers, d_mlp] bool
    """The NeuronLens candidates: the `share` of all neurons with the highest mean |activation|."""
    flat = scores.ranking_score.flatten()
    count = max(1, round(share * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, count).indices] = True
    return mask.view_as(scores.ranking_score)

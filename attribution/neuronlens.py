"""NeuronLens ranges (seed 003, arXiv 2502.06809): a concept lives in a range of a neuron's activation,
[mu - tau sigma, mu + tau sigma] over the concept's examples, among the layer's top 30% neurons by
mean |activation|; range ablation replaces activations inside it only (attribution/masking.py).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from attribution.activations import text_activations
from attribution.concepts import Concept
from attribution.masking import NeuronMask, layer_masks
from attribution.models import SiteModel
from attribution.neuron_scores import NeuronScores

CANDIDATE_SHARE = 0.3  # NeuronLens: the top 30% of a layer's neurons by mean |activation| are the candidates
TAU = 2.0  # the range is mu +- tau sigma


def neuronlens_scores(model: SiteModel, concept: Concept, *, tau: float = TAU,
                      candidate_share: float = CANDIDATE_SHARE) -> NeuronScores:
    """mu, sigma and the concept range of every neuron; the layer's candidates ranked first.

    As the paper's code does (MuhammadUmairHaider/NeuronLens, utils.py): a text's activation is read
    at its last real token (`output[:, -1, :]`); mu and sigma are np.mean / np.std (population) over
    the examples; `compute_masks` takes, in the one layer it masks, the int(30% of d_mlp) neurons with
    the largest mean |activation| (the mean of absolute values, not |mu|): candidates are per layer.
    Encoders have no last token that summarises the text, and all-MiniLM-L6-v2 pools by mean, not
    [CLS]: there a text's activation is the mean over its real tokens, special tokens excluded.

    effect = activation = mu (signed); score = mean |activation| for candidates, 0 for the others, so
    the atlas ranks every candidate above every non-candidate (among candidates, by the paper's own
    criterion). extra: act_mean = mu, act_std = sigma, range_low/high = mu -+ tau sigma (every neuron).
    """
    _check_options(tau, candidate_share)
    # Causal LM: the last real token has seen the whole text. Encoder: every position has; average them.
    pooling = "mean" if model.arch.encoder else "last"
    acts = text_activations(model, concept.examples, pooling=pooling, concept=concept.name)  # [texts, L, d_mlp]
    return neuronlens_from_activations(acts, tau=tau, candidate_share=candidate_share)


def neuronlens_from_activations(acts: Tensor, *, tau: float = TAU,
                                candidate_share: float = CANDIDATE_SHARE) -> NeuronScores:
    """The statistics from per-text activations acts [texts, n_layers, d_mlp]."""
    _check_options(tau, candidate_share)
    acts = acts.float()
    mu = acts.mean(dim=0)  # [n_layers, d_mlp]
    sigma = acts.std(dim=0, unbiased=False)  # population std, as np.std; 0 for a single text
    # tau = inf is the paper's "max mask" (the whole neuron): an infinite range even where sigma = 0.
    spread = tau * sigma if math.isfinite(tau) else torch.full_like(sigma, math.inf)
    mean_abs = acts.abs().mean(dim=0)  # [n_layers, d_mlp]
    candidates = candidate_mask(mean_abs, candidate_share)
    score = torch.where(candidates, mean_abs, torch.zeros_like(mean_abs))
    return NeuronScores(effect=mu, activation=mu, score=score, extra={
        "act_mean": mu, "act_std": sigma, "range_low": mu - spread, "range_high": mu + spread,
    })


def candidate_mask(mean_abs: Tensor, share: float = CANDIDATE_SHARE) -> Tensor:  # [n_layers, d_mlp] bool
    """Per layer, the int(share * d_mlp) neurons with the largest mean |activation| (ties: lowest index)."""
    if not 0 < share <= 1:
        raise ValueError(f"candidate share must be in (0, 1], got {share}")
    count = int(share * mean_abs.shape[-1])
    order = torch.sort(mean_abs, dim=-1, descending=True, stable=True).indices[..., :count]  # [n_layers, count]
    mask = torch.zeros_like(mean_abs, dtype=torch.bool)
    return mask.scatter_(-1, order, True)


def range_masks(scores: NeuronScores, ablate_to: Tensor,
                neurons: Iterable[tuple[int, int]] | None = None) -> list[NeuronMask]:
    """Range-ablation masks, one per layer: inside [range_low, range_high] a neuron's activation becomes
    `ablate_to` [n_layers, d_mlp] (the neutral-text mean, attribution.ablation.reference_means);
    outside it is left alone. `neurons`: (layer, neuron) pairs; None = every candidate (score > 0)."""
    if neurons is None:
        neurons = (scores.ranking_score > 0).nonzero().tolist()
    return layer_masks(neurons, ablate_to, (scores.extra["range_low"], scores.extra["range_high"]))


def _check_options(tau: float, candidate_share: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0 < candidate_share <= 1:
        raise ValueError(f"candidate_share must be in (0, 1], got {candidate_share}")

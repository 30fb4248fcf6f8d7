"""Selectivity probing, against plain numpy statistics over plain per-text activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.concepts import Concept
from attribution.selectivity import EPS, selectivity_from_activations, selectivity_scores
from tiny_models import plain_neurons

CONCEPT = Concept(
    name="royalty",
    examples=("The king wore a golden crown.", "The queen sat on her throne.", "A prince rode to the palace.",
              "The royal court gathered in the great hall at dawn.", "Crowned at last, she ruled."),
    targets=("king", "queen"),
    negatives=("The plumber fixed the sink.", "Rain fell on the field all night long.", "She bought bread.",
               "The bus was late again."),
)


def plain_selectivity(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    """pos [P, L, d], neg [N, L, d] -> the statistics, written out neuron-wise in numpy."""
    pooled = np.sqrt((pos.var(axis=0) + neg.var(axis=0)) / 2)
    selectivity = (pos.mean(axis=0) - neg.mean(axis=0)) / (pooled + EPS)
    up, down = neg.mean(axis=0) + neg.std(axis=0), neg.mean(axis=0) - neg.std(axis=0)
    consistency = np.where(selectivity >= 0, (pos > up).mean(axis=0), (pos < down).mean(axis=0))
    return {"selectivity": selectivity, "consistency": consistency, "act_mean": pos.mean(axis=0),
            "act_std": pos.std(axis=0)}


def per_text_means(model, texts) -> np.ndarray:  # [texts, L, d]: mean over each text's real tokens
    acts, real = plain_neurons(model, list(texts))  # [texts, L, pos, d], [texts, pos]
    weights = real / real.sum(axis=1, keepdims=True)
    return np.einsum("tlpd,tp->tld", acts, weights)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_selectivity_and_consistency_equal_a_plain_computation(tiny_models, family):
    model = tiny_models[family]
    scores = selectivity_scores(model, CONCEPT)
    plain = plain_selectivity(per_text_means(model, CONCEPT.examples), per_text_means(model, CONCEPT.negatives))
    for name in ("selectivity", "act_mean", "act_std"):
        assert np.allclose(scores.extra[name].numpy(), plain[name], atol=1e-4, rtol=1e-4), name
    # consistency counts texts past a threshold: allow a rare flip where a text sits on it within rounding
    assert np.mean(np.abs(scores.extra["consistency"].numpy() - plain["consistency"]) > 1e-6) < 1e-3
    assert torch.equal(scores.effect, scores.extra["selectivity"])
    assert torch.equal(scores.ranking_score, scores.effect.abs())
    assert torch.equal(scores.activation, scores.extra["act_mean"])
    assert bool(torch.isfinite(scores.effect).all())


def test_selectivity_on_hand_made_activations():
    pos = torch.tensor([[[2.0, -1.0, 3.0, 0.5]], [[3.0, -2.0, 3.0, 0.35]], [[2.5, -1.5, 3.0, 0.9]]])  # [P 3, L 1, d 4]
    neg = torch.tensor([[[0.0, 0.0, 3.0, 0.2]], [[1.0, 1.0, 3.0, 0.4]]])  # [N 2, L 1, d 4]
    scores = selectivity_from_activations(pos, neg)
    plain = plain_selectivity(pos.double().numpy(), neg.double().numpy())
    for name, value in plain.items():
        assert np.allclose(scores.extra[name].numpy(), value, atol=1e-5), name
    selectivity, consistency = scores.extra["selectivity"][0], scores.extra["consistency"][0]
    assert selectivity[0] > 2 and consistency[0] == 1.0  # fires more on every positive
    assert selectivity[1] < -2 and consistency[1] == 1.0  # fires less on every positive: below mean_N - std_N
    assert selectivity[2] == 0.0 and consistency[2] == 0.0  # constant: no division by zero
    assert consistency[3] == pytest.approx(2 / 3)  # 0.5 and 0.9 are past mean_N + std_N = 0.4, 0.35 is not


def test_a_concept_without_negatives_is_refused_with_its_name(tiny_models):
    with pytest.raises(ValueError, match="concept 'lonely' has no negatives"):
        selectivity_scores(tiny_models["gpt2"], Concept(name="lonely", examples=("A king.",), targets=("king",)))

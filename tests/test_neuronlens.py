"""NeuronLens ranges and range ablation, against plain numpy statistics and plain hooks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attribution.ablation import read_reference_texts, reference_means
from attribution.concepts import Concept
from attribution.masking import NeuronMask, masked
from attribution.neuronlens import candidate_mask, neuronlens_from_activations, neuronlens_scores, range_masks
from tiny_models import plain_neurons

CONCEPT = Concept(
    name="royalty",
    examples=("The king wore a golden crown.", "The queen sat on her throne.", "A prince rode to the palace.",
              "The royal court gathered in the great hall at dawn.", "Crowned at last, she ruled."),
    targets=("king", "queen"),
)
TEXT = "The old king smiled at the queen."


def _plain_neuronlens(model, tau: float, share: float) -> dict[str, np.ndarray]:
    """The paper's utils.py in numpy: last-token activations, np.mean/np.std, per-layer top share by mean |a|."""
    acts, real = plain_neurons(model, list(CONCEPT.examples))  # [texts, L, pos, d], [texts, pos]
    last = np.array([np.flatnonzero(r)[-1] for r in real])  # last real token of each text
    fc = acts[np.arange(len(last)), :, last]  # [texts, L, d]
    mu, sigma, mean_abs = fc.mean(axis=0), fc.std(axis=0), np.abs(fc).mean(axis=0)
    count = int(share * mu.shape[1])
    candidates = np.zeros_like(mu, dtype=bool)
    for layer in range(mu.shape[0]):
        candidates[layer, np.argsort(-mean_abs[layer], kind="stable")[:count]] = True
    return {"act_mean": mu, "act_std": sigma, "range_low": mu - tau * sigma, "range_high": mu + tau * sigma,
            "score": np.where(candidates, mean_abs, 0.0), "candidates": candidates}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_neuronlens_statistics_equal_the_papers_computation(tiny_models, family):
    model = tiny_models[family]
    scores = neuronlens_scores(model, CONCEPT, tau=1.5, candidate_share=0.3)
    plain = _plain_neuronlens(model, tau=1.5, share=0.3)
    for name in ("act_mean", "act_std", "range_low", "range_high"):
        assert np.allclose(scores.extra[name].numpy(), plain[name], atol=1e-5), name
    assert torch.equal(scores.effect, scores.extra["act_mean"]) and torch.equal(scores.activation, scores.effect)
    assert np.allclose(scores.ranking_score.numpy(), plain["score"], atol=1e-5)
    # every layer has int(30%) candidates, and every candidate outranks every other neuron of the model
    candidates = scores.ranking_score > 0
    assert candidates.sum(dim=1).tolist() == [int(0.3 * model.d_mlp)] * model.n_layers
    assert float(scores.ranking_score[candidates].min()) > float(scores.ranking_score[~candidates].max())


def test_candidates_are_the_top_share_of_each_layer_by_mean_absolute_activation():
    acts = torch.tensor([[[4.0, -3.0, 0.5, 0.0, 1.0], [0.1, 0.2, -0.3, 0.0, 0.05]],
                         [[-4.0, -3.0, 0.5, 0.0, 1.0], [0.1, 0.2, 0.3, 0.0, 0.05]]])  # [texts 2, L 2, d 5]
    scores = neuronlens_from_activations(acts, tau=2.0, candidate_share=0.4)
    # neuron 0 of layer 0 has mu = 0 but mean |a| = 4: the paper ranks by mean |a|, not |mu|
    assert torch.allclose(scores.ranking_score, torch.tensor([[4.0, 3.0, 0, 0, 0], [0, 0.2, 0.3, 0, 0]]))
    assert candidate_mask(torch.tensor([[1.0, 1.0, 1.0]]), 0.5).tolist() == [[True, False, False]]  # ties: first
    assert scores.extra["range_low"][0, 0] == pytest.approx(-8.0) and scores.extra["range_high"][0, 0] == pytest.approx(8.0)
    whole = neuronlens_from_activations(acts, tau=math.inf)  # the paper's "max mask": the whole neuron
    assert bool((whole.extra["range_low"] == -math.inf).all() and (whole.extra["range_high"] == math.inf).all())
    for bad in ({"tau": 0.0}, {"candidate_share": 0.0}, {"candidate_share": 1.5}):
        with pytest.raises(ValueError, match="tau|share"):
            neuronlens_from_activations(acts, **bad)


def _logits(model, *masks: NeuronMask) -> torch.Tensor:
    ids = model.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with masked(model, *masks), torch.no_grad():
        return model.hf(input_ids=ids).logits


def test_range_mask_with_an_infinite_range_is_the_plain_mask_and_an_excluding_range_changes_nothing(tiny_models):
    model = tiny_models["llama"]
    neurons, values = (3, 17, 40), (0.5, -0.25, 0.0)
    clean, plain = _logits(model), _logits(model, NeuronMask(1, neurons, values))
    infinite = _logits(model, NeuronMask(1, neurons, values, low=(-math.inf,) * 3, high=(math.inf,) * 3))
    excluding = _logits(model, NeuronMask(1, neurons, values, low=(1e29,) * 3, high=(1e30,) * 3))
    assert not torch.equal(plain, clean)
    assert torch.equal(infinite, plain)
    assert torch.equal(excluding, clean)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_range_masks_replace_an_activation_only_inside_the_concept_range(tiny_models, family):
    """Token by token at the masked layer: neutral mean inside [low, high], the clean value outside."""
    model = tiny_models[family]
    scores = neuronlens_scores(model, CONCEPT)
    means = reference_means(model, read_reference_texts()[:6])  # [L, d]
    masks = range_masks(scores, means)
    assert sum(len(m.neurons) for m in masks) == int(0.3 * model.d_mlp) * model.n_layers  # the candidates
    layer = 1
    mask = next(m for m in masks if m.layer == layer)
    seen = {}

    def read(module, args):  # registered after masked()'s hook: sees the masked vector
        seen["acts"] = args[0].detach().clone()  # [1, pos, d_mlp]

    def run(*ms: NeuronMask) -> torch.Tensor:
        with masked(model, *ms):
            handle = model.site(layer).register_forward_pre_hook(read)
            try:
                _logits(model)
            finally:
                handle.remove()
        return seen["acts"][0].double()  # [pos, d_mlp]

    clean, ablated = run(), run(mask)
    idx = list(mask.neurons)
    low, high = torch.tensor(mask.low, dtype=torch.float64), torch.tensor(mask.high, dtype=torch.float64)
    inside = (clean[:, idx] >= low) & (clean[:, idx] <= high)  # [pos, n]
    expected = torch.where(inside, torch.tensor(mask.values, dtype=torch.float64), clean[:, idx])
    assert torch.allclose(ablated[:, idx], expected, atol=1e-6)
    others = [n for n in range(model.d_mlp) if n not in set(idx)]
    assert torch.equal(ablated[:, others], clean[:, others])
    assert 0 < int(inside.sum()) < inside.numel()  # both cases exercised


def test_neuron_mask_checks_its_fields():
    NeuronMask(0, (1, 2), (0.0, 0.0), low=(0.0, 0.0), high=(1.0, 1.0))
    with pytest.raises(ValueError, match="both low and high"):
        NeuronMask(0, (1, 2), (0.0, 0.0), low=(0.0, 0.0))
    with pytest.raises(ValueError, match="1 values for 2 neurons"):
        NeuronMask(0, (1, 2), (0.0,))
    with pytest.raises(ValueError, match="3 high for 2 neurons"):
        NeuronMask(0, (1, 2), (0.0, 0.0), low=(0.0, 0.0), high=(1.0, 1.0, 1.0))

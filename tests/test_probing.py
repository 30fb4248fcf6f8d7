"""NeuronLens ranges, selectivity probing and range ablation, against plain implementations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.concepts import Concept
from attribution.masking import NeuronMask, masked
from attribution.neuronlens import candidate_mask, neuronlens_scores
from attribution.selectivity import selectivity_scores

CONCEPT = Concept(
    name="royalty",
    examples=("The king wore a golden crown.", "The queen sat on her throne.", "A prince rode to the palace.",
              "The royal court gathered."),
    targets=("king", "queen"),
    negatives=("The plumber fixed the sink.", "Rain fell on the field.", "She bought bread and milk."),
)


def _plain_gelu_outputs(model, text: str) -> np.ndarray:
    """[n_layers, pos, d_mlp]: GPT-2's MLP activation output (the input of c_proj), read off `mlp.act`."""
    outs = []
    handles = [block.mlp.act.register_forward_hook(lambda m, a, o: outs.append(o[0].detach().double().numpy()))
               for block in model.hf.transformer.h]
    try:
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model.hf(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return np.stack(outs)


def test_neuronlens_statistics_equal_a_plain_computation(tiny_models):
    model = tiny_models["gpt2"]
    last = np.stack([_plain_gelu_outputs(model, t)[:, -1] for t in CONCEPT.examples])  # [texts, L, d]
    scores = neuronlens_scores(model, CONCEPT, tau=2.0)
    mu, sigma = last.mean(axis=0), last.std(axis=0)
    assert np.allclose(scores.extra["act_mean"].numpy(), mu, atol=1e-5)
    assert np.allclose(scores.extra["act_std"].numpy(), sigma, atol=1e-5)
    assert np.allclose(scores.extra["range_low"].numpy(), mu - 2 * sigma, atol=1e-5)
    assert np.allclose(scores.extra["range_high"].numpy(), mu + 2 * sigma, atol=1e-5)
    assert torch.equal(scores.ranking_score, scores.extra["act_mean"].abs())
    candidates = candidate_mask(scores)
    assert int(candidates.sum()) == round(0.3 * candidates.numel())
    assert float(scores.ranking_score[candidates].min()) >= float(scores.ranking_score[~candidates].max())


def test_selectivity_and_consistency_equal_a_plain_computation(tiny_models):
    model = tiny_models["gpt2"]
    pos = np.stack([_plain_gelu_outputs(model, t).mean(axis=1) for t in CONCEPT.examples])  # [P, L, d]
    neg = np.stack([_plain_gelu_outputs(model, t).mean(axis=1) for t in CONCEPT.negatives])
    scores = selectivity_scores(model, CONCEPT)
    pooled = np.sqrt((pos.var(axis=0) + neg.var(axis=0)) / 2)
    expected = (pos.mean(axis=0) - neg.mean(axis=0)) / (pooled + 1e-6)
    assert np.allclose(scores.extra["selectivity"].numpy(), expected, atol=1e-4, rtol=1e-4)
    layer, neuron = np.unravel_index(np.abs(expected).argmax(), expected.shape)
    bar = neg.mean(axis=0)[layer, neuron] + np.sign(expected[layer, neuron]) * neg.std(axis=0)[layer, neuron]
    side = pos[:, layer, neuron] > bar if expected[layer, neuron] >= 0 else pos[:, layer, neuron] < bar
    assert float(scores.extra["consistency"][layer, neuron]) == pytest.approx(side.mean())
    assert torch.equal(scores.effect, scores.extra["selectivity"])
    with pytest.raises(ValueError, match="has no negatives"):
        selectivity_scores(model, Concept(name="c", examples=("x y",), targets=("x",)))


def test_range_mask_replaces_only_inside_the_range(tiny_models):
    model = tiny_models["llama"]
    ids = model.tokenizer("The king wore a golden crown.", return_tensors="pt")["input_ids"]
    neurons, values = (3, 17, 40), (0.5, -0.25, 0.0)

    def logits(*masks):
        with masked(model, *masks), torch.no_grad():
            return model.hf(input_ids=ids).logits

    plain = logits(NeuronMask(1, neurons, values))
    everywhere = logits(NeuronMask(1, neurons, values, low=(-1e30,) * 3, high=(1e30,) * 3))
    nowhere = logits(NeuronMask(1, neurons, values, low=(1e29,) * 3, high=(1e30,) * 3))
    assert torch.equal(plain, everywhere)
    assert torch.equal(nowhere, logits())
    assert not torch.equal(plain, logits())

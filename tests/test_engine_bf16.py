"""bf16 difference propagation keeps NEAT's ranking: checked against the exact float32 engine."""
from __future__ import annotations

import pytest
import torch

from attribution.neat import clean_pass, concept_vector, neat_effects, neat_effects_bf16
from attribution.stats import spearman, top_overlap

EXAMPLES = ["The king wore a golden crown.", "The queen sat on her throne in the palace."]


def _setup(model, words=("king", "queen", "crown")):
    targets = tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)
    return targets, clean_pass(model, concept_vector(model, EXAMPLES), targets)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_effects_track_float32_on_tiny_models(tiny_models, family):
    model = tiny_models[family]
    targets, clean = _setup(model)
    for layer in range(model.n_layers):
        zeros = torch.zeros(model.d_mlp)
        exact = neat_effects(model, clean, targets, layer, range(model.d_mlp), zeros)
        fast = neat_effects_bf16(model, clean, targets, layer, range(model.d_mlp), zeros, batch_rows=40)
        assert float((fast - exact).abs().max()) <= 0.02 * float(exact.abs().max()) + 1e-6
        assert set(exact.abs().topk(5).indices.tolist()) == set(fast.abs().topk(5).indices.tolist())


def test_bf16_keeps_the_smollm2_ranking(smollm2):
    targets, clean = _setup(smollm2, ("king", "queen", "crown", "throne"))
    zeros = torch.zeros(smollm2.d_mlp)
    exact = torch.cat([neat_effects(smollm2, clean, targets, layer, range(1536), zeros) for layer in (0, 29)])
    fast = torch.cat([neat_effects_bf16(smollm2, clean, targets, layer, range(1536), zeros) for layer in (0, 29)])
    assert spearman(exact.abs(), fast.abs()) >= 0.999
    for k, need in ((20, 19), (100, 99)):  # neurons whose scores tie within 0.1% may swap at the edge
        assert top_overlap(exact.abs(), fast.abs(), k) >= need / k, k

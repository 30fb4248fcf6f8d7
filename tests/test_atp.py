"""Attribution patching: its gradients are the true derivatives, and its ranking tracks exact NEAT."""
from __future__ import annotations

from pathlib import Path

import torch

from attribution.atp import atp_effects, log_p_gradients
from attribution.concepts import load_concept_file, resolve_targets
from attribution.masking import NeuronMask, masked
from attribution.neat import clean_pass, concept_vector, log_p_targets, neat_effects
from attribution.stats import spearman, top_overlap

BUILTIN_CONCEPTS = Path(__file__).parent.parent / "configs" / "concepts" / "builtin.yaml"
EXAMPLES = ["The king wore a golden crown.", "The queen sat on her throne in the palace."]


def _setup(model, words=("king", "queen", "crown")):
    targets = tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)
    return targets, clean_pass(model, concept_vector(model, EXAMPLES), targets)


def test_gradients_equal_central_finite_differences(tiny_sources, tiny_models):
    """Every layer's gradient against a central difference of a float64 copy of the model (naive_neat's
    hooks, no package code): relative tolerance, on neurons whose gradient is far from zero."""
    import naive_neat

    model = tiny_models["gpt2"]
    targets, clean = _setup(model)
    grads = log_p_gradients(model, clean, targets)  # [n_layers, d_mlp]
    hf64, _ = naive_neat.load(tiny_sources["gpt2"].path, torch.float64)
    vector = clean.vector.double()
    eps = 1e-4  # float64: truncation error O(eps^2) ~1e-8, rounding ~1e-16 / eps

    def shifted_log_p(layer: int, neuron: int, by: float) -> float:
        def shift(module, args):
            acts = args[0].clone()
            acts[..., neuron] += by
            return (acts,)
        return naive_neat.log_p(hf64, vector, targets, shift, layer)

    for layer in range(model.n_layers):
        neurons = range(0, model.d_mlp, 4)  # 32 per layer
        numeric = torch.tensor([(shifted_log_p(layer, n, eps) - shifted_log_p(layer, n, -eps)) / (2 * eps)
                                for n in neurons], dtype=torch.float64)
        got = grads[layer, list(neurons)].double()
        # the tiny GPT-2's gradients are 1e-4..1e-2 nats per unit: far above float32's ~1e-7 relative error
        assert float(numeric.abs().max()) > 2e-3, "the gradients compared must be far from zero"
        assert float(torch.nn.functional.cosine_similarity(got, numeric, dim=0)) > 0.9999, layer
        strong = numeric.abs() > 5e-4
        assert int(strong.sum()) >= 8, layer
        rel = ((got - numeric).abs() / numeric.abs())[strong]
        assert float(rel.max()) < 1e-3, (layer, float(rel.max()))


def test_atp_effect_is_the_first_order_term(tiny_models):
    model = tiny_models["llama"]
    targets, clean = _setup(model)
    grads = log_p_gradients(model, clean, targets)
    zeros = torch.zeros(model.d_mlp)
    estimate = atp_effects(grads, clean, 2, range(10, 20), zeros)
    assert torch.allclose(estimate, -clean.acts[2, 10:20] * grads[2, 10:20])


def test_atp_ranking_tracks_exact_neat_on_smollm2(smollm2):
    # The built-in royalty concept: its effects (up to 0.13 nats in layer 15) stand far above float32
    # noise (~1e-5). A two-sentence concept moved log p by at most 5e-4 there, and its Spearman went
    # from 0.98 to 0.91 between two machines of different CPU: ranking noise, not AtP.
    concept = next(c for c in load_concept_file(BUILTIN_CONCEPTS) if c.name == "royalty")
    targets = resolve_targets(smollm2.tokenizer, concept).ids
    clean = clean_pass(smollm2, concept_vector(smollm2, concept.examples), targets)
    grads = log_p_gradients(smollm2, clean, targets)
    zeros = torch.zeros(smollm2.d_mlp)
    exact = neat_effects(smollm2, clean, targets, 15, range(1536), zeros).abs()
    estimate = atp_effects(grads, clean, 15, range(1536), zeros).abs()
    assert spearman(exact, estimate) > 0.99  # measured 0.9998
    assert top_overlap(exact, estimate, 50) >= 0.9  # measured 1.0

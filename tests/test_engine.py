"""The fast exact NEAT engine equals the naive one-forward-per-neuron hook loop on every layer."""
from __future__ import annotations

import pytest
import torch

from attribution.ablation import read_reference_texts, reference_means
from attribution.masking import NeuronMask, masked
from attribution.neat import clean_pass, concept_vector, log_p_targets, neat_effects, neat_effects_naive

EXAMPLES = ["The king wore a golden crown.", "The queen sat on her throne in the palace."]
ATOL, RTOL = 1e-5, 1e-4


def _targets(model, words=("king", "queen", "crown")) -> tuple[int, ...]:
    return tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)


def _assert_close(fast: torch.Tensor, naive: torch.Tensor) -> None:
    assert fast.shape == naive.shape
    bad = (fast - naive).abs() > ATOL + RTOL * naive.abs()
    assert not bool(bad.any()), f"{int(bad.sum())} neurons differ; max |diff| {float((fast - naive).abs().max()):.3g}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_fast_engine_equals_naive_loop_on_every_layer(tiny_models, family, ablation):
    model = tiny_models[family]
    targets = _targets(model)
    clean = clean_pass(model, concept_vector(model, EXAMPLES), targets)
    means = reference_means(model, read_reference_texts()[:8])
    for layer in range(model.n_layers):  # first and last included
        ablate_to = torch.zeros(model.d_mlp) if ablation == "zero" else means[layer]
        # batch_rows=17 forces several batches with a partial last one
        fast = neat_effects(model, clean, targets, layer, range(model.d_mlp), ablate_to, batch_rows=17)
        naive = neat_effects_naive(model, clean, targets, layer, range(model.d_mlp), ablate_to)
        assert float(naive.abs().max()) > 1e-4, "the tiny model must move log p measurably"
        _assert_close(fast, naive)


def test_fast_engine_equals_naive_loop_on_smollm2_sample(smollm2):
    targets = _targets(smollm2, ("king", "queen", "crown", "throne"))
    clean = clean_pass(smollm2, concept_vector(smollm2, EXAMPLES), targets)
    generator = torch.Generator().manual_seed(0)
    for layer in (0, 1, 14, 28, 29):
        start = int(torch.randint(0, smollm2.d_mlp - 8, (1,), generator=generator))
        neurons = range(start, start + 8)
        zeros = torch.zeros(smollm2.d_mlp)
        fast = neat_effects(smollm2, clean, targets, layer, neurons, zeros)
        naive = neat_effects_naive(smollm2, clean, targets, layer, neurons, zeros)
        _assert_close(fast, naive)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_fast_engine_equals_naive_loop_for_the_other_llama_family_members(tmp_path, family):
    from attribution.models import load_model
    from tiny_models import save_tiny_model

    model = load_model(save_tiny_model(family, tmp_path / family, seed=3), device="cpu")
    if family == "qwen2":
        assert model.blocks[0].self_attn.v_proj.bias is not None
    targets = _targets(model)
    clean = clean_pass(model, concept_vector(model, EXAMPLES), targets)
    for layer in (0, model.n_layers - 1):
        zeros = torch.zeros(model.d_mlp)
        _assert_close(neat_effects(model, clean, targets, layer, range(model.d_mlp), zeros, batch_rows=33),
                      neat_effects_naive(model, clean, targets, layer, range(model.d_mlp), zeros))


def test_batch_composition_does_not_change_effects(tiny_models):
    model = tiny_models["llama"]
    targets = _targets(model)
    clean = clean_pass(model, concept_vector(model, EXAMPLES), targets)
    zeros = torch.zeros(model.d_mlp)
    whole = neat_effects(model, clean, targets, 1, range(model.d_mlp), zeros, batch_rows=512)
    split = torch.cat([neat_effects(model, clean, targets, 1, range(a, min(a + 10, model.d_mlp)), zeros, batch_rows=5)
                       for a in range(0, model.d_mlp, 10)])
    _assert_close(split, whole)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hook_mask_equals_zeroing_the_weight_column(tiny_models, family):
    model = tiny_models[family]
    embeds = torch.randn(1, 3, model.d_model, generator=torch.Generator().manual_seed(1))
    layer, neurons = 2, (3, 17, 40)
    with masked(model, NeuronMask(layer, neurons, (0.0,) * len(neurons))):
        hooked = model.hf(inputs_embeds=embeds).logits
    w_out = model.w_out(layer)  # a view of the real weight: edit in place, then restore
    saved = w_out[:, list(neurons)].clone()
    try:
        with torch.no_grad():
            w_out[:, list(neurons)] = 0.0
        edited = model.hf(inputs_embeds=embeds).logits
    finally:
        with torch.no_grad():
            w_out[:, list(neurons)] = saved
    assert torch.allclose(hooked, edited, atol=1e-5)
    assert not torch.allclose(hooked, model.hf(inputs_embeds=embeds).logits, atol=1e-5)


def test_no_hooks_remain_after_an_exception(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(RuntimeError, match="boom"):
        with masked(model, NeuronMask(0, (1,), (0.0,))):
            raise RuntimeError("boom")
    for block in model.blocks:
        assert not model.arch.site(block)._forward_pre_hooks


def test_clean_pass_log_p_is_the_float32_log_softmax_mean(tiny_models):
    model = tiny_models["gpt2"]
    targets = _targets(model)
    vector = concept_vector(model, EXAMPLES)
    clean = clean_pass(model, vector, targets)
    logits = model.hf(inputs_embeds=vector.view(1, 1, -1)).logits[0, -1].float()
    expected = torch.log_softmax(logits, dim=-1)[list(targets)].mean()
    assert abs(clean.log_p - float(expected)) < 1e-5
    assert float(log_p_targets(logits[None], torch.tensor(targets))[0]) == pytest.approx(float(expected), abs=1e-5)


def test_concept_vector_is_the_mean_of_per_example_mean_last_hidden_states(tiny_models):
    model = tiny_models["llama"]
    per_example = []
    for text in EXAMPLES:
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        per_example.append(model.hf(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0))
    expected = torch.stack(per_example).mean(0)  # examples of different lengths weigh the same
    assert torch.allclose(concept_vector(model, EXAMPLES), expected, atol=1e-6)

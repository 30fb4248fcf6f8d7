"""Integrated gradients: the cached, batched engine equals a plain float64 loop over layers and steps, its
attributions are complete (they sum to the layer's p(y|x) change), and no hooks outlive an exception."""
from __future__ import annotations

import copy

import pytest
import torch

from attribution.integrated_gradients import ig_alphas, ig_scores
from attribution.models import SiteModel
from attribution.prompts import Prompt
from tiny_models import hook_counts

FAMILIES = ("llama", "gpt2")


def _prompts(model) -> list[Prompt]:
    def ids(*words):
        return tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)
    return [Prompt("After the long war, the people crowned a new", ids("king", "queen")),
            Prompt("The", ids("throne"))]


def _forward_prob(model, prompt: Prompt, layer: int | None = None, value=None) -> torch.Tensor:
    """p(y|x) of one plain forward of the unpadded prompt, `layer`'s last-token activations set to `value`."""
    ids = torch.tensor([model.tokenizer(prompt.text)["input_ids"]])
    handle = None
    if value is not None:
        def hook(module, args):
            acts = args[0].clone()
            acts[0, -1] = value
            return (acts,)
        handle = model.site(layer).register_forward_pre_hook(hook)
    try:
        logits = model.hf(input_ids=ids).logits[0, -1].double()
    finally:
        if handle is not None:
            handle.remove()
    return torch.softmax(logits, dim=-1)[list(prompt.target_ids)].mean()


def _clean_acts(model, prompt: Prompt) -> list[torch.Tensor]:
    acts = {}
    handles = [model.site(layer).register_forward_pre_hook(
        lambda module, args, layer=layer: acts.__setitem__(layer, args[0][0, -1].detach().clone()))
        for layer in range(model.n_layers)]
    try:
        _forward_prob(model, prompt)
    finally:
        for handle in handles:
            handle.remove()
    return [acts[layer] for layer in range(model.n_layers)]


def _plain_ig(model, prompts: list[Prompt], steps: int) -> torch.Tensor:
    """Dai et al.'s Eq. 3 literally: one forward + backward per (prompt, layer, k), alpha_k = k / m."""
    total = torch.zeros(model.n_layers, model.d_mlp, dtype=torch.float64)
    for prompt in prompts:
        clean = _clean_acts(model, prompt)
        for layer in range(model.n_layers):
            grads = []
            for k in range(1, steps + 1):
                scaled = (clean[layer] * (k / steps)).requires_grad_(True)
                with torch.enable_grad():
                    (grad,) = torch.autograd.grad(_forward_prob(model, prompt, layer, scaled), scaled)
                grads.append(grad)
            total[layer] += clean[layer] * torch.stack(grads).mean(dim=0)
    return total / len(prompts)


@pytest.fixture(scope="module")
def double_models(tiny_models):
    """float64 copies of the tiny models, where the references run (transformers keeps RMSNorm and rotary
    in float32 even there)."""
    return {family: SiteModel(m.source, copy.deepcopy(m.hf).double(), m.tokenizer, m.arch, m.device, torch.float64)
            for family, m in tiny_models.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_ig_equals_plain_loop(tiny_models, double_models, family):
    model, ref = tiny_models[family], double_models[family]
    prompts = _prompts(model)
    scores = ig_scores(model, prompts, steps=2, batch_rows=5)  # 2 layers (4 rows) per forward
    expected = _plain_ig(ref, prompts, steps=2)
    assert torch.allclose(scores.effect.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    activation = torch.stack([torch.stack(_clean_acts(ref, p)) for p in prompts]).mean(dim=0)
    assert torch.allclose(scores.activation.double(), activation, rtol=1e-4, atol=1e-6)
    assert torch.equal(scores.score, scores.effect.abs())


def test_ig_attributions_are_complete(tiny_models):
    """sum_i Attr_i over a layer = p(clean) - p(layer's last-token activations zeroed), up to the Riemann error."""
    model = tiny_models["llama"]
    prompt = _prompts(model)[0]
    scores = ig_scores(model, [prompt], steps=50)
    for layer in range(model.n_layers):
        change = float(_forward_prob(model, prompt) - _forward_prob(model, prompt, layer, 0.0))
        # The sum cancels terms of both signs: bound the error by the attributions' own size.
        assert abs(float(scores.effect[layer].sum()) - change) <= 1e-2 * float(scores.effect[layer].abs().sum()), layer


def test_ig_alphas_are_the_right_riemann_sum():
    assert torch.allclose(ig_alphas(4), torch.tensor([0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="steps"):
        ig_alphas(0)


def test_no_hooks_remain_after_an_exception(tiny_models):
    model = tiny_models["llama"]

    def boom(module, args, output):
        raise RuntimeError("boom")

    # transformers may keep hooks of its own (output recording): compare with what was there before.
    before = hook_counts(model)
    handle = model.blocks[-1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ig_scores(model, _prompts(model), steps=2)
    finally:
        handle.remove()
    assert hook_counts(model) == before



def test_ig_of_chosen_layers_equals_the_whole_model_run(tiny_models):
    model = tiny_models["llama"]
    prompts = _prompts(model)
    whole = ig_scores(model, prompts, steps=4)
    some = ig_scores(model, prompts, steps=4, layers=[1, 3])
    assert torch.allclose(some.effect[[1, 3]], whole.effect[[1, 3]], atol=1e-7, rtol=1e-5)
    assert torch.allclose(some.activation[[1, 3]], whole.activation[[1, 3]])
    assert not some.effect[[0, 2]].any()

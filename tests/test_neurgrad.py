"""NeurGrad equals float64 autograd and finite differences; NEG's cached, batched sweep equals the naive sweep;
prompts are cut before the first target word; no hooks outlive an exception."""
from __future__ import annotations

import copy

import pytest
import torch

from attribution.concepts import Concept, resolve_targets
from attribution.models import SiteModel
from attribution.neurgrad import last_token_gradients, neg_slopes, neurgrad_scores, sweep_shifts
from attribution.prompts import Prompt, concept_prompts
from tiny_models import hook_counts

FAMILIES = ("llama", "gpt2")
NEURONS = [(0, 3), (0, 50), (1, 17), (2, 64), (3, 0), (3, 90)]


def _ids(model, *words):
    return tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)


def _prompts(model) -> list[Prompt]:
    """Different lengths (right padding is exercised), a one-token prompt (no prefix), several golds."""
    return [
        Prompt("The old", _ids(model, "king")),
        Prompt("After the long war, the people crowned a new", _ids(model, "king", "queen")),
        Prompt("The", _ids(model, "throne")),
        Prompt("Her jewels were kept beside the", _ids(model, "crown", "throne", "palace")),
    ]


@pytest.fixture(scope="module")
def double_models(tiny_models):
    """float64 copies of the tiny models, where the references run (transformers keeps RMSNorm and rotary
    in float32 even there)."""
    return {family: SiteModel(m.source, copy.deepcopy(m.hf).double(), m.tokenizer, m.arch, m.device, torch.float64)
            for family, m in tiny_models.items()}


def _ref_prob(model, prompt: Prompt, layer: int | None = None, edit=None) -> torch.Tensor:
    """p(y|x) from one plain forward of the unpadded prompt; `edit` rewrites `layer`'s last-token activations."""
    ids = torch.tensor([model.tokenizer(prompt.text)["input_ids"]])
    handle = None
    if edit is not None:
        def hook(module, args):
            acts = args[0].clone()
            acts[0, -1] = edit(acts[0, -1])
            return (acts,)
        handle = model.site(layer).register_forward_pre_hook(hook)
    try:
        logits = model.hf(input_ids=ids).logits[0, -1].double()
    finally:
        if handle is not None:
            handle.remove()
    return torch.softmax(logits, dim=-1)[list(prompt.target_ids)].mean()


def _ref_acts_grads(model, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the site input becomes a leaf (only that layer's: the path through later blocks stays)."""
    acts, grads = [], []
    for layer in range(model.n_layers):
        leaf = {}

        def hook(module, args):
            leaf["x"] = args[0].detach().clone().requires_grad_(True)
            return (leaf["x"],)

        handle = model.site(layer).register_forward_pre_hook(hook)
        try:
            with torch.enable_grad():
                ids = torch.tensor([model.tokenizer(prompt.text)["input_ids"]])
                probs = torch.softmax(model.hf(input_ids=ids).logits[0, -1].double(), dim=-1)
                (grad,) = torch.autograd.grad(probs[list(prompt.target_ids)].mean(), leaf["x"])
        finally:
            handle.remove()
        acts.append(leaf["x"][0, -1].detach())
        grads.append(grad[0, -1])
    return torch.stack(acts), torch.stack(grads)  # [n_layers, d_mlp] each


@pytest.mark.parametrize("family", FAMILIES)
def test_neurgrad_equals_float64_autograd_reference(tiny_models, double_models, family):
    model, ref = tiny_models[family], double_models[family]
    prompts = _prompts(model)
    scores = neurgrad_scores(model, prompts, batch_size=3)  # batches of 3 and 1, right-padded
    pairs = [_ref_acts_grads(ref, p) for p in prompts]
    acts = torch.stack([a for a, _ in pairs])  # [prompts, n_layers, d_mlp]
    effect = torch.stack([g * torch.where(a > 0, 1.0, -1.0).double() for a, g in pairs]).mean(dim=0)
    # A float32 activation within rounding of the threshold may take the other sign: leave those out.
    clear = (acts.abs() > 1e-5).all(dim=0)
    assert clear.float().mean() > 0.95
    scale = float(effect.abs().max())
    assert torch.allclose(scores.effect.double()[clear], effect[clear], rtol=1e-4, atol=1e-5 * scale)
    assert torch.allclose(scores.activation.double(), acts.mean(dim=0), rtol=1e-4, atol=1e-5)
    assert torch.equal(scores.score, scores.effect.abs())


@pytest.mark.parametrize("family", FAMILIES)
def test_neurgrad_gradients_equal_central_finite_differences(tiny_models, double_models, family):
    model, ref = tiny_models[family], double_models[family]
    prompts = _prompts(model)[1:3]  # several golds; a one-token prompt
    acts, grads = last_token_gradients(model, prompts)  # [prompts, n_layers, d_mlp]
    eps = 1e-3  # transformers' RMSNorm and rotary run in float32 even in a float64 model: smaller eps is noise
    for i, prompt in enumerate(prompts):
        for layer, neuron in NEURONS:
            def shifted(by):
                def edit(a):
                    a = a.clone()
                    a[neuron] += by
                    return a
                return float(_ref_prob(ref, prompt, layer, edit))
            numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
            scale = float(grads[i].abs().max())
            assert abs(float(grads[i, layer, neuron]) - numeric) <= 1e-4 * scale, (prompt.text, layer, neuron)


def _naive_neg(ref, prompts, neurons, shifts) -> torch.Tensor:
    """One full forward per (neuron, shift, prompt), no cache, no batching; slope by lstsq through the origin."""
    slopes = []
    clean = [_ref_prob(ref, prompt) for prompt in prompts]
    for layer, neuron in neurons:
        dp = torch.zeros(len(shifts), dtype=torch.float64)
        for i, prompt in enumerate(prompts):
            for k, s in enumerate(shifts.tolist()):
                def edit(a):
                    a = a.clone()
                    a[neuron] += s * (1.0 if a[neuron] > 0 else -1.0)
                    return a
                dp[k] += _ref_prob(ref, prompt, layer, edit) - clean[i]
        dp /= len(prompts)
        slopes.append(torch.linalg.lstsq(shifts.double()[:, None], dp[:, None]).solution[0, 0])
    return torch.stack(slopes)


@pytest.mark.parametrize("family", FAMILIES)
def test_neg_slopes_equal_naive_sweep(tiny_models, double_models, family):
    model, ref = tiny_models[family], double_models[family]
    prompts = _prompts(model)[1:3]
    neurons = NEURONS[1:5]
    # 6 rows per forward: a prompt's 16 (neuron, shift) rows span several forwards, each several layers.
    fast = neg_slopes(model, prompts, neurons, points=4, max_shift=1.0, batch_rows=6)
    naive = _naive_neg(ref, prompts, neurons, sweep_shifts(4, 1.0))
    assert torch.allclose(fast.double(), naive, rtol=1e-3, atol=1e-4 * float(naive.abs().max()))


def test_neg_with_small_shifts_is_neurgrad(tiny_models):
    """NEG's slope over +-s tends to NeurGrad's signed derivative as s -> 0 (the paper's claim, exactly here)."""
    model = tiny_models["llama"]
    prompts = _prompts(model)
    scores = neurgrad_scores(model, prompts)
    slopes = neg_slopes(model, prompts, NEURONS, points=2, max_shift=1e-2)
    estimate = torch.stack([scores.effect[layer, neuron] for layer, neuron in NEURONS])
    assert torch.allclose(slopes, estimate, rtol=2e-2, atol=2e-2 * float(estimate.abs().max()))


def test_sweep_shifts_are_the_papers_grid():
    assert torch.allclose(sweep_shifts(40, 2.0)[20:], torch.arange(1, 21) * 0.1)
    assert torch.allclose(sweep_shifts(40, 2.0)[:20], -torch.arange(20, 0, -1) * 0.1)
    with pytest.raises(ValueError, match="even"):
        sweep_shifts(3, 1.0)


def test_neg_rejects_neurons_outside_the_model(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match=r"neuron \(4, 0\)"):
        neg_slopes(model, _prompts(model), [(4, 0)])


def test_no_hooks_remain_after_an_exception(tiny_models):
    model = tiny_models["gpt2"]

    def boom(module, args, output):
        raise RuntimeError("boom")

    # transformers may keep hooks of its own (output recording): compare with what was there before.
    before = hook_counts(model)
    handle = model.blocks[-1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            neurgrad_scores(model, _prompts(model))
        with pytest.raises(RuntimeError, match="boom"):
            neg_slopes(model, _prompts(model), NEURONS, points=2)
    finally:
        handle.remove()
    assert hook_counts(model) == before



ROYAL = ("king", "queen", "crown", "throne")


def test_concept_prompts_cut_before_the_first_target_word(tiny_models):
    tokenizer = tiny_models["llama"].tokenizer
    concept = Concept("royalty", targets=ROYAL, examples=(
        "The old King wore a golden crown.",  # case-insensitive: gold " king"
        "Her crown outshone the queen's throne.",  # the earliest target wins
        "Kingdoms rose and fell before the king returned.",  # word boundaries: "Kingdoms" is no match
        "King Arthur pulled the sword from the stone.",  # nothing before the target: skipped
        "A quiet afternoon by the river.",  # no target: skipped
        "The throne room was empty.",
    ))
    ids = dict(zip(ROYAL, resolve_targets(tokenizer, concept).ids))
    assert concept_prompts(tokenizer, concept) == [
        Prompt("The old", (ids["king"],)),
        Prompt("Her", (ids["crown"],)),
        Prompt("Kingdoms rose and fell before the", (ids["king"],)),
        Prompt("The", (ids["throne"],)),
    ]


def test_concept_prompts_fall_back_to_whole_examples(tiny_models):
    tokenizer = tiny_models["llama"].tokenizer
    examples = ("The old king slept.", "Long live the queen.", "A crown of thorns.", "Nothing royal here.")
    concept = Concept("royalty", targets=ROYAL, examples=examples)
    ids = resolve_targets(tokenizer, concept).ids
    assert concept_prompts(tokenizer, concept) == [Prompt(e, ids) for e in examples]  # 3 cloze prompts < 4
    assert len(concept_prompts(tokenizer, concept, min_prompts=3)) == 3

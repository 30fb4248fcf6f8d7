"""In-distribution effects on a concept's real prompts: the batched exact changes equal a plain
one-prompt-at-a-time loop written without the package, and the AtP estimate is the true derivative of
mean log p(gold) along the ablation (central differences of a float64 copy of the model)."""
from __future__ import annotations

import pytest
import torch

import naive_neat
from attribution.prompt_effects import prompt_atp, prompt_set_changes
from attribution.prompts import Prompt

PROMPTS_TEXT = [("The king wore a golden", ("crown",)), ("The queen sat on her", ("throne",)),
                ("Snow covered the quiet", ("hills", "town")), ("He opened the door and saw the", ("king",)),
                ("The queen sat on her", ("chair",))]  # a text twice, two golds: one forward row, two readings
SETS = [[], [(0, 3)], [(1, 7), (1, 40), (3, 2)], [(0, 5), (2, 11), (3, 60), (3, 61)]]


def _prompts(tokenizer) -> list[Prompt]:
    return [Prompt(text, tuple(naive_neat.target_ids(tokenizer, words))) for text, words in PROMPTS_TEXT]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("ablation", ["zero", "values"])
def test_batched_prompt_changes_equal_a_plain_loop(tiny_sources, tiny_models, arch, ablation):
    model = tiny_models[arch]
    hf, tokenizer = naive_neat.load(tiny_sources[arch].path)
    prompts = _prompts(tokenizer)
    generator = torch.Generator().manual_seed(1)
    values = (torch.zeros(model.n_layers, model.d_mlp) if ablation == "zero"
              else torch.randn(model.n_layers, model.d_mlp, generator=generator))
    rows = [(p, s) for s in SETS for p in prompts]
    got = prompt_set_changes(model, rows, values, batch_rows=5)  # chunks that mix prompts and sets
    expected = [naive_neat.prompt_log_p(hf, tokenizer, p, s, values) - naive_neat.prompt_log_p(hf, tokenizer, p, [], values)
                for p, s in rows]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 2e-5
    assert all(value == 0.0 for value in got[:len(prompts)])  # the empty set changes nothing
    assert max(abs(v) for v in expected) > 1e-3, "the changes compared must be far from zero"


def test_prompt_atp_is_the_derivative_along_the_ablation(tiny_sources, tiny_models):
    """AtP's effect of neuron i is d/dt mean log p(gold) with a_i <- a_i + t (v_i - a_i) at every
    position, at t = 0: checked against a central difference of the float64 model. GPT-2: Llama's
    RMSNorm computes in float32 whatever the model's dtype, which leaves float32 rounding in its
    differences (measured: the estimate of eps 1e-6 was off by 1e-3, of 1e-8 by 2.5e-2)."""
    model = tiny_models["gpt2"]
    hf64, tokenizer = naive_neat.load(tiny_sources["gpt2"].path, torch.float64)
    prompts = _prompts(tokenizer)
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(model.n_layers, model.d_mlp, generator=generator)
    estimate = prompt_atp(model, prompts, values)  # [n_layers, d_mlp]
    assert estimate.shape == (model.n_layers, model.d_mlp)
    eps = 1e-4

    def moved(layer: int, neuron: int, t: float) -> float:
        total = 0.0
        for prompt in prompts:
            enc = tokenizer(prompt.text, return_tensors="pt", return_special_tokens_mask=True)
            last = int((enc["special_tokens_mask"][0] == 0).nonzero().max())

            def shift(module, args):
                acts = args[0].clone()
                acts[..., neuron] += t * (float(values[layer, neuron]) - acts[..., neuron])
                return (acts,)

            handle = naive_neat.site(hf64, layer).register_forward_pre_hook(shift)
            try:
                with torch.no_grad():
                    logits = hf64(input_ids=enc["input_ids"]).logits[0, last]
            finally:
                handle.remove()
            total += float(torch.log_softmax(logits, -1)[list(prompt.target_ids)].mean())
        return total / len(prompts)

    neurons = [(layer, n) for layer in range(model.n_layers) for n in range(0, model.d_mlp, 16)]
    numeric = torch.tensor([(moved(l, n, eps) - moved(l, n, -eps)) / (2 * eps) for l, n in neurons],
                           dtype=torch.float64)
    got = torch.tensor([float(estimate[l, n]) for l, n in neurons], dtype=torch.float64)
    assert float(numeric.abs().max()) > 1e-3, "the derivatives compared must be far from zero"
    strong = numeric.abs() > 1e-4
    assert int(strong.sum()) >= 10
    assert float(((got - numeric).abs() / numeric.abs())[strong].max()) < 1e-3
    assert float((got - numeric).abs().max()) < 1e-5

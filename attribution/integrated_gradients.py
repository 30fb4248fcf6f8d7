"""Knowledge-neuron integrated gradients (Dai et al. 2022, arXiv 2104.08696), the baseline of docs/design.md, "Methods".

Attr_i = a_i / m * sum_{k=1..m} dp(y|x; layer's last-token activations = (k/m) a) / da_i (their Eq. 3),
with p the gold probability and a the clean activation vector of neuron i's layer at the last token.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.models import SiteModel
from attribution.neuron_scores import NeuronScores
from attribution.prompts import (Prompt, check_prompts, gold_probs, last_token_acts, last_token_logits,
                                 prefix_cache)


def ig_alphas(steps: int) -> Tensor:  # [steps]
    """alpha_k = k / m, k = 1..m: the right Riemann sum of Dai et al.'s Eq. 3 (alpha = 1 is the clean value)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.arange(1, steps + 1, dtype=torch.float32) / steps


def ig_scores(model: SiteModel, prompts: list[Prompt], *, steps: int = 20, batch_rows: int = 256,
              layers: list[int] | None = None) -> NeuronScores:
    """Integrated-gradient attribution of every neuron, averaged over prompts.

    For each layer, that layer's whole activation vector at the prompt's last real token is scaled
    to alpha_k * a (the other layers and positions keep their clean values), and the gradient of
    p(y|x) with respect to the scaled vector is averaged over the steps. Only the last position
    changes, so each prompt's prefix runs once into a KV cache and every (layer, step) pair is one
    row of single-token forwards, about `batch_rows` rows (whole layers) per forward + backward.
    effect = attribution, activation = mean clean activation at the last token, score = |effect|.
    Each layer is its own integral: `layers` (default all) computes only those, zeros elsewhere.
    """
    check_prompts(model, prompts)
    chosen = list(range(model.n_layers)) if layers is None else sorted(set(layers))
    alphas = ig_alphas(steps).to(model.device)
    effect = torch.zeros(model.n_layers, model.d_mlp)
    activation = torch.zeros(model.n_layers, model.d_mlp)
    layers_per_forward = max(1, batch_rows // steps)
    scaled: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (rows, [steps, d_mlp] scaled acts) of this forward
    handles = []

    def replace(layer: int):
        def hook(module, args):
            if layer not in scaled:
                return None
            rows, values = scaled[layer]
            acts = args[0].clone()  # [rows, 1, d_mlp]
            acts[rows, -1] = values
            return (acts, *args[1:])
        return hook

    try:
        for layer in chosen:
            handles.append(model.site(layer).register_forward_pre_hook(replace(layer)))
        for prompt in prompts:
            prefix = prefix_cache(model, prompt)
            clean = last_token_acts(model, prefix, chosen)  # layer -> [d_mlp]
            for first in range(0, len(chosen), layers_per_forward):
                group = chosen[first:first + layers_per_forward]
                scaled.clear()
                for slot, layer in enumerate(group):
                    rows = torch.arange(slot * steps, (slot + 1) * steps, device=model.device)
                    scaled[layer] = (rows, (alphas[:, None] * clean[layer]).requires_grad_(True))
                with torch.enable_grad():
                    probs = gold_probs(last_token_logits(model, prefix, len(group) * steps), prompt.target_ids)
                    grads = torch.autograd.grad(probs.sum(), [scaled[layer][1] for layer in group])
                for layer, grad in zip(group, grads):  # grad: [steps, d_mlp]
                    effect[layer] += (clean[layer] * grad.mean(dim=0)).float().cpu()
                scaled.clear()
            for layer in chosen:
                activation[layer] += clean[layer].float().cpu()
    finally:
        scaled.clear()
        for handle in handles:
            handle.remove()
    effect, activation = effect / len(prompts), activation / len(prompts)
    return NeuronScores(effect=effect, activation=activation, score=effect.abs())

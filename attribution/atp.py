"""Attribution patching (AtP): a first-order estimate of every neuron's NEAT effect from one forward
and one backward of the concept vector: effect_i ~ (v_i - a_i) * d log p(T) / d a_i.

Cheap enough to screen models too large to score exactly; how well it ranks is measured against
exact NEAT (benchmarks/bench_atp.py), never assumed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.models import SiteModel
from attribution.neat import CleanPass, log_p_targets, neuron_index


def log_p_gradients(model: SiteModel, clean: CleanPass, target_ids: tuple[int, ...]) -> Tensor:
    """d log p(T) / d a for every neuron of every layer: [n_layers, d_mlp] float32.

    The gradient at a site is the total derivative through every later block, since the retained
    activations stay inside the graph (nothing is detached).
    """
    acts: dict[int, Tensor] = {}
    handles = []

    def keep(layer: int):
        def hook(module, args):
            args[0].retain_grad()
            acts[layer] = args[0]
        return hook

    embeds = clean.vector.view(1, 1, -1).to(model.device, model.dtype).clone().requires_grad_(True)
    try:
        for layer in range(model.n_layers):
            handles.append(model.site(layer).register_forward_pre_hook(keep(layer)))
        with torch.enable_grad():
            logits = model.hf(inputs_embeds=embeds).logits[:, -1]  # [1, vocab], on the head's device
            log_p_targets(logits, torch.tensor(target_ids, device=logits.device))[0].backward()
    finally:
        for handle in handles:
            handle.remove()
    # a replica split over devices (accelerate's hooks move the rows forward and the gradients back)
    # leaves each layer's gradient on its block's device
    return torch.stack([acts[layer].grad[0, -1].to(model.device) for layer in range(model.n_layers)]).float()


def atp_effects(grads: Tensor, clean: CleanPass, layer: int, neurons: range | tuple[int, ...],
                ablate_to: Tensor) -> Tensor:
    """First-order effects of `neurons` of `layer`: [len(neurons)] float32 (grads: log_p_gradients)."""
    index = neuron_index(neurons, clean.acts.device)
    delta = ablate_to.to(clean.acts.device)[index] - clean.acts[layer, index]
    return (delta * grads[layer, index].to(delta.device)).float().cpu()

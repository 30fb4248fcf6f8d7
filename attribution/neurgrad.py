"""NeurGrad and NEG (arXiv 2412.18053, code xzhao-tkl/NEG): how linearly a neuron controls p(y|x) at the last token.

NEG_i = least-squares slope of p(y|x) against s, a_i -> a_i + s * sign(a_i - t) (t = 0; sign: +1 if a_i > t else -1);
NeurGrad_i = dp(y|x)/da_i * sign(a_i - t), its one-backward estimate.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.models import SiteModel
from attribution.neuron_scores import NeuronScores
from attribution.prompts import (Prompt, check_prompts, gold_probs, last_token_acts, last_token_logits,
                                 prefix_cache, prompt_batch)


def activation_signs(acts: Tensor, threshold: float = 0.0) -> Tensor:
    """+1 where a > threshold, else -1 (the NEG code's `(acts > act_threshold) * 2 - 1`: 0 maps to -1)."""
    return torch.where(acts > threshold, 1.0, -1.0).to(acts.dtype)


def neurgrad_scores(model: SiteModel, prompts: list[Prompt], *, threshold: float = 0.0,
                    batch_size: int = 16) -> NeuronScores:
    """NeurGrad of every neuron, averaged over prompts: one forward and one backward per prompt batch.

    effect = mean over prompts of dp(y|x)/da_i * sign(a_i - threshold), with a_i and the gradient read
    at each prompt's last real token and p the float32 softmax probability (not log p), as in the
    paper's code; activation = mean of a_i there; score = |effect|.
    """
    check_prompts(model, prompts)
    effect = torch.zeros(model.n_layers, model.d_mlp)
    activation = torch.zeros(model.n_layers, model.d_mlp)
    for start in range(0, len(prompts), batch_size):
        acts, grads = last_token_gradients(model, prompts[start:start + batch_size])  # [prompts, n_layers, d_mlp]
        effect += (grads * activation_signs(acts, threshold)).sum(dim=0).cpu()
        activation += acts.sum(dim=0).cpu()
    effect, activation = effect / len(prompts), activation / len(prompts)
    return NeuronScores(effect=effect, activation=activation, score=effect.abs())


def last_token_gradients(model: SiteModel, prompts: list[Prompt]) -> tuple[Tensor, Tensor]:
    """Activations and dp(y|x)/da at each prompt's last real token: two [prompts, n_layers, d_mlp] float32.

    The prompts run as one right-padded batch; p sums over prompts, which are independent rows, so one
    backward gives every prompt's own gradient. The site inputs stay inside the graph (nothing is
    detached), so each gradient is the total derivative through every later block.
    """
    batch = prompt_batch(model, prompts)
    rows = torch.arange(len(prompts), device=model.device)
    sites: dict[int, Tensor] = {}
    handles = []

    def keep(layer: int):
        def hook(module, args):
            sites[layer] = args[0]  # [prompts, pos, d_mlp]
        return hook

    embeds = model.hf.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
    try:
        for layer in range(model.n_layers):
            handles.append(model.site(layer).register_forward_pre_hook(keep(layer)))
        with torch.enable_grad():
            hidden = model.hf.base_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
            logits = model.hf.get_output_embeddings()(hidden[rows, batch.last])  # [prompts, vocab]
            probs = torch.cat([gold_probs(logits[i:i + 1], p.target_ids) for i, p in enumerate(prompts)])
            layers = list(range(model.n_layers))
            grads = torch.autograd.grad(probs.sum(), [sites[layer] for layer in layers])
    finally:
        for handle in handles:
            handle.remove()
    acts = torch.stack([sites[layer].detach()[rows, batch.last] for layer in layers], dim=1)
    grads = torch.stack([grad[rows, batch.last] for grad in grads], dim=1)
    return acts.float(), grads.float()


def sweep_shifts(points: int, max_shift: float) -> Tensor:  # [points]
    """Shifts of |a|: +-max_shift * k / (points / 2), k = 1..points/2 (the paper: +-0.1 .. +-2.0, 40 points)."""
    if points < 2 or points % 2:
        raise ValueError(f"points must be a positive even number (shifts come in +- pairs), got {points}")
    half = torch.arange(1, points // 2 + 1, dtype=torch.float32) * (max_shift / (points // 2))
    return torch.cat([-half.flip(0), half])


@torch.no_grad()
def neg_slopes(model: SiteModel, prompts: list[Prompt], neurons: list[tuple[int, int]], *,
               points: int = 40, max_shift: float = 2.0, threshold: float = 0.0,
               batch_rows: int = 512) -> Tensor:  # [len(neurons)] float32
    """NEG of each (layer, neuron): the least-squares slope, through the origin, of
    dp = mean over prompts of p(y|x; a_i + s * sign(a_i - threshold)) - p(y|x) against the shift s.

    The activation changes only at each prompt's last real token, as in the paper's sweep. That
    changes nothing at earlier positions (causal attention), so each prompt's prefix runs once into a
    KV cache and every (neuron, shift) row is a single-token forward against it, `batch_rows` rows
    per forward (row 0 is the clean row, so dp compares rows of the same batch). Cost: prompts x
    neurons x points single-token forwards; the caller bounds it by its choice of neurons and points.
    """
    check_prompts(model, prompts)
    index = _neuron_index(model, neurons)  # [n, 2]
    shifts = sweep_shifts(points, max_shift).to(model.device)  # [S]
    plan: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> (rows, neurons, deltas) of this forward
    handles = []

    def shift(layer: int):
        def hook(module, args):
            if layer not in plan:
                return None
            rows, cols, deltas = plan[layer]
            acts = args[0].clone()  # [rows, 1, d_mlp]
            acts[rows, -1, cols] += deltas
            return (acts, *args[1:])
        return hook

    dp = torch.zeros(len(neurons), len(shifts), device=model.device)  # [n, S]: sum over prompts
    try:
        for layer in sorted(set(index[:, 0].tolist())):
            handles.append(model.site(layer).register_forward_pre_hook(shift(layer)))
        for prompt in prompts:
            prefix = prefix_cache(model, prompt)
            acts = last_token_acts(model, prefix, sorted(set(index[:, 0].tolist())))  # layer -> [d_mlp]
            clean = torch.stack([acts[int(layer)][int(neuron)] for layer, neuron in index])  # [n]
            deltas = (activation_signs(clean, threshold)[:, None] * shifts).reshape(-1)  # [n * S]
            row_layers = index[:, 0].repeat_interleave(len(shifts))  # [n * S]
            row_neurons = index[:, 1].repeat_interleave(len(shifts)).to(model.device)
            flat = []
            for start in range(0, len(deltas), batch_rows - 1):
                stop = min(start + batch_rows - 1, len(deltas))
                plan.clear()
                for layer in row_layers[start:stop].unique().tolist():
                    picked = (row_layers[start:stop] == layer).nonzero().flatten().to(model.device)
                    plan[layer] = (picked + 1, row_neurons[start + picked], deltas[start + picked])
                probs = gold_probs(last_token_logits(model, prefix, 1 + stop - start), prompt.target_ids)
                flat.append(probs[1:] - probs[0])
            plan.clear()
            dp += torch.cat(flat).view(len(neurons), len(shifts))
    finally:
        for handle in handles:
            handle.remove()
    dp /= len(prompts)
    return ((dp @ shifts) / (shifts @ shifts)).float().cpu()


def _neuron_index(model: SiteModel, neurons: list[tuple[int, int]]) -> Tensor:  # [n, 2] int64 on the CPU
    if not neurons:
        raise ValueError("no neurons to sweep")
    for layer, neuron in neurons:
        if not (0 <= layer < model.n_layers and 0 <= neuron < model.d_mlp):
            raise ValueError(f"neuron ({layer}, {neuron}) not in layers 0..{model.n_layers - 1} x "
                             f"neurons 0..{model.d_mlp - 1} of model {model.source.name}")
    return torch.tensor(neurons, dtype=torch.long).view(-1, 2)

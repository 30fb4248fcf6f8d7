"""In-distribution effects: what ablating neurons does to a concept's real prompts.

NEAT asks its question of the concept vector fed as a one-position input, far from what the model
sees on text. Here the question is asked of the concept's cloze prompts (attribution/prompts.py):
the change of mean log p(gold | prompt) when neurons are set to `ablate_to` at *every* position of
the prompt.

- `prompt_atp`: a first-order estimate for every neuron from one forward and one backward of the
  prompts: effect_i ~ sum over prompts' positions of (v_i - a_i[pos]) * d mean log p(gold) / d a_i[pos].
  Signed: negative = ablating the neuron lowers the gold tokens (it *carries* them), positive = it
  suppresses them.
- `prompt_set_changes`: the exact change for (prompt, neuron set) rows, many sets per batched
  forward (validation.row_masked), the reference the estimate is checked against.
- `prompt_neuron_effects`: the exact effect of each neuron alone, mean over the prompts (method
  `prompt` of a run; its screen is `prompt_atp`, method `prompt-atp`).

Shapes: prompts P, padded positions T, d_mlp neurons per layer, L layers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.models import SiteModel
from attribution.neat import log_p_targets
from attribution.prompts import Prompt, prompt_batch
from attribution.clean_cache import cached_clean_starts
from attribution.suffix_start import first_layer
from attribution.validation import PROMPT_BATCH_ROWS, Neuron, prompt_rows_log_p


def mean_log_p_gold(logits: Tensor, prompts: list[Prompt]) -> Tensor:
    """[P, vocab] logits at each prompt's last token -> [P] log p(gold) (mean over a prompt's gold ids)."""
    return torch.stack([log_p_targets(logits[i:i + 1], torch.tensor(p.target_ids, device=logits.device))[0]
                        for i, p in enumerate(prompts)])


def prompt_atp(model: SiteModel, prompts: list[Prompt], ablate_to: Tensor) -> Tensor:
    """First-order effect of ablating each neuron at every position on mean log p(gold): [L, d_mlp] float32.

    Positions after a prompt's last real token (right padding) get zero gradient (causal attention), so
    summing over every position counts exactly the positions that feed the prediction.
    """
    acts: dict[int, Tensor] = {}
    handles = []

    def keep(layer: int):
        def hook(module, args):
            args[0].retain_grad()
            acts[layer] = args[0]  # [P, T, d_mlp]
        return hook

    batch = prompt_batch(model, list(prompts))
    try:
        for layer in range(model.n_layers):
            handles.append(model.site(layer).register_forward_pre_hook(keep(layer)))
        # The weights do not require gradients: the input embeddings do, so the graph reaches every site.
        embeds = model.hf.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)  # [P, T, d_model]
        with torch.enable_grad():
            logits = model.hf(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
            last = logits[torch.arange(len(prompts), device=logits.device), batch.last.to(logits.device)]  # [P, vocab]
            mean_log_p_gold(last, list(prompts)).mean().backward()
    finally:
        for handle in handles:
            handle.remove()
    effects = []
    for layer in range(model.n_layers):
        a, g = acts[layer].detach().float(), acts[layer].grad.float()  # [P, T, d_mlp]
        real = batch.attention_mask.to(a.device).float()[..., None]  # [P, T, 1]: padding holds no activation
        delta = (ablate_to[layer].to(a.device, a.dtype) - a) * real
        effects.append((delta * g).sum(dim=(0, 1)).to(model.device))  # [d_mlp]
    return torch.stack(effects).float().cpu()


@torch.no_grad()
def prompt_set_changes(model: SiteModel, rows: list[tuple[Prompt, list[Neuron]]], ablate_to: Tensor, *,
                       batch_rows: int = PROMPT_BATCH_ROWS) -> list[float]:
    """For each (prompt, neurons): log p(gold | prompt, neurons ablated together at every position) -
    log p(gold | prompt). Rows of any prompts and sets share batched forwards; clean values are computed
    once per distinct prompt."""
    prompts = list(dict.fromkeys(prompt for prompt, _ in rows))
    # One clean forward keeps the block inputs each row starts from (its set's first ablated layer, see
    # attribution/suffix_start.py) and the last block's output, which gives the clean values.
    layers = {first_layer(list(neurons), model.n_layers) for _, neurons in rows} | {model.n_layers}
    starts = cached_clean_starts(model, [p.text for p in prompts], layers, batch_rows=batch_rows)
    clean = dict(zip(prompts, prompt_rows_log_p(model, [(p, []) for p in prompts], ablate_to, batch_rows=batch_rows,
                                                starts=starts)))
    ablated = prompt_rows_log_p(model, rows, ablate_to, batch_rows=batch_rows, starts=starts)
    return [value - clean[prompt] for (prompt, _), value in zip(rows, ablated)]


def prompt_neuron_effects(model: SiteModel, prompts: list[Prompt], layer: int, neurons, ablate_to: Tensor, *,
                          batch_rows: int = PROMPT_BATCH_ROWS) -> Tensor:
    """Each neuron of `layer` ablated alone at every position: the mean over the prompts of the change of
    log p(gold): [len(neurons)] float32 (signed, like prompt_atp)."""
    neurons = list(neurons)
    rows = [(prompt, [(layer, neuron)]) for neuron in neurons for prompt in prompts]
    changes = torch.tensor(prompt_set_changes(model, rows, ablate_to, batch_rows=batch_rows), dtype=torch.float64)
    return changes.view(len(neurons), len(prompts)).mean(dim=1).float()

"""Per-text neuron activations of every layer, read at one position or pooled over a text's tokens.

The probing methods (NeuronLens, selectivity) describe neurons by their activations on texts; this
module is the one place that runs texts through the model and reads the neuron sites.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attribution.masking import recording
from attribution.models import SiteModel
from attribution.neat import text_batches

POOLING = ("last", "mean")  # last real token | mean over the real (non-special) tokens


@torch.no_grad()
def text_activations(model: SiteModel, texts: list[str] | tuple[str, ...], *, pooling: str = "last",
                     concept: str = "") -> Tensor:  # [texts, n_layers, d_mlp] float32 on the CPU
    """Every neuron's activation on each text: at its last real token, or averaged over its real tokens."""
    if pooling not in POOLING:
        raise ValueError(f"pooling {pooling!r}: expected one of {', '.join(POOLING)}")
    out = []
    for batch in text_batches(model, list(texts), concept=concept):
        with recording(model, range(model.n_layers)) as acts:
            model.hf.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        keep = batch.keep.float()  # [texts, pos]
        if pooling == "last":
            positions = torch.arange(keep.shape[1], device=keep.device)
            last = torch.where(keep > 0, positions, -1).max(dim=1).values  # [texts]
            rows = torch.arange(keep.shape[0], device=keep.device)
            per_layer = [acts[layer].to(keep.device)[rows, last].float() for layer in range(model.n_layers)]
        else:
            weights = (keep / keep.sum(dim=1, keepdim=True)).unsqueeze(-1)  # [texts, pos, 1]
            per_layer = [(acts[layer].to(keep.device).float() * weights).sum(dim=1) for layer in range(model.n_layers)]
        out.append(torch.stack(per_layer, dim=1).cpu())  # [texts, n_layers, d_mlp]
    return torch.cat(out)

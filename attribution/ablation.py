"""What an ablated neuron is set to: zero, or its mean activation over a neutral reference text set."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from attribution.masking import recording
from configs import reference_text
from attribution.models import SiteModel
from attribution.neat import text_batches

ABLATIONS = ("zero", "mean")
REFERENCE_TEXT = reference_text()  # package data: found in a wheel install too


def read_reference_texts(path: str | Path = REFERENCE_TEXT) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@torch.no_grad()
def reference_means(model: SiteModel, texts: list[str]) -> Tensor:  # [n_layers, d_mlp]
    """Mean activation of every neuron over all non-special token positions of the texts."""
    total = torch.zeros(model.n_layers, model.d_mlp, dtype=torch.float64, device=model.device)
    count = 0.0
    for batch in text_batches(model, texts):
        keep = batch.keep.unsqueeze(-1).double()  # [texts, pos, 1]
        with recording(model, range(model.n_layers)) as acts:
            model.hf.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for layer in range(model.n_layers):
            total[layer] += (acts[layer].to(keep.device).double() * keep).sum(dim=(0, 1))  # split replicas
        count += float(keep.sum())
    return (total / count).float()


def ablation_values(model: SiteModel, mode: str, reference: Tensor | None = None) -> Tensor:  # [n_layers, d_mlp]
    if mode == "zero":
        return torch.zeros(model.n_layers, model.d_mlp, device=model.device)
    if mode == "mean":
        if reference is None:
            raise ValueError("mean ablation needs the reference means (reference_means)")
        return reference
    raise ValueError(f"ablation {mode!r} is not one of {', '.join(ABLATIONS)}")

"""The one intervention mechanism: forward pre-hooks on neuron sites, always removed in `finally`.

Masks are data (which layer, which neurons, what value); hooks never outlive the `with` block.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor

from attribution.models import SiteModel


@dataclass(frozen=True)
class NeuronMask:
    """Set `neurons` of `layer` to `values` (0.0 for zero ablation, reference means for mean ablation).

    Range ablation (NeuronLens): with `low` and `high`, a neuron's activation is replaced only at the
    positions where it lies inside [low, high]; elsewhere it is left as it is.
    """

    layer: int
    neurons: tuple[int, ...]
    values: tuple[float, ...]
    low: tuple[float, ...] | None = None  # None: replace everywhere (zero / mean ablation)
    high: tuple[float, ...] | None = None  # +-inf bounds are allowed: (-inf, inf) is the plain mask

    def __post_init__(self) -> None:
        if (self.low is None) != (self.high is None):
            raise ValueError(f"NeuronMask of layer {self.layer}: give both low and high (range ablation) or neither")
        for name in ("values", "low", "high"):
            given = getattr(self, name)
            if given is not None and len(given) != len(self.neurons):
                raise ValueError(f"NeuronMask of layer {self.layer}: {len(given)} {name} for "
                                 f"{len(self.neurons)} neurons")


def layer_masks(neurons: Iterable[tuple[int, int]], ablate_to: Tensor,
                ranges: tuple[Tensor, Tensor] | None = None) -> list[NeuronMask]:
    """(layer, neuron) pairs -> one mask per layer, each neuron set to ablate_to[layer, neuron]
    ([n_layers, d_mlp]); with `ranges` ([n_layers, d_mlp] low and high), range-ablation masks."""
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(int(layer), []).append(int(neuron))
    masks = []
    for layer, ns in sorted(by_layer.items()):
        values = tuple(float(ablate_to[layer, n]) for n in ns)
        bounds = {} if ranges is None else {"low": tuple(float(ranges[0][layer, n]) for n in ns),
                                            "high": tuple(float(ranges[1][layer, n]) for n in ns)}
        masks.append(NeuronMask(layer, tuple(ns), values, **bounds))
    return masks


@contextmanager
def masked(model: SiteModel, *masks: NeuronMask) -> Iterator[None]:
    """Within the block, every forward of `model` runs with the masks applied at their sites."""
    handles = []

    def make_hook(mask: NeuronMask):
        def hook(module, args):
            acts = args[0].clone()  # [batch, pos, d_mlp]
            index = torch.tensor(mask.neurons, device=acts.device)
            values = torch.tensor(mask.values, dtype=acts.dtype, device=acts.device)  # [n]
            if mask.low is None:
                acts[..., index] = values
            else:
                current = acts[..., index]  # [batch, pos, n]
                low = torch.tensor(mask.low, dtype=acts.dtype, device=acts.device)
                high = torch.tensor(mask.high, dtype=acts.dtype, device=acts.device)
                inside = (current >= low) & (current <= high)
                acts[..., index] = torch.where(inside, values, current)
            return (acts, *args[1:])
        return hook

    try:
        for mask in masks:
            handles.append(model.site(mask.layer).register_forward_pre_hook(make_hook(mask)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording(model: SiteModel, layers: range | list[int]) -> Iterator[dict[int, Tensor]]:
    """Record the neuron vector of each layer ([batch, pos, d_mlp]) during forwards in the block."""
    acts: dict[int, Tensor] = {}
    handles = []

    def make_hook(layer: int):
        def hook(module, args):
            acts[layer] = args[0].detach()
        return hook

    try:
        for layer in layers:
            handles.append(model.site(layer).register_forward_pre_hook(make_hook(layer)))
        yield acts
    finally:
        for handle in handles:
            handle.remove()

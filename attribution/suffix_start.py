"""Forwards that start at a neuron set's first ablated layer.

A row whose ablated neurons all sit in blocks L.. is the clean forward up to block L: ablating a
neuron changes nothing before its own block. So block L's clean input, captured once per distinct
text, stands in for blocks 0..L-1 of every row that starts there, and the row runs only blocks L...
A single neuron in layer L runs (n_layers - L) / n_layers of the blocks; a random set of k neurons
starts at its lowest layer. Rows with nothing ablated start at `n_layers`: the last block's clean
output, read by the head directly.

Only the row's blocks are skipped (embeddings, position encodings and the attention mask are still
made by the model's own forward), so the rows equal a full forward up to the rounding of differently
shaped batched matrix multiplies (tests/test_validation.py, tests/test_prompt_effects.py).

Shapes: rows R, padded positions T, a text's own tokens n, d_model D.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from attribution.batching import forward_chunks, token_lengths
from attribution.models import SiteModel
from attribution.neat import text_batches

Neuron = tuple[int, int]  # (layer, neuron)


def first_layer(neurons: list[Neuron], n_layers: int) -> int:
    """The block a row's forward must start at: its lowest ablated layer; n_layers with nothing ablated."""
    return min((int(layer) for layer, _ in neurons), default=n_layers)


@dataclass(frozen=True)
class CleanStarts:
    """Block inputs of the clean forward: layer -> text -> [n, D] (layer n_layers: the last block's output)."""

    by_layer: dict[int, dict[str, Tensor]]

    def batch(self, layer: int, texts: list[str], positions: int) -> Tensor:
        """The rows' clean inputs of block `layer`, right-padded with zeros to `positions`: [R, T, D].

        Padding values never reach a real position (causal attention, right padding, the attention mask)."""
        if layer not in self.by_layer:
            raise KeyError(f"clean starts hold layers {sorted(self.by_layer)}, not {layer}")
        states = [self.by_layer[layer][text] for text in texts]
        out = states[0].new_zeros(len(texts), positions, states[0].shape[-1])
        for row, state in enumerate(states):
            out[row, :state.shape[0]] = state
        return out


@torch.no_grad()
def clean_starts(model: SiteModel, texts: list[str], layers: set[int], *, batch_rows: int = 64) -> CleanStarts:
    """One clean forward over the distinct texts, keeping block inputs at `layers` (and, for
    `n_layers` in layers, the last block's output)."""
    texts = list(dict.fromkeys(texts))
    layers = set(layers)
    by_layer: dict[int, dict[str, Tensor]] = {layer: {} for layer in layers}
    captured: dict[int, Tensor] = {}

    def keep_input(layer: int):
        def hook(module, args, kwargs):
            captured[layer] = args[0] if args else kwargs["hidden_states"]  # [R, T, D]
        return hook

    def keep_output(module, args, output):
        captured[model.n_layers] = output[0] if isinstance(output, tuple) else output  # [R, T, D]

    handles = [model.blocks[layer].register_forward_pre_hook(keep_input(layer), with_kwargs=True)
               for layer in layers if layer < model.n_layers]
    if model.n_layers in layers:
        handles.append(model.blocks[-1].register_forward_hook(keep_output))
    try:
        lengths = token_lengths(model, texts)
        for _, chunk in forward_chunks([0] * len(texts), lengths, model.n_layers, batch_rows):
            batch = next(text_batches(model, [texts[i] for i in chunk], batch_size=len(chunk)))
            model.hf.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            for layer in layers:
                for row, i in enumerate(chunk):
                    by_layer[layer][texts[i]] = captured[layer][row, :lengths[i]].clone()  # [n, D]
    finally:
        for handle in handles:
            handle.remove()
    return CleanStarts(by_layer)


@contextmanager
def starting_at(model: SiteModel, layer: int, resid: Tensor) -> Iterator[None]:
    """Within the block, a forward skips blocks 0..layer-1: each returns `resid` ([R, T, D], block
    `layer`'s clean input) instead of running, so block `layer` runs on it. layer 0: nothing skipped."""
    skipped = list(model.blocks)[:layer]
    own = [block.__dict__.get("forward") for block in skipped]  # an instance forward (accelerate's hooks) to restore

    def skip(*args, **kwargs) -> Tensor:
        return resid

    try:
        for block in skipped:
            block.forward = skip
        yield
    finally:
        for block, forward in zip(skipped, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward

"""Clean block inputs of texts, kept on disk between commands (NEURON_ATLAS_CACHE/clean-states).

Every forward of a neuron set on text starts at the set's first ablated layer, from the clean
forward's input of that block (attribution/suffix_start.py). That clean forward is the same in every
`validate` and in every concept's measured choice of a run: the neutral text, the concept's prompts
and the panel's 243 prompt texts (4.3 s of royalty's 28 s validate on this CPU). A text's clean states
depend only on the weights, the dtype, the device type and its token ids, so each text's states at
every block, plus the last block's output, are stored under a hash of exactly those:
[n_layers + 1, tokens, d_model] float32 in a .npy file (read memory-mapped: a command copies only
the blocks it starts at). SmolLM2-135M: 71 KB per token, about 120 MB for the reference panel, the
built-ins and the neutral text.

Only float32 models on the CPU whose states take at most 256 KB per token are cached: there the clean
pass is a fifth of validate; a GPU makes it in milliseconds, and a 7B model's 0.5 MB per token would
fill a disk. A file that cannot be read or has the wrong shape is recomputed; a cache that cannot be
written is skipped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from attribution.cache_files import has_weights_revision, write_whole
from attribution.models import SiteModel, cache_dir
from attribution.suffix_start import CleanStarts, clean_starts

STATES_VERSION = 1  # change it when what a block input means changes (suffix_start.py's hooks)
MAX_BYTES_PER_TOKEN = 256 * 1024


def _d_model(model: SiteModel) -> int:
    return int(model.hf.get_input_embeddings().weight.shape[1])


def cacheable(model: SiteModel) -> bool:
    """A float32 CPU model with a weights revision to key on, whose states fit MAX_BYTES_PER_TOKEN."""
    return (has_weights_revision(model) and model.dtype == torch.float32
            and model.device.type == "cpu" and (model.n_layers + 1) * _d_model(model) * 4 <= MAX_BYTES_PER_TOKEN)


def states_key(model: SiteModel, token_ids: list[int]) -> str:
    identity = [STATES_VERSION, model.source.revision, str(model.dtype), model.device.type, list(map(int, token_ids))]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def cached_clean_starts(model: SiteModel, texts: list[str], layers: set[int], *, batch_rows: int = 64,
                        directory: Path | None = None) -> CleanStarts:
    """`clean_starts(model, texts, layers)`, each text's states read from the cache where present; the
    missing texts run one clean forward kept at every block, which is stored."""
    if not cacheable(model):
        return clean_starts(model, texts, layers, batch_rows=batch_rows)
    folder = directory or cache_dir() / "clean-states"
    texts = list(dict.fromkeys(texts))
    layers = set(layers)
    if not texts:
        return CleanStarts({layer: {} for layer in layers})
    shape = (model.n_layers + 1, _d_model(model))
    by_layer: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    missing: list[tuple[str, str]] = []  # (text, key)
    for text, ids in zip(texts, model.tokenizer(texts)["input_ids"]):
        key = states_key(model, ids)
        states = _read(folder / f"{key}.npy", layers, (shape[0], len(ids), shape[1]))
        if states is None:
            missing.append((text, key))
            continue
        for layer in layers:
            by_layer[layer][text] = states[layer]
    if missing:
        every = clean_starts(model, [text for text, _ in missing], set(range(model.n_layers + 1)), batch_rows=batch_rows)
        for text, key in missing:
            stacked = torch.stack([every.by_layer[layer][text] for layer in range(model.n_layers + 1)])  # [L+1, n, D]
            _write(folder / f"{key}.npy", stacked)
            for layer in layers:
                by_layer[layer][text] = every.by_layer[layer][text]
    return CleanStarts(by_layer)


def _read(path: Path, layers: set[int], shape: tuple[int, int, int]) -> dict[int, torch.Tensor] | None:
    try:
        stored = np.load(path, mmap_mode="r")
        if stored.shape != shape or stored.dtype != np.float32:
            return None
        out = {layer: torch.from_numpy(np.array(stored[layer])) for layer in layers}  # [n, D] copies
    except Exception:  # noqa: BLE001  missing, truncated or not an array file: recompute it
        return None
    if not all(bool(torch.isfinite(state).all()) for state in out.values()):
        return None
    return out


def _write(path: Path, states: torch.Tensor) -> None:
    array = states.detach().cpu().float().contiguous().numpy()

    def save(partial: Path) -> None:
        with open(partial, "wb") as handle:  # a handle: np.save would append .npy to a bare name
            np.save(handle, array)

    write_whole(path, save)

"""Concept vectors kept on disk between commands (NEURON_ATLAS_CACHE/concept-vectors).

A run's reference contrast computes the 35 reference concepts' vectors; `validate` needs the same
vectors for its panel, and recomputing them (~500 example texts) was a third of its time. A vector
is a pure function of the weights, the dtype, the device type and the examples, so the file name
is a hash of exactly those: a changed example or re-trained weights miss the cache, never hit a stale
vector. A file that cannot be read is recomputed; a cache that cannot be written is skipped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from attribution.cache_files import has_weights_revision, write_whole
from attribution.models import SiteModel, cache_dir
from attribution.neat import concept_vectors


def vector_key(model: SiteModel, examples: tuple[str, ...]) -> str:
    identity = [model.source.revision, str(model.dtype), model.device.type, list(examples)]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def cached_concept_vectors(model: SiteModel, examples_by_concept: dict[str, tuple[str, ...]], *,
                           directory: Path | None = None) -> dict[str, Tensor]:
    """name -> concept vector [d_model], from the cache where present, the rest computed together
    (attribution.neat.concept_vectors) and stored."""
    folder = directory or cache_dir() / "concept-vectors"
    out: dict[str, Tensor] = {}
    missing: dict[str, tuple[str, ...]] = {}
    for name, examples in examples_by_concept.items():
        path = folder / f"{vector_key(model, tuple(examples))}.pt"
        vector = _read(path, model) if has_weights_revision(model) else None
        if vector is None:
            missing[name] = tuple(examples)
        else:
            out[name] = vector.to(model.device)
    if missing:
        computed = concept_vectors(model, missing)
        for name, vector in computed.items():
            if has_weights_revision(model):
                _write(folder / f"{vector_key(model, missing[name])}.pt", vector)
        out.update(computed)
    return {name: out[name] for name in examples_by_concept}


def _read(path: Path, model: SiteModel) -> Tensor | None:
    try:
        vector = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001  unreadable, truncated or not a tensor file: recompute it
        return None
    d_model = model.hf.get_input_embeddings().weight.shape[1]
    if not isinstance(vector, Tensor) or vector.shape != (d_model,) or not bool(torch.isfinite(vector).all()):
        return None
    return vector


def _write(path: Path, vector: Tensor) -> None:
    write_whole(path, lambda partial: torch.save(vector.detach().cpu().clone(), partial))

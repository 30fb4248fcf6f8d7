"""validate's random baseline on a concept's prompts, kept on disk between commands
(NEURON_ATLAS_CACHE/validate-baselines).

`validate` ablates its top-k sets and, per k, `draws` random k-neuron sets on the concept's prompts. The
random half is most of that work (80 of royalty's 84 sets with the defaults) and does not depend on the
ranking: only on the weights, dtype and device type, the prompts, the intervention's values, the run's
layers, the ks, the draws and the seed. So the file name is a hash of exactly those (and of the
drawing's version): the run's measured choice fills it for validate's defaults, and validate fills
it on a miss. A file that cannot be read, or whose shape is wrong, is recomputed; a cache that cannot
be written is skipped. Values: k -> [each draw's change of mean log p(gold), ablated - clean].
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI reads the defaults below while building its parser: no torch import here
    from torch import Tensor

    from attribution.models import SiteModel

DRAWING_VERSION = 1  # attribution/validation.py: draws_by_k; change it when the draws change
# validate's defaults, the baseline a run fills (jobs/validate_command.py reads them from here)
DEFAULT_KS = (1, 5, 10, 50)
DEFAULT_DRAWS = 20
DEFAULT_SEED = 0


def _tensor_digest(values: Tensor | None) -> str | None:
    if values is None:
        return None
    return hashlib.sha256(values.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def baseline_key(model: SiteModel, prompts, ablate_to: Tensor, ranges: tuple[Tensor, Tensor] | None,
                 layers: list[int], ks: list[int], draws: int, seed: int) -> str | None:
    """The cache file's name, or None for a model without a weights revision to key on."""
    from attribution.cache_files import has_weights_revision

    if not has_weights_revision(model):
        return None
    identity = [DRAWING_VERSION, model.source.revision, str(model.dtype), model.device.type,
                [[p.text, list(p.target_ids)] for p in prompts], _tensor_digest(ablate_to),
                None if ranges is None else [_tensor_digest(ranges[0]), _tensor_digest(ranges[1])],
                [int(layer) for layer in layers], [int(k) for k in ks], int(draws), int(seed)]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def read_baseline(key: str | None, ks: list[int], draws: int, *, directory: Path | None = None) -> dict[int, list[float]] | None:
    from attribution.models import cache_dir

    if key is None:
        return None
    path = (directory or cache_dir() / "validate-baselines") / f"{key}.json"
    try:
        stored = json.loads(path.read_text())
        out = {int(k): [float(v) for v in stored[str(k)]] for k in ks}
    except (OSError, ValueError, KeyError, TypeError):  # missing, unreadable or not this shape: recompute
        return None
    if any(len(values) != draws or not all(v == v and abs(v) != float("inf") for v in values) for values in out.values()):
        return None
    return out


def write_baseline(key: str | None, changes: dict[int, list[float]], *, directory: Path | None = None) -> None:
    from attribution.cache_files import write_whole
    from attribution.models import cache_dir

    if key is None:
        return
    text = json.dumps({str(k): list(values) for k, values in changes.items()})
    write_whole((directory or cache_dir() / "validate-baselines") / f"{key}.json", lambda partial: partial.write_text(text))


def cached_random_prompt_changes(model: SiteModel, prompts, ablate_to: Tensor, ranges, *, layers: list[int],
                                 ks: list[int], draws: int, seed: int) -> tuple[dict[int, list[float]], bool]:
    """(k -> each random draw's prompt change, whether it came from the cache); computed and stored on a miss."""
    from attribution.validation import draws_by_k, random_prompt_changes

    key = baseline_key(model, prompts, ablate_to, ranges, layers, ks, draws, seed)
    known = read_baseline(key, ks, draws)
    if known is not None:
        return known, True
    changes = random_prompt_changes(model, prompts, draws_by_k(layers, model.d_mlp, ks, draws, seed), ablate_to, ranges)
    write_baseline(key, changes)
    return changes, False

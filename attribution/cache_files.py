"""What the on-disk caches under NEURON_ATLAS_CACHE share (vector_cache.py, baseline_cache.py,
clean_cache.py): whether a model can key a cache, and writing a file that readers see whole or not at all.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def has_weights_revision(model) -> bool:
    """A model planned from its architecture alone has no weights revision to key a cache on."""
    return model.source.revision.startswith(("sha256:", "hub:"))


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(partial)` into a sibling file, then rename it to `path`: readers see the whole file or none.
    A read-only or full cache costs time, never the result: the error is swallowed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")
        write(partial)
        os.replace(partial, path)
    except OSError:
        pass

"""The configs that ship with neuron-atlas as package data (read through importlib.resources, so a
wheel or `pip install .` finds them outside the repository): the demo config, the built-in
concepts, the neutral reference text of mean ablation and derived targets, cluster examples."""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path

BUILTIN = "builtin"  # `concepts: builtin` (or `--concepts builtin`): the built-in concept file


def packaged(*parts: str) -> Path:
    """Path of a shipped config file, e.g. packaged("reference", "neutral.txt")."""
    return Path(str(files(__name__).joinpath(*parts)))


def builtin_concepts() -> Path:
    return packaged("concepts", "builtin.yaml")


def reference_text() -> Path:
    return packaged("reference", "neutral.txt")

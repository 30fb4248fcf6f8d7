"""User-facing errors of the atlas layer: the message names the input and what was expected."""
from __future__ import annotations

from collections.abc import Iterable


class AtlasError(Exception):
    """A problem with the atlas or a request to it that the user can fix; printed without a traceback."""


class UnknownConceptError(AtlasError):
    """The concept is not in the atlas; `available` lists the concepts that are."""

    def __init__(self, message: str, *, available: Iterable[str]):
        super().__init__(message)
        self.available: list[str] = sorted(available)


class AmbiguousModelError(AtlasError):
    """No model was named and several models hold the concept; `models` lists them."""

    def __init__(self, message: str, *, models: Iterable[str]):
        super().__init__(message)
        self.models: list[str] = sorted(models)


class CommitRaceError(AtlasError):
    """A commit lost every attempt to concurrent writers: nothing is wrong with the input; run it again
    (exit status 75, EX_TEMPFAIL)."""

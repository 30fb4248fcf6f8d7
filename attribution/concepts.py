"""Concept files (YAML) and target words -> target token ids, with errors that name the input.

Format (docs/design.md, "Concept files"): a top-level `concepts:` list of {name, examples, targets, negatives?,
description?}. Target token of word w: the first token of encode(" " + w) that is not a bare
word-boundary piece (SentencePiece may emit a lone "▁" first); deduplicated across words.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from attribution.errors import ConceptError
from attribution.yaml_files import YamlFileError, load_yaml_file

CONCEPT_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # matched whole (fullmatch: no trailing newline)
CONCEPT_KEYS = {"name": str, "description": str, "examples": list, "targets": list, "negatives": list}
REQUIRED_KEYS = ("name", "examples")  # no targets: derived from the concept vector (auto_targets.py)
BOUNDARY_PIECES = {"▁", "Ġ", " ", ""}


@dataclass(frozen=True)
class Concept:
    name: str
    examples: tuple[str, ...]  # sentences that express the concept
    targets: tuple[str, ...]  # words whose probability the concept should raise; () = derive them
    negatives: tuple[str, ...] = ()  # sentences that do not express it
    description: str = ""


@dataclass(frozen=True)
class TargetTokens:
    """A concept's target words resolved against one tokenizer."""

    ids: tuple[int, ...]
    strings: tuple[str, ...]  # the tokens as the tokenizer spells them, aligned with ids
    words: tuple[str, ...]  # the word each id came from (the first word, when words share a token)
    warnings: tuple[str, ...] = field(default=())
    derived: bool = False  # True: chosen by attribution.auto_targets, not given in the concept file

    @property
    def pending(self) -> bool:  # no targets given: the actor derives them from the concept vector
        return not self.ids


def load_concept_file(path: str | Path) -> list[Concept]:
    """Parse and validate a concept file; every problem names the file, the concept and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConceptError(f"concept file {str(path)!r} does not exist")
    try:
        data = load_yaml_file(path)
    except YamlFileError as err:
        raise ConceptError(f"concept file {str(path)!r} {err}") from None
    if not isinstance(data, dict) or set(data) != {"concepts"}:
        keys = _shown(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
        raise ConceptError(f"concept file {str(path)!r}: expected one top-level key 'concepts', found {keys}")
    entries = data["concepts"]
    if not isinstance(entries, list) or not entries:
        raise ConceptError(
            f"concept file {str(path)!r}: 'concepts' must be a non-empty list, got {type(entries).__name__}"
        )
    concepts = [_parse_concept(entry, i, path) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for concept in concepts:
        if concept.name in seen:
            raise ConceptError(f"concept file {str(path)!r}: duplicate concept name {concept.name!r}")
        seen.add(concept.name)
    return concepts


def _shown(value: object, limit: int = 80) -> str:
    """repr() of a value for an error message, cut to `limit` characters (never a whole huge value)."""
    text = repr(value if not isinstance(value, (list, dict)) or len(value) <= 20 else
                (list(value)[:20] if isinstance(value, list) else dict(list(value.items())[:20])))
    return text if len(text) <= limit else f"{text[:limit]}..."


def _parse_concept(entry: object, index: int, path: Path) -> Concept:
    where = f"concept file {str(path)!r}, concepts[{index}]"
    if not isinstance(entry, dict):
        raise ConceptError(f"{where}: expected a mapping with keys name, examples, targets, got {_shown(entry)}")
    if isinstance(entry.get("name"), str):
        where = f"concept file {str(path)!r}, concept {_shown(entry['name'], 70)}"
    for key in entry:
        if key not in CONCEPT_KEYS:
            raise ConceptError(f"{where}: unknown key {_shown(key, 40)} (expected one of {', '.join(CONCEPT_KEYS)})")
    for key in REQUIRED_KEYS:
        if key not in entry:
            raise ConceptError(f"{where}: missing required key {key!r}")
    for key, value in entry.items():
        if not isinstance(value, CONCEPT_KEYS[key]):
            raise ConceptError(
                f"{where}: key {key!r} must be a {CONCEPT_KEYS[key].__name__}, got {type(value).__name__} {_shown(value)}"
            )
    name = entry["name"]
    if not CONCEPT_SLUG.fullmatch(name):
        raise ConceptError(
            f"{where}: name {_shown(name, 70)} is not a slug: expected lower-case letters, digits, '_' or '-' "
            f"(pattern {CONCEPT_SLUG.pattern})"
        )
    lists = {}
    for key in ("examples", "targets", "negatives"):
        values = entry.get(key, [])
        for j, value in enumerate(values):
            if not isinstance(value, str) or not value.strip():
                raise ConceptError(f"{where}: {key}[{j}] must be a non-empty string, got {_shown(value)}")
        lists[key] = tuple(v.strip() for v in values)
    if not lists["examples"]:
        raise ConceptError(f"{where}: 'examples' is empty: a concept needs at least one")
    if "targets" in entry and not lists["targets"]:
        raise ConceptError(f"{where}: 'targets' is empty: list at least one word, or leave the key out "
                           "to derive targets from the concept vector")
    return Concept(name=name, examples=lists["examples"], targets=lists["targets"],
                   negatives=lists["negatives"], description=entry.get("description", "").strip())


def resolve_targets(tokenizer, concept: Concept) -> TargetTokens:
    """Target words -> first real token of " " + word, deduplicated (docs/design.md, "Targets").

    A concept without targets resolves to no ids (`pending`): the actors derive them.
    """
    ids: list[int] = []
    strings: list[str] = []
    words: list[str] = []
    warnings: list[str] = []
    for word in concept.targets:
        tokens = tokenizer.encode(" " + word, add_special_tokens=False)
        pieces = tokenizer.convert_ids_to_tokens(tokens)
        real = [(t, p) for t, p in zip(tokens, pieces) if p not in BOUNDARY_PIECES]
        problem = _first_token_problem(tokenizer, real[0][0] if real else None)
        if problem:
            raise ConceptError(
                f"concept {concept.name!r}: target word {word!r} cannot be encoded by the model's tokenizer: "
                f"{problem} (tokens {pieces})"
            )
        token_id, piece = real[0]
        if len(real) > 1:
            warnings.append(
                f"concept {concept.name!r}: target {word!r} splits into {[p for _, p in real]}; using its first token {piece!r}"
            )
        if token_id in ids:
            other = words[ids.index(token_id)]
            warnings.append(
                f"concept {concept.name!r}: targets {other!r} and {word!r} share their first token {piece!r}; counted once"
            )
            continue
        ids.append(token_id)
        strings.append(piece)
        words.append(word)
    return TargetTokens(ids=tuple(ids), strings=tuple(strings), words=tuple(words), warnings=tuple(warnings))


def _first_token_problem(tokenizer, token_id: int | None) -> str:
    """Why a word's first token cannot stand for it ("" when it can)."""
    if token_id is None:
        return "it encodes to no token"
    if token_id in set(tokenizer.all_special_ids) or token_id == getattr(tokenizer, "unk_token_id", None):
        return "it encodes to a special or unknown token"
    text = tokenizer.decode([token_id])
    if not text.strip() or "\ufffd" in text:
        return "its first token is a byte fragment, not text"
    return ""

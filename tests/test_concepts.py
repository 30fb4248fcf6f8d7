"""Concept files: built-ins are complete; every kind of bad file gets one clear error naming it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from attribution.concepts import Concept, load_concept_file, resolve_targets
from attribution.errors import ConceptError

DATA = Path(__file__).parent / "data"
BUILTIN = Path(__file__).parent.parent / "configs" / "concepts" / "builtin.yaml"


def test_builtin_concepts_are_complete_and_encodable(smollm2):
    concepts = {c.name: c for c in load_concept_file(BUILTIN)}
    assert {"royalty", "negation", "past_tense", "positive_sentiment", "male", "female"} <= set(concepts)
    for concept in concepts.values():
        assert len(concept.examples) >= 20 and len(concept.negatives) >= 20, concept.name
        assert len(set(concept.examples)) == len(concept.examples)
        targets = resolve_targets(smollm2.tokenizer, concept)
        assert len(targets.ids) == len(concept.targets), targets.warnings


@pytest.mark.parametrize("name, message", [
    ("empty_examples.yaml", "'examples' is empty"),
    ("duplicate_name.yaml", "duplicate concept name 'royalty'"),
    ("bad_slug.yaml", "'Royal Family!' is not a slug"),
    ("empty_target.yaml", "targets[1] must be a non-empty string"),
    ("unknown_key.yaml", "unknown key 'exmaples'"),
    ("not_a_list.yaml", "'concepts' must be a non-empty list"),
])
def test_bad_concept_files_are_rejected_with_the_file_and_key(name, message):
    path = DATA / "bad_concepts" / name
    with pytest.raises(ConceptError) as err:
        load_concept_file(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_concept_file():
    with pytest.raises(ConceptError, match="does not exist"):
        load_concept_file(DATA / "nope.yaml")


@pytest.mark.parametrize("word, why", [("\u200b", "byte fragment"), ("<|endoftext|>", "special")])
def test_target_word_the_tokenizer_cannot_encode_is_rejected(smollm2, word, why):
    concept = Concept(name="c", examples=("x",), targets=("king", word))
    with pytest.raises(ConceptError, match=re.escape(f"target word {word!r} cannot be encoded") + f".*{why}"):
        resolve_targets(smollm2.tokenizer, concept)


def test_targets_use_the_first_real_token_and_deduplicate(smollm2):
    concept = Concept(name="c", examples=("x",), targets=("king", "kingdom", "king", "unbelievably"))
    targets = resolve_targets(smollm2.tokenizer, concept)
    first = smollm2.tokenizer.encode(" unbelievably", add_special_tokens=False)[0]
    assert targets.ids[0] == smollm2.tokenizer.encode(" king", add_special_tokens=False)[0]
    assert first in targets.ids and len(targets.ids) == len(set(targets.ids)) == 3
    assert any("share their first token" in w for w in targets.warnings)
    assert any("splits into" in w for w in targets.warnings)

"""Prompts with gold next tokens for the methods that score p(y|x) at the last token (NeurGrad, NEG, IG).

A prompt is the text before an example's first target word, its gold that word's target token
(docs/design.md, "Methods"); p(y|x) = mean over the prompt's gold tokens t of softmax(logits[last])[t].
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from attribution.concepts import Concept, resolve_targets
from attribution.errors import ConceptError
from attribution.masking import recording
from attribution.models import SiteModel
from attribution.neat import text_batches


@dataclass(frozen=True)
class Prompt:
    """A text whose next token should be one of `target_ids`: p(y|x) = mean_t p(t | text)."""

    text: str
    target_ids: tuple[int, ...]


def concept_prompts(tokenizer, concept: Concept, target_ids: tuple[int, ...] | None = None, *,
                    min_prompts: int = 4) -> list[Prompt]:
    """Cloze prompts from `concept.examples`, or whole examples when fewer than `min_prompts` exist.

    Occurrence prompts: for each example, the earliest match (case-insensitive, on word boundaries)
    of any target word; the prompt is the text before it, stripped (examples whose match starts the
    text are skipped), and its gold is that word's target token, taken by the rule of
    `resolve_targets` (first real token of " " + word), so a capitalised "King" mid-sentence still
    has gold " king". Fallback: every whole example, gold = all of `target_ids` (p(y|x) = mean over
    the concept's target tokens), the question NEAT asks of the concept vector.
    target_ids: the concept's resolved ids (default: `resolve_targets(tokenizer, concept).ids`).
    """
    if target_ids is None:
        target_ids = resolve_targets(tokenizer, concept).ids
    word_ids = target_word_ids(tokenizer, concept)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(word_ids, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    prompts = []
    for example in concept.examples:
        match = pattern.search(example)
        if match is None:
            continue
        text = example[:match.start()].strip()
        if text:
            prompts.append(Prompt(text, (word_ids[match.group(1).lower()],)))
    if len(prompts) >= min_prompts:
        return prompts
    return [Prompt(example, tuple(target_ids)) for example in concept.examples]


def target_word_ids(tokenizer, concept: Concept) -> dict[str, int]:
    """Lower-cased target word -> its target token id (words that share a first token keep their own entry)."""
    word_ids: dict[str, int] = {}
    for word in concept.targets:
        one = resolve_targets(tokenizer, replace(concept, targets=(word,)))
        word_ids.setdefault(word.lower(), one.ids[0])
    if not word_ids:
        raise ConceptError(f"concept {concept.name!r} has no target words")
    return word_ids


def gold_probs(logits: Tensor, target_ids: tuple[int, ...]) -> Tensor:  # [rows, vocab] -> [rows]
    """p(y|x) = mean over gold tokens of the float32 softmax, without materialising the whole softmax."""
    logits = logits.float()
    targets = torch.tensor(target_ids, device=logits.device)
    return (logits[:, targets] - torch.logsumexp(logits, dim=-1, keepdim=True)).exp().mean(dim=-1)


def check_prompts(model: SiteModel, prompts: list[Prompt]) -> None:
    """Every prompt has a text and gold ids inside the vocabulary; errors repeat the prompt."""
    if not prompts:
        raise ValueError("no prompts: a p(y|x) method needs at least one prompt")
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    for prompt in prompts:
        if not prompt.target_ids or not all(0 <= t < vocab for t in prompt.target_ids):
            raise ValueError(f"prompt {prompt.text!r}: gold ids {prompt.target_ids} must be a non-empty "
                             f"tuple of ids in 0..{vocab - 1}")


@dataclass(frozen=True)
class PromptBatch:
    """Right-padded prompts and the position of each one's last real (non-special) token."""

    input_ids: Tensor  # [prompts, pos]
    attention_mask: Tensor  # [prompts, pos]
    last: Tensor  # [prompts] int64


def prompt_batch(model: SiteModel, prompts: list[Prompt]) -> PromptBatch:
    batch = next(text_batches(model, [p.text for p in prompts], batch_size=len(prompts)))
    positions = torch.arange(batch.keep.shape[1], device=batch.keep.device)
    last = torch.where(batch.keep > 0, positions, -1).max(dim=1).values  # [prompts]
    return PromptBatch(batch.input_ids, batch.attention_mask, last)


@dataclass(frozen=True)
class PrefixCache:
    """One prompt split before its last real token: the prefix's keys and values, computed once.

    With causal attention, changing an activation at the last position changes nothing at earlier
    positions, so rows that differ only there can all run as single-token forwards against this cache.
    """

    prompt: Prompt
    last_id: int  # the last real token, the position where activations are read and changed
    cache: object | None  # transformers Cache of the prefix (batch 1), None for a one-token prompt


@torch.no_grad()
def prefix_cache(model: SiteModel, prompt: Prompt) -> PrefixCache:
    batch = prompt_batch(model, [prompt])
    last = int(batch.last[0])
    ids = batch.input_ids[:, :last + 1]  # [1, pos]; special tokens after the last real one are dropped
    if last == 0:
        return PrefixCache(prompt, int(ids[0, 0]), None)
    out = model.hf(input_ids=ids[:, :last], use_cache=True)
    return PrefixCache(prompt, int(ids[0, last]), out.past_key_values)


def last_token_logits(model: SiteModel, prefix: PrefixCache, rows: int) -> Tensor:  # -> [rows, vocab]
    """`rows` copies of the prompt's last token run against its cached prefix (hooks make them differ)."""
    cache = None
    if prefix.cache is not None:
        cache = copy.deepcopy(prefix.cache)  # `update` grows a cache in place: every call gets its own
        cache.batch_repeat_interleave(rows)
    ids = torch.full((rows, 1), prefix.last_id, dtype=torch.long, device=model.device)
    return model.hf(input_ids=ids, past_key_values=cache, use_cache=cache is not None).logits[:, -1]


@torch.no_grad()
def last_token_acts(model: SiteModel, prefix: PrefixCache, layers: list[int]) -> dict[int, Tensor]:
    """Clean activations at the prompt's last real token: layer -> [d_mlp]."""
    with recording(model, layers) as acts:
        last_token_logits(model, prefix, 1)
    return {layer: acts[layer][0, -1] for layer in layers}

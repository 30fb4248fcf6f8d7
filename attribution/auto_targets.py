"""Target words for a concept that has none: the tokens its clean concept vector promotes most.

NEAT leaves open where targets come from. Here, a logit lens: c is the mean last-layer hidden state
(after the final norm), so the unembedding W_U c says which next tokens c itself promotes. Take the
word tokens whose log-probability under W_U c rises most above that under W_U b, where b is the same
mean over the neutral reference text, among the LIKELY tokens of c (its 2,000 most probable), so
that neither tokens likely after anything ("the", ",") nor rare tokens b happens to suppress win.
On SmolLM2, royalty gets throne, royal, prince, palace...; male gets his, father, himself...
(feeding c as an input instead, as NEAT scores, promoted unrelated tokens such as "Product").
The run's metadata records the derived targets.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from attribution.concepts import TargetTokens
from attribution.models import SiteModel

AUTO_TARGETS = 8  # how many tokens a derived target set holds
LIKELY = 2000  # candidates: the most probable tokens under W_U c
_WORD = re.compile(r"^[A-Za-z]{3,}$")  # a whole word of letters: no fragments, digits or punctuation


@torch.no_grad()
def promoted_tokens(model: SiteModel, vector: Tensor, baseline: Tensor) -> Tensor:  # [vocab] float32
    """Logit lens: log p(token | W_U c) - log p(token | W_U b) over c's LIKELY tokens, -inf elsewhere."""
    hidden = torch.stack([vector, baseline]).to(model.device, model.dtype)  # [2, d_model], already normed
    log_p = torch.log_softmax(model.hf.get_output_embeddings()(hidden).float(), dim=-1)  # [2, vocab]
    likely = log_p[0].topk(min(LIKELY, log_p.shape[1])).indices
    gain = torch.full_like(log_p[0], float("-inf"))
    gain[likely] = log_p[0, likely] - log_p[1, likely]
    return gain.cpu()


def derive_targets(model: SiteModel, vector: Tensor, baseline: Tensor, *, concept: str,
                   count: int = AUTO_TARGETS) -> TargetTokens:
    """The `count` word tokens (a word-boundary piece followed by 3+ letters) c promotes most."""
    tokenizer = model.tokenizer
    gain = promoted_tokens(model, vector, baseline)
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    words: list[str] = []
    seen: set[str] = set()
    for token_id in torch.argsort(gain, descending=True, stable=True).tolist():
        if gain[token_id] == float("-inf"):
            break
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        word = text.strip()
        # A token that starts a word: decoding keeps its leading space (GPT-2 "Ġ", SentencePiece "▁").
        if not text.startswith(" ") or not _WORD.match(word) or word.lower() in seen:
            continue
        seen.add(word.lower())
        ids.append(token_id)
        words.append(word)
        if len(ids) == count:
            break
    if not ids:
        raise ValueError(f"concept {concept!r}: no word token among the tokens its concept vector promotes")
    strings = tuple(tokenizer.convert_ids_to_tokens(ids))
    note = f"concept {concept!r}: no targets given; derived {', '.join(words)} from its concept vector"
    return TargetTokens(ids=tuple(ids), strings=strings, words=tuple(words), warnings=(note,), derived=True)

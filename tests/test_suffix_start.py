"""Forwards that start at a set's first ablated layer (attribution/suffix_start.py).

Their exactness against full forwards is checked where they are used: tests/test_prompt_effects.py and
tests/test_validation.py compare against one plain forward per prompt and set. Here: which forwards
the rows get (attribution/batching.py), and that a forward started at layer L equals the full one.
"""
from __future__ import annotations

import pytest
import torch

from attribution.batching import forward_chunks
from attribution.suffix_start import clean_starts, first_layer, starting_at
from attribution.validation import final_residual


def _padded_block_tokens(chunks, lengths, n_layers):
    """Padded tokens times blocks run: the compute a plan spends."""
    return sum(len(rows) * max(lengths[r] for r in rows) * (n_layers - start) for start, rows in chunks)


@pytest.mark.parametrize("seed", range(5))
def test_every_row_runs_once_from_at_or_below_its_first_layer(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 300
    firsts = torch.randint(0, 31, (n,), generator=generator).tolist()  # 30: a clean row
    lengths = torch.randint(1, 40, (n,), generator=generator).tolist()
    chunks = forward_chunks(firsts, lengths, 30, size=64, max_tokens=512)
    rows = sorted(row for _, chunk in chunks for row in chunk)
    assert rows == list(range(n))
    for start, chunk in chunks:
        assert start == min(firsts[row] for row in chunk)
        assert len(chunk) <= 64 and len(chunk) * max(lengths[row] for row in chunk) <= 512
    assert forward_chunks([], [], 30, size=64) == []
    assert first_layer([], 30) == 30 and first_layer([(12, 1), (4, 9)], 30) == 4


def test_validate_draws_on_short_prompts_spend_less_than_length_sorted_batches():
    # One validate k on royalty's prompts: 21 neuron sets x 12 texts of 1-12 tokens, each set one
    # neuron at a random layer (k = 1). Plain length-sorted batches of 64 rows, all started at the
    # batch's lowest layer (the grouping before), against the cost-based plan.
    text_lengths = [1, 2, 7, 6, 9, 7, 1, 5, 1, 12, 8, 1]
    generator = torch.Generator().manual_seed(0)
    set_firsts = torch.randint(0, 30, (21,), generator=generator).tolist()
    firsts = [f for f in set_firsts for _ in text_lengths]
    lengths = [length for _ in set_firsts for length in text_lengths]
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    before = [(min(firsts[r] for r in order[i:i + 64]), order[i:i + 64]) for i in range(0, len(order), 64)]
    after = forward_chunks(firsts, lengths, 30, size=64)
    real = sum(lengths) * 30
    assert _padded_block_tokens(after, lengths, 30) < 0.8 * _padded_block_tokens(before, lengths, 30)
    assert _padded_block_tokens(after, lengths, 30) < real  # late starts save more than padding costs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_forward_started_at_a_layer_equals_the_full_forward(tiny_models, family):
    model = tiny_models[family]
    texts = ["The king wore a crown.", "Rain fell.", "A queen sat on the old throne at court."]
    layer = model.n_layers // 2
    starts = clean_starts(model, texts, {layer, model.n_layers})
    encoded = [model.tokenizer(text)["input_ids"] for text in texts]
    length = max(len(ids) for ids in encoded)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, row_ids in enumerate(encoded):
        ids[row, :len(row_ids)] = torch.tensor(row_ids)
        mask[row, :len(row_ids)] = 1
    full = final_residual(model, ids, mask)  # [texts, pos, d_model]
    with starting_at(model, layer, starts.batch(layer, texts, length)):
        started = final_residual(model, ids, mask)
    for row, row_ids in enumerate(encoded):  # real positions only: padding is never read
        n = len(row_ids)
        assert torch.allclose(started[row, :n], full[row, :n], atol=1e-5)
        assert torch.allclose(starts.by_layer[model.n_layers][texts[row]], full[row, :n], atol=1e-5)
    assert all("forward" not in block.__dict__ for block in model.blocks)  # the blocks are whole again

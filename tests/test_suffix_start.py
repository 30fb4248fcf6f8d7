"""Forwards that start at a set's first ablated layer (attribution/suffix_start.py).

Their exactness against full forwards is checked where they are used: tests/test_prompt_effects.py and
tests/test_validation.py compare against one plain forward per prompt and set. Here: which forwards
the rows get, and that a forward started at layer L equals the full one.
"""
from __future__ import annotations

import pytest
import torch

from attribution.suffix_start import clean_starts, first_layer, start_chunks, starting_at
from attribution.validation import final_residual


def test_every_row_runs_once_from_at_or_below_its_first_layer():
    # Layer 7 has a forward's worth of rows (4 with batch_rows 4): its own forwards, starting at 7.
    # The sparse layers 2, 5 and 9 share forwards that start at their lowest layer.
    firsts = [7, 7, 2, 7, 9, 7, 5, 9]
    lengths = [3, 1, 4, 2, 1, 5, 2, 3]
    chunks = start_chunks(firsts, lengths, batch_rows=4)
    rows = sorted(row for _, chunk in chunks for row in chunk)
    assert rows == list(range(len(firsts)))
    assert all(start <= firsts[row] for start, chunk in chunks for row in chunk)
    assert (7, [1, 3, 0, 5]) in chunks  # length-sorted, all of layer 7, started at 7
    assert all(start == 2 for start, chunk in chunks if 7 not in {firsts[row] for row in chunk})
    assert first_layer([], 30) == 30 and first_layer([(12, 1), (4, 9)], 30) == 4


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

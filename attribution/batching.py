"""Which rows of token sequences share a forward (pure functions over lengths; no model runs here).

A forward over R rows padded to T tokens costs about (R * T + BLOCK_OVERHEAD_TOKENS) per block it
runs: the matrix multiplies scale with the padded tokens, and every block also streams its weights
from memory once per forward (SmolLM2-135M on this 2-core CPU, 2026-12-03: one row of 4 tokens
through 30 blocks took 115 ms, 21 rows of 12 tokens 490 ms, 64 rows of 12 tokens 1,455 ms: about
3.5 ms + 0.06 ms per token and block, so a forward's fixed cost is worth ~60 tokens).

`forward_chunks` groups rows to minimise that cost: rows of one length share forwards (no padding
is wasted on royalty's cloze prompts of 1-12 tokens), and rows that may start late (their first
ablated layer, attribution/suffix_start.py) get forwards that start late when the blocks saved pay
for the extra forward.
"""
from __future__ import annotations

BLOCK_OVERHEAD_TOKENS = 60  # a forward's per-block fixed cost, in padded tokens (measured above)
MAX_TOKENS = 2048  # padded tokens per forward: bounds the activations' memory


def token_lengths(model, texts: list[str]) -> list[int]:
    """The token count of each text under the model's tokenizer."""
    return [len(ids) for ids in model.tokenizer(list(texts))["input_ids"]]


def forward_chunks(firsts: list[int], lengths: list[int], n_layers: int, size: int,
                   max_tokens: int = MAX_TOKENS) -> list[tuple[int, list[int]]]:
    """Rows (the block each may start at, its token length) -> forwards: (start block, row indices).

    Every row is in exactly one forward, which starts at the lowest `firsts` of its rows and holds at
    most `size` rows and `max_tokens` padded tokens. The forwards are contiguous runs of the rows
    sorted by (length, first) or by (first, length), whichever costs less, cut where the cost model
    above is smallest (dynamic programming over cut points: O(rows * size)).
    """
    if not firsts:
        return []
    by_length = sorted(range(len(firsts)), key=lambda r: (lengths[r], firsts[r]))
    by_first = sorted(range(len(firsts)), key=lambda r: (firsts[r], lengths[r]))
    plans = [_cheapest_cuts(order, firsts, lengths, n_layers, size, max_tokens) for order in (by_length, by_first)]
    cost, chunks = min(plans, key=lambda plan: plan[0])
    return chunks


def _cheapest_cuts(order: list[int], firsts: list[int], lengths: list[int], n_layers: int, size: int,
                   max_tokens: int) -> tuple[float, list[tuple[int, list[int]]]]:
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest forwards for order[:j]
    cut = [0] * (n + 1)  # cut[j]: where the last forward of best[j] begins
    for end in range(1, n + 1):
        longest, lowest = 0, n_layers
        for begin in range(end - 1, max(end - size, 0) - 1, -1):
            row = order[begin]
            longest, lowest = max(longest, lengths[row]), min(lowest, firsts[row])
            rows = end - begin
            if rows * longest > max_tokens and rows > 1:
                break
            cost = best[begin] + (n_layers - lowest) * (rows * longest + BLOCK_OVERHEAD_TOKENS) + BLOCK_OVERHEAD_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    chunks, end = [], n
    while end > 0:
        begin = cut[end]
        part = order[begin:end]
        chunks.append((min(firsts[row] for row in part), part))
        end = begin
    return best[n], chunks[::-1]

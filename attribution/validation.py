"""Is a ranking causal, and specific? (docs/design.md, "Methods").

Ablate a method's top-k neurons together and measure the change of the concept's log p(T); compare
with k random neurons over many draws (mean, spread, z-score, empirical p-value), with the same
ablation's change on every other concept (specificity), and with the change of the next-token loss
on neutral text (collateral damage).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from attribution.masking import NeuronMask, layer_masks, masked
from attribution.models import SiteModel
from attribution.neat import CleanPass, log_p_targets, text_batches
from attribution.batching import forward_chunks, token_lengths
from attribution.clean_cache import cached_clean_starts
from attribution.suffix_start import CleanStarts, first_layer, starting_at

Neuron = tuple[int, int]  # (layer, neuron)
# Rows of short prompts per forward on a CPU: 64 rows (a few hundred tokens) ran the 21 sets x 25
# prompts of one validate k in 2.4 s here, 256 rows in 3.3 s (larger activations, more padding).
PROMPT_BATCH_ROWS = 64


def prompt_batch_rows(device: torch.device, batch_rows: int) -> int:
    """Rows per prompt forward for a run's `batch_rows`: capped on a CPU (see PROMPT_BATCH_ROWS); a GPU
    takes the configured size."""
    return min(batch_rows, PROMPT_BATCH_ROWS) if torch.device(device).type == "cpu" else batch_rows


@dataclass(frozen=True)
class ConceptProbe:
    """One concept as the validation needs it: its clean pass and target tokens."""

    name: str
    clean: CleanPass
    target_ids: tuple[int, ...]
    prompts: tuple = ()  # attribution.prompts.Prompt: the concept's cloze prompts with gold tokens


@dataclass(frozen=True)
class ValidationResult:
    concept: str
    k: int
    top_change: float  # log p(T | top-k ablated together) - log p(T)
    random_mean: float  # the same for k random neurons, over `draws` draws
    random_std: float
    z_score: float
    p_value: float  # two-sided, empirical: share of draws at least as far from 0 as the top-k
    draws: int
    other_changes: dict[str, float] = field(default_factory=dict)  # other concept -> its change
    neutral_loss_change: float = 0.0  # mean next-token loss on neutral text, ablated - clean (nats)
    # The same ablation on real text: mean log p(gold | prompt) over the concept's prompts, ablated -
    # clean, for the top-k and for the random draws (None when the probe has no prompts).
    prompt_change: float | None = None
    prompt_random_mean: float | None = None
    # The top-k's change of mean log p(gold) on each other concept's prompts (the others' probes that
    # carry prompts): specificity on real text, own prompt_change against these.
    prompt_other_changes: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def ablation_change(model: SiteModel, probe: ConceptProbe, neurons: list[Neuron], ablate_to: Tensor,
                    ranges: tuple[Tensor, Tensor] | None = None) -> float:
    """log p(T | neurons ablated together) - log p(T), one full forward of the concept vector."""
    with masked(model, *layer_masks(neurons, ablate_to, ranges)):
        logits = model.hf(inputs_embeds=probe.clean.vector.view(1, 1, -1).to(model.device, model.dtype)).logits
    targets = torch.tensor(probe.target_ids, device=model.device)
    return float(log_p_targets(logits[:, -1], targets)[0]) - probe.clean.log_p


@torch.no_grad()
def neutral_loss(model: SiteModel, texts: list[str], masks: list[NeuronMask] = ()) -> float:
    """Mean next-token cross-entropy (nats) over the texts' real tokens, with the masks applied."""
    total, count = 0.0, 0
    with masked(model, *masks):
        for batch in text_batches(model, texts):
            logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # predicts positions 1..
            nll = -log_probs.gather(-1, batch.input_ids[:, 1:, None])[..., 0]  # [texts, pos - 1]
            keep = batch.keep[:, 1:]
            total += float((nll * keep).sum())
            count += int(keep.sum())
    return total / count


@torch.no_grad()
def prompts_log_p(model: SiteModel, prompts, masks: list[NeuronMask] = ()) -> float:
    """Mean over prompts of log p(gold | prompt) at the prompt's last real token, masks applied."""
    from attribution.prompts import prompt_batch

    batch = prompt_batch(model, list(prompts))
    with masked(model, *masks):
        logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    last = logits[torch.arange(len(prompts), device=logits.device), batch.last]  # [prompts, vocab]
    values = [log_p_targets(last[i:i + 1], torch.tensor(p.target_ids, device=last.device))[0]
              for i, p in enumerate(prompts)]
    return float(torch.stack(values).mean())


def validate_ranking_naive(model: SiteModel, probe: ConceptProbe, top: list[Neuron], ks: list[int], *,
                           others: list[ConceptProbe], ablate_to: Tensor, layers: list[int], draws: int = 20,
                           ranges: tuple[Tensor, Tensor] | None = None,
                           seed: int = 0, neutral_texts: list[str] = ()) -> list[ValidationResult]:
    """Reference for `validate_ranking`: one hooked forward per ablated set and concept. Slow by design."""
    generator = torch.Generator().manual_seed(seed)
    clean_loss = neutral_loss(model, list(neutral_texts)) if neutral_texts else 0.0
    clean_prompts = prompts_log_p(model, probe.prompts) if probe.prompts else 0.0

    def prompt_change(neurons: list[Neuron]) -> float | None:
        if not probe.prompts:
            return None
        return prompts_log_p(model, probe.prompts, layer_masks(neurons, ablate_to, ranges)) - clean_prompts

    population = len(layers) * model.d_mlp
    results = []
    for k in ks:
        chosen = top[:k]
        top_change = ablation_change(model, probe, chosen, ablate_to, ranges)
        random_changes, random_prompt_deltas = [], []
        for _ in range(draws):
            picks = torch.randperm(population, generator=generator)[:k].tolist()
            neurons = [(layers[p // model.d_mlp], p % model.d_mlp) for p in picks]
            random_changes.append(ablation_change(model, probe, neurons, ablate_to, ranges))
            random_prompt_deltas.append(prompt_change(neurons))
        changes = torch.tensor(random_changes, dtype=torch.float64)
        mean, std = float(changes.mean()), float(changes.std()) if draws > 1 else 0.0
        as_far = int((changes.abs() >= abs(top_change)).sum())
        loss = neutral_loss(model, list(neutral_texts), layer_masks(chosen, ablate_to, ranges)) if neutral_texts else 0.0
        results.append(ValidationResult(
            concept=probe.name, k=len(chosen), top_change=top_change, random_mean=mean, random_std=std,
            z_score=(top_change - mean) / std if std > 0 else float("inf"),
            p_value=(as_far + 1) / (draws + 1), draws=draws,
            other_changes={o.name: ablation_change(model, o, chosen, ablate_to, ranges) for o in others},
            neutral_loss_change=loss - clean_loss,
            prompt_change=prompt_change(chosen),
            prompt_random_mean=(float(torch.tensor(random_prompt_deltas, dtype=torch.float64).mean())
                                if probe.prompts else None),
            prompt_other_changes={o.name: prompts_log_p(model, o.prompts, layer_masks(chosen, ablate_to, ranges))
                                  - prompts_log_p(model, o.prompts) for o in others if o.prompts},
        ))
    return results


# --- The batched implementation: every ablated set of one k is a row of one forward. ---------------
#
# A row mask says, for each row of a batched forward, which neurons of a layer are ablated. The
# results equal the naive loop above up to the rounding of batched matrix multiplies (tested).


def set_masks(sets: list[list[Neuron]], d_mlp: int) -> dict[int, Tensor]:
    """Neuron sets -> layer -> [sets, d_mlp] bool: row s marks the neurons of sets[s] in that layer."""
    chosen: dict[int, Tensor] = {}
    for row, neurons in enumerate(sets):
        for layer, neuron in neurons:
            if int(layer) not in chosen:
                chosen[int(layer)] = torch.zeros(len(sets), d_mlp, dtype=torch.bool)
            chosen[int(layer)][row, int(neuron)] = True
    return chosen


@contextmanager
def row_masked(model: SiteModel, sets: list[list[Neuron]], ablate_to: Tensor,
               ranges: tuple[Tensor, Tensor] | None = None, *, repeat: int = 1) -> Iterator[None]:
    """Within the block, batch row b of every forward runs with sets[b // repeat] ablated together
    (each neuron set to ablate_to[layer, neuron]; with `ranges`, only where its activation lies inside
    [low, high], as NeuronMask does). A forward's batch must hold len(sets) * repeat rows."""
    handles = []

    def make_hook(layer: int, chosen: Tensor):
        def hook(module, args):
            acts = args[0]  # [batch, pos, d_mlp]
            if acts.shape[0] != len(sets) * repeat:
                raise ValueError(f"row_masked: a forward of {acts.shape[0]} rows for {len(sets)} sets x {repeat}")
            mask = chosen.to(acts.device).repeat_interleave(repeat, dim=0)[:, None, :]  # [batch, 1, d_mlp]
            if ranges is not None:
                low = ranges[0][layer].to(acts.device, acts.dtype)
                high = ranges[1][layer].to(acts.device, acts.dtype)
                mask = mask & (acts >= low) & (acts <= high)
            values = ablate_to[layer].to(acts.device, acts.dtype)  # [d_mlp]
            return (torch.where(mask, values, acts), *args[1:])
        return hook

    try:
        for layer, chosen in sorted(set_masks(sets, model.d_mlp).items()):
            handles.append(model.site(layer).register_forward_pre_hook(make_hook(layer, chosen)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def vector_changes(model: SiteModel, rows: list[tuple[ConceptProbe, list[Neuron]]], ablate_to: Tensor,
                   ranges: tuple[Tensor, Tensor] | None = None, *, batch_rows: int = 128) -> list[float]:
    """For each (probe, neurons): log p(T | neurons ablated together) - log p(T) of the probe's concept
    vector (`ablation_change`), every row one position of a batched forward."""
    out = []
    for chunk in _chunks(rows, batch_rows):
        embeds = torch.stack([probe.clean.vector for probe, _ in chunk]).view(len(chunk), 1, -1)  # [rows, 1, d_model]
        with row_masked(model, [neurons for _, neurons in chunk], ablate_to, ranges):
            logits = model.hf(inputs_embeds=embeds.to(model.device, model.dtype)).logits[:, -1]  # [rows, vocab]
        values = rows_log_p_targets(logits, [probe.target_ids for probe, _ in chunk])
        out.extend(value - probe.clean.log_p for value, (probe, _) in zip(values, chunk))
    return out


@torch.no_grad()
def last_position_logits(model: SiteModel, input_ids: Tensor, attention_mask: Tensor, last: Tensor) -> Tensor:
    """Logits at each row's position `last` ([rows]) only: [rows, vocab] (the head skips other positions)."""
    resid = final_residual(model, input_ids, attention_mask)
    return model.head(resid[torch.arange(resid.shape[0], device=resid.device), last.to(resid.device)])


@torch.no_grad()
def final_residual(model: SiteModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The last block's output [rows, pos, d_model] (before the final norm): the head runs only where asked."""
    captured = {}

    def keep(module, args, output):
        captured["resid"] = output[0] if isinstance(output, tuple) else output  # [rows, pos, d_model]

    handle = model.blocks[-1].register_forward_hook(keep)
    try:
        model.hf.base_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured["resid"]


@torch.no_grad()
def prompt_rows_log_p(model: SiteModel, rows: list[tuple[object, list[Neuron]]], ablate_to: Tensor,
                      ranges: tuple[Tensor, Tensor] | None = None, *,
                      batch_rows: int = PROMPT_BATCH_ROWS, starts: CleanStarts | None = None) -> list[float]:
    """For each (prompt, neurons): log p(gold | prompt) with the neurons ablated together (every position).

    prompts.Prompt rows of any prompts and sets share forwards, shortest first; rows whose prompts have
    the same text and the same set share one forward row (royalty's 25 cloze prompts are 12 texts:
    "The" comes before " king", " queen", " crown", ...), each reading its own gold from the logits.
    Each forward row starts at its set's first ablated layer (attribution/suffix_start.py) from
    `starts`, the clean block inputs of the rows' texts (default: attribution/clean_cache.py, one clean
    forward of the texts it does not hold).
    """
    from attribution.prompts import Prompt, prompt_batch

    forward_rows: dict[tuple, int] = {}  # (text, set) -> its row among the forwards
    owner = [forward_rows.setdefault((prompt.text, tuple(neurons)), len(forward_rows)) for prompt, neurons in rows]
    readers: list[list[int]] = [[] for _ in forward_rows]  # forward row -> the rows that read its logits
    for i, f in enumerate(owner):
        readers[f].append(i)
    keys = list(forward_rows)
    firsts = [first_layer(list(neurons), model.n_layers) for _, neurons in keys]
    if starts is None:
        starts = cached_clean_starts(model, [text for text, _ in keys], set(firsts), batch_rows=batch_rows)
    lengths = token_lengths(model, [text for text, _ in keys])
    out = [0.0] * len(rows)
    for layer, chunk in forward_chunks(firsts, lengths, model.n_layers, batch_rows):
        batch = prompt_batch(model, [Prompt(keys[f][0], rows[readers[f][0]][0].target_ids) for f in chunk])
        resid = starts.batch(layer, [keys[f][0] for f in chunk], batch.input_ids.shape[1])  # [rows, pos, d_model]
        with row_masked(model, [list(keys[f][1]) for f in chunk], ablate_to, ranges), \
                starting_at(model, layer, resid):
            logits = last_position_logits(model, batch.input_ids, batch.attention_mask, batch.last)  # [rows, vocab]
        reading = [(row, i) for row, f in enumerate(chunk) for i in readers[f]]
        values = rows_log_p_targets(logits[[row for row, _ in reading]],
                                    [rows[i][0].target_ids for _, i in reading])
        for (_, i), value in zip(reading, values):
            out[i] = value
    return out


def rows_log_p_targets(logits: Tensor, targets: list[tuple[int, ...]]) -> list[float]:
    """`log_p_targets` of each row with its own targets: one logsumexp over [rows, vocab]."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1)  # [rows]
    return [float((logits[row, list(ids)] - lse[row]).mean()) for row, ids in enumerate(targets)]


def prompt_log_p_sets(model: SiteModel, prompts, sets: list[list[Neuron]], ablate_to: Tensor,
                      ranges: tuple[Tensor, Tensor] | None = None, *,
                      batch_rows: int = PROMPT_BATCH_ROWS, starts: CleanStarts | None = None) -> list[float]:
    """For each neuron set: mean over prompts of log p(gold | prompt) with the set ablated together
    (`prompts_log_p`); rows (set, prompt) share forwards, sorted by prompt length ([] = clean)."""
    prompts = list(prompts)
    values = prompt_rows_log_p(model, [(p, s) for s in sets for p in prompts], ablate_to, ranges,
                               batch_rows=batch_rows, starts=starts)
    n = len(prompts)
    return [float(torch.tensor(values[j * n:(j + 1) * n], dtype=torch.float64).mean()) for j in range(len(sets))]


@torch.no_grad()
def neutral_losses(model: SiteModel, texts: list[str], sets: list[list[Neuron]], ablate_to: Tensor,
                   ranges: tuple[Tensor, Tensor] | None = None, *, batch_rows: int = 32) -> list[float]:
    """`neutral_loss` for each neuron set ([] = clean): rows (set, text) share forwards, shortest first,
    each starting at its set's first ablated layer (the clean set: the clean forward's output), and the
    head's log-softmax runs on real positions only."""
    texts = list(texts)
    lengths = token_lengths(model, texts)
    firsts = [first_layer(list(neurons), model.n_layers) for neurons in sets]
    starts = cached_clean_starts(model, texts, set(firsts), batch_rows=batch_rows)
    total = torch.zeros(len(sets), dtype=torch.float64)
    count = torch.zeros(len(sets), dtype=torch.float64)
    rows = [(j, t) for j in range(len(sets)) for t in range(len(texts))]
    for layer, chunk in forward_chunks([firsts[j] for j, _ in rows], [lengths[t] for _, t in rows],
                                       model.n_layers, batch_rows):
        batch = next(text_batches(model, [texts[rows[i][1]] for i in chunk], batch_size=len(chunk)))
        start = starts.batch(layer, [texts[rows[i][1]] for i in chunk], batch.input_ids.shape[1])
        with row_masked(model, [sets[rows[i][0]] for i in chunk], ablate_to, ranges), \
                starting_at(model, layer, start):
            resid = final_residual(model, batch.input_ids, batch.attention_mask)  # [rows, pos, d_model]
        keep = batch.keep[:, 1:] > 0  # predicted positions 1.. that are real tokens
        picked = model.head(resid[:, :-1][keep.to(resid.device)]).to(keep.device)  # [real predictions, vocab]
        nll = torch.logsumexp(picked, dim=-1) - picked.gather(-1, batch.input_ids[:, 1:][keep][:, None])[:, 0]
        owner = torch.tensor([rows[i][0] for i in chunk], device=keep.device)[:, None].expand_as(keep)[keep]
        total.index_add_(0, owner.cpu(), nll.double().cpu())
        count.index_add_(0, owner.cpu(), torch.ones_like(nll, dtype=torch.float64).cpu())
    return (total / count).tolist()


def random_sets(generator: torch.Generator, layers: list[int], d_mlp: int, k: int, draws: int) -> list[list[Neuron]]:
    """`draws` sets of k distinct neurons drawn uniformly from `layers` (the naive loop's draws, in order)."""
    population = len(layers) * d_mlp
    sets = []
    for _ in range(draws):
        picks = torch.randperm(population, generator=generator)[:k].tolist()
        sets.append([(layers[p // d_mlp], p % d_mlp) for p in picks])
    return sets


def draws_by_k(layers: list[int], d_mlp: int, ks: list[int], draws: int, seed: int) -> dict[int, list[list[Neuron]]]:
    """validate's random k-neuron sets: `draws` per k, from one generator seeded with `seed`, k in order."""
    generator = torch.Generator().manual_seed(seed)
    return {k: random_sets(generator, layers, d_mlp, k, draws) for k in ks}


def prompt_set_deltas(model: SiteModel, prompts, sets: list[list[Neuron]], ablate_to: Tensor,
                      ranges: tuple[Tensor, Tensor] | None = None) -> list[float]:
    """Each set's change of mean log p(gold) over the prompts (ablated - clean): the clean row is one
    more row of the same pass."""
    values = prompt_log_p_sets(model, prompts, [[]] + list(sets), ablate_to, ranges)
    return [value - values[0] for value in values[1:]]


def random_prompt_changes(model: SiteModel, prompts, sets_by_k: dict[int, list[list[Neuron]]], ablate_to: Tensor,
                          ranges: tuple[Tensor, Tensor] | None = None) -> dict[int, list[float]]:
    """Each random set's change of mean log p(gold) over the prompts (ablated - clean): k -> [draws].

    The random baseline of validate's prompt measure: it does not depend on the ranking, so it can be
    computed once per concept, model and intervention and reused (attribution/baseline_cache.py)."""
    deltas = iter(prompt_set_deltas(model, list(prompts), [s for k in sets_by_k for s in sets_by_k[k]], ablate_to, ranges))
    return {k: [next(deltas) for _ in sets] for k, sets in sets_by_k.items()}


def validate_ranking(model: SiteModel, probe: ConceptProbe, top: list[Neuron], ks: list[int], *,
                     others: list[ConceptProbe], ablate_to: Tensor, layers: list[int], draws: int = 20,
                     ranges: tuple[Tensor, Tensor] | None = None, seed: int = 0, neutral_texts: list[str] = (),
                     random_prompts: dict[int, list[float]] | None = None,
                     progress: Callable[[str], None] | None = None) -> list[ValidationResult]:
    """For each k: the top-k ablation against `draws` random k-neuron ablations from `layers`.

    Equals `validate_ranking_naive` (same draws, same numbers up to batched rounding): the top-k sets
    and every random draw of every k are rows of shared batched forwards (of the concept vectors, and
    of the concept's prompts), the other concepts' vectors and prompts are rows too, the clean passes
    run once (or come from attribution/clean_cache.py), and every row on text starts at its set's first
    ablated layer (attribution/suffix_start.py), in forwards grouped by attribution/batching.py.

    random_prompts: the random draws' prompt changes (`random_prompt_changes` of these draws), when
    known: then the concept's prompts are ablated with the top-k sets only.
    """
    say = progress or (lambda message: None)
    random_by_k = draws_by_k(layers, model.d_mlp, ks, draws, seed)
    losses = [0.0] * (len(ks) + 1)
    if neutral_texts:
        say(f"neutral text: clean and the top-k of {len(ks)} k")
        losses = neutral_losses(model, list(neutral_texts), [[]] + [top[:k] for k in ks], ablate_to, ranges)
    # Every k's rows share forwards: fewer, fuller forwards (each streams the weights once). The clean
    # block inputs every row starts from (its set's first ablated layer) come from the clean-state
    # cache, or one clean forward per text group; the clean rows ([]) read the last block's output.
    sets_by_k = {k: [top[:k], *random_by_k[k]] for k in ks}  # row 0: the top-k; rows 1..: the random draws
    vector_rows = [row for k in ks for row in [(probe, s) for s in sets_by_k[k]] + [(o, top[:k]) for o in others]]
    say(f"concept vectors: {len(vector_rows)} rows ({len(ks)} k x {draws + 1} sets, the top-k on {len(others)} "
        f"other concepts)")
    vector_values = iter(vector_changes(model, vector_rows, ablate_to, ranges))
    top_prompts: dict[int, float] = {}
    if probe.prompts:
        # The top-k sets, and the random draws unless their changes are known: one pass, one clean.
        own_sets = [top[:k] for k in ks]
        if random_prompts is None:
            own_sets += [s for k in ks for s in random_by_k[k]]
        say(f"own prompts: {len(own_sets)} sets on {len(probe.prompts)} prompts"
            + ("" if random_prompts is None else " (the random draws' changes known)"))
        own_deltas = iter(prompt_set_deltas(model, probe.prompts, own_sets, ablate_to, ranges))
        top_prompts = {k: next(own_deltas) for k in ks}
        if random_prompts is None:
            random_prompts = {k: [next(own_deltas) for _ in random_by_k[k]] for k in ks}
    other_rows = [(o.name, p) for o in others for p in o.prompts]
    other_values = iter([])
    if other_rows:
        say(f"panel prompts: the top-k of {len(ks)} k on {len(other_rows)} prompts of the other concepts")
        panel_sets = [[]] + [top[:k] for k in ks]
        other_values = iter(prompt_rows_log_p(model, [(p, s) for s in panel_sets for _, p in other_rows], ablate_to,
                                              ranges))
    clean_others = [next(other_values) for _ in other_rows]
    results = []
    for step, k in enumerate(ks, start=1):
        chosen, sets = top[:k], sets_by_k[k]
        changes = [next(vector_values) for _ in range(len(sets) + len(others))]
        top_change, random_changes = changes[0], changes[1:len(sets)]
        other_changes = {o.name: change for o, change in zip(others, changes[len(sets):])}
        prompt_changes = [top_prompts[k], *random_prompts[k]] if probe.prompts else None
        prompt_others: dict[str, list[float]] = {}
        for (name, _), clean in zip(other_rows, clean_others):
            prompt_others.setdefault(name, []).append(next(other_values) - clean)
        random = torch.tensor(random_changes, dtype=torch.float64)
        mean, std = float(random.mean()), float(random.std()) if draws > 1 else 0.0
        as_far = int((random.abs() >= abs(top_change)).sum())
        results.append(ValidationResult(
            concept=probe.name, k=len(chosen), top_change=top_change, random_mean=mean, random_std=std,
            z_score=(top_change - mean) / std if std > 0 else float("inf"),
            p_value=(as_far + 1) / (draws + 1), draws=draws, other_changes=other_changes,
            neutral_loss_change=losses[step] - losses[0],
            prompt_change=prompt_changes[0] if prompt_changes else None,
            prompt_random_mean=(float(torch.tensor(prompt_changes[1:], dtype=torch.float64).mean())
                                if prompt_changes else None),
            prompt_other_changes={name: float(torch.tensor(v, dtype=torch.float64).mean())
                                  for name, v in prompt_others.items()},
        ))
    return results

"""NEAT (arXiv 2508.15875, docs/design.md, "Methods"): ablate each neuron, measure the change of log p(targets).

The concept vector c (mean last-layer hidden state over the concept's examples) is fed as a
one-position input. effect_i = log p(T | neuron i ablated) - log p(T); score_i = |effect_i|.

`neat_effects` is the fast exact engine (docs/design.md, "The NEAT engine", tricks 1-3): ablation rows are
batched, only the blocks after the ablated layer are recomputed, and the ablated layer itself is
a rank-1 update of its clean output. `neat_effects_bf16` adds trick 4 (bf16 difference propagation).
`neat_effects_naive` is the one-forward-per-neuron reference.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from attribution.errors import ConceptError
from attribution.lm_head import DeferredHead, HeadMoments, head_log_p, head_moments
from attribution.masking import NeuronMask, masked, recording
from attribution.models import SiteModel
from attribution.sites import BlockClean


@dataclass(frozen=True, eq=False)
class CleanPass:
    """Everything the engines need from the unablated forward of one concept vector."""

    vector: Tensor  # [d_model] the concept vector c
    resid: tuple[Tensor, ...]  # per layer L: residual stream after block L, [d_model]
    acts: Tensor  # [n_layers, d_mlp] clean neuron activations
    log_p: float  # log p(T) of the unablated model (float32 log-softmax)
    # The clean trajectory: per layer L >= 1, block L's float32 intermediates at the one position (its
    # input is resid[L - 1]); None for block 0 (never after an ablated layer) and blocks not held.
    blocks: tuple[BlockClean | None, ...] = ()

    def to(self, device: torch.device | str) -> "CleanPass":
        """Every tensor on one device (the CPU to ship it to other actors)."""
        return CleanPass(vector=self.vector.to(device), resid=tuple(r.to(device) for r in self.resid),
                         acts=self.acts.to(device), log_p=self.log_p,
                         blocks=tuple(None if b is None else b.to(torch.device(device)) for b in self.blocks))


def log_p_targets(logits: Tensor, target_ids: Tensor) -> Tensor:  # [rows, vocab] -> [rows]
    """Mean over targets of the float32 log-softmax (float64 for a float64 model, as references use),
    without materialising the whole log-softmax."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (logits[:, target_ids] - torch.logsumexp(logits, dim=-1, keepdim=True)).mean(dim=-1)


@torch.no_grad()
def concept_vector(model: SiteModel, examples: tuple[str, ...] | list[str], *, concept: str = "") -> Tensor:
    """c = mean over examples of (mean over non-special positions of hidden_states[-1]): [d_model]."""
    per_example = []
    for batch in text_batches(model, examples, concept=concept):
        out = model.hf.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  output_hidden_states=True)
        hidden = out.hidden_states[-1].float().to(batch.keep.device)  # [texts, pos, d_model], after the final norm
        keep = batch.keep.unsqueeze(-1)  # [texts, pos, 1]
        per_example.append((hidden * keep).sum(dim=1) / keep.sum(dim=1))
    return torch.cat(per_example).mean(dim=0)


@torch.no_grad()
def concept_vectors(model: SiteModel, examples_by_concept: dict[str, tuple[str, ...]], *,
                    batch_size: int = 32) -> dict[str, Tensor]:
    """`concept_vector` of many concepts at once: every concept's examples in shared batches, sorted by
    token length so a batch pads only to its own longest example. name -> [d_model]."""
    texts = [(name, text) for name, examples in examples_by_concept.items() for text in examples]
    lengths = [len(ids) for ids in model.tokenizer([t for _, t in texts])["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    per_example: dict[int, Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        try:
            batch = next(text_batches(model, [texts[i][1] for i in chunk], batch_size=len(chunk)))
        except ConceptError:
            for i in chunk:  # raise again, one text at a time, naming the concept it belongs to
                next(text_batches(model, [texts[i][1]], concept=texts[i][0]))
            raise
        out = model.hf.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  output_hidden_states=True)
        hidden = out.hidden_states[-1].float().to(batch.keep.device)  # [texts, pos, d_model]
        keep = batch.keep.unsqueeze(-1)
        for row, i in enumerate(chunk):
            per_example[i] = (hidden[row] * keep[row]).sum(dim=0) / keep[row].sum()
    return {name: torch.stack([per_example[i] for i, (owner, _) in enumerate(texts) if owner == name]).mean(dim=0)
            for name in examples_by_concept}


@dataclass(frozen=True)
class TextBatch:
    input_ids: Tensor  # [texts, pos], right-padded
    attention_mask: Tensor  # [texts, pos]
    keep: Tensor  # [texts, pos] float: 1 at real, non-special tokens


def text_batches(model: SiteModel, texts, *, batch_size: int = 32, concept: str = ""):
    """Right-padded batches: causal attention plus the mask make real positions independent of padding."""
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        encoded = [model.tokenizer(text, return_special_tokens_mask=True) for text in chunk]
        length = max(len(e["input_ids"]) for e in encoded)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        keep = torch.zeros(len(chunk), length)
        for row, (text, enc) in enumerate(zip(chunk, encoded)):
            n = len(enc["input_ids"])
            ids[row, :n] = torch.tensor(enc["input_ids"])
            mask[row, :n] = 1
            keep[row, :n] = 1.0 - torch.tensor(enc["special_tokens_mask"], dtype=torch.float32)
            if not bool(keep[row].any()):
                raise ConceptError(f"concept {concept!r}: text {text!r} has no tokens besides special tokens")
        yield TextBatch(ids.to(model.device), mask.to(model.device), keep.to(model.device))


@torch.no_grad()
def clean_pass(model: SiteModel, vector: Tensor, target_ids: tuple[int, ...]) -> CleanPass:
    """One full forward of c as inputs_embeds [1, 1, d_model], keeping every block's output."""
    return clean_passes(model, [vector], [target_ids])[0]


@torch.no_grad()
def clean_passes(model: SiteModel, vectors: list[Tensor], target_ids: list[tuple[int, ...]], *,
                 trajectory: bool = True) -> list[CleanPass]:
    """`clean_pass` of several concept vectors, each a row of one forward ([rows, 1, d_model]; a row
    attends only to itself). `trajectory=False` leaves out the clean trajectory, which only the NEAT
    engines read (validation needs the vector and log p(T))."""
    resid: dict[int, Tensor] = {}
    handles = []

    def keep_output(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [rows, 1, d_model]
            resid[layer] = hidden[:, -1].detach().clone()
        return hook

    try:
        for layer, block in enumerate(model.blocks):
            handles.append(block.register_forward_hook(keep_output(layer)))
        embeds = torch.stack([v.view(-1) for v in vectors]).view(len(vectors), 1, -1)  # [rows, 1, d_model]
        with recording(model, range(model.n_layers)) as acts:
            logits = model.hf(inputs_embeds=embeds.to(model.device, model.dtype)).logits[:, -1]  # [rows, vocab]
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for row, (vector, targets) in enumerate(zip(vectors, target_ids)):
        clean = CleanPass(
            vector=vector,
            resid=tuple(resid[layer][row] for layer in range(model.n_layers)),  # each on its block's device
            acts=torch.stack([acts[layer][row, -1].to(model.device) for layer in range(model.n_layers)]),  # [n_layers, d_mlp]
            log_p=float(log_p_targets(logits[row:row + 1], torch.tensor(targets, device=logits.device))[0]),
        )
        out.append(with_trajectory(model, clean) if trajectory else clean)
    return out


@torch.no_grad()
def with_trajectory(model: SiteModel, clean: CleanPass) -> CleanPass:
    """`clean` with its clean trajectory: block L's intermediates from its input resid[L - 1], in float32
    on the block's device, for every block L >= 1 the replica holds (one row per block: cheap)."""
    blocks: list[BlockClean | None] = [None]
    for layer in range(1, model.n_layers):
        device = model.block_device(layer)
        if device.type == "meta":
            blocks.append(None)
            continue
        resid = clean.resid[layer - 1].to(device).view(1, -1)
        resid = resid.to(torch.promote_types(resid.dtype, torch.float32))
        blocks.append(model.arch.clean_block(model.bf16, layer, model.blocks[layer], resid))
    return replace(clean, blocks=tuple(blocks))


def placed(model: SiteModel, clean: CleanPass) -> CleanPass:
    """`clean` (e.g. on the CPU from another actor) with each layer's tensors on its block's device, once:
    a block the replica does not hold keeps its residual on the CPU and drops its trajectory."""
    def at(layer: int) -> torch.device | None:
        device = model.block_device(layer)
        return None if device.type == "meta" else device

    blocks = tuple(None if b is None or at(layer) is None else b.to(at(layer))
                   for layer, b in enumerate(clean.blocks))
    return CleanPass(vector=clean.vector.to(model.device),
                     resid=tuple(r if at(layer) is None else r.to(at(layer)) for layer, r in enumerate(clean.resid)),
                     acts=clean.acts.to(model.device), log_p=clean.log_p, blocks=blocks)


def _trajectory(model: SiteModel, clean: CleanPass, first: int) -> tuple[BlockClean | None, ...]:
    """The clean trajectory for blocks first.., computed here when `clean` was built without it."""
    if len(clean.blocks) == model.n_layers and all(clean.blocks[layer] is not None
                                                   for layer in range(max(first, 1), model.n_layers)):
        return clean.blocks
    return with_trajectory(model, clean).blocks


def neuron_index(neurons: range | tuple[int, ...], device: torch.device) -> Tensor:  # [n] int64
    """A shard's neurons (a range or explicit picks) as an index tensor."""
    if isinstance(neurons, range):
        return torch.arange(neurons.start, neurons.stop, device=device)
    return torch.tensor(neurons, dtype=torch.long, device=device)


def held_w_out_columns(model: SiteModel, layer: int, rows: Tensor) -> Tensor:  # [len(rows), d_model] float32
    """Neuron rows' output columns W_out[:, rows].T read from the held weight (no whole-matrix upcast)."""
    return model.held_w_out(layer)[:, rows].T.to(torch.promote_types(model.dtype, torch.float32))


def block_stages(model: SiteModel, after_layer: int) -> list[range]:
    """Blocks after_layer+1 .. last cut where the device changes: one stage per device of a split replica."""
    stages: list[range] = []
    for layer in range(after_layer + 1, model.n_layers):
        if stages and model.block_device(layer) == model.block_device(stages[-1].start):
            stages[-1] = range(stages[-1].start, layer + 1)
        else:
            stages.append(range(layer, layer + 1))
    return stages


def wavefront(batches: int, stages: list) -> None:
    """Run stage s on batch m for every (s, m), in wavefront order: at tick t stage s takes batch t - s,
    the later stage issued first. On a replica split over GPUs, stage s+1 computes batch m - 1 on its
    device while stage s computes batch m on its own (kernels and device-to-device copies are queued
    without a host sync); each batch still meets its stages in order, so results equal the plain loop.
    stages: callables (m) -> None that keep their batch's state themselves."""
    for tick in range(batches + len(stages) - 1):
        for s in reversed(range(len(stages))):
            if 0 <= tick - s < batches:
                stages[s](tick - s)


@torch.no_grad()
def run_blocks(model: SiteModel, resid: Tensor, after_layer: int) -> Tensor:
    """Blocks after_layer+1 .. last at one position: [rows, d_model] -> the final residual [rows, d_model]."""
    for layer in range(after_layer + 1, model.n_layers):  # rows follow the blocks of a split replica
        resid = model.arch.step(model.bf16, layer, model.blocks[layer], resid.to(model.block_device(layer)))
    return resid


@torch.no_grad()
def run_suffix(model: SiteModel, resid: Tensor, after_layer: int) -> Tensor:
    """Blocks after_layer+1 .. last, final norm and head, at one position: [rows, d_model] -> logits."""
    return model.head(run_blocks(model, resid, after_layer))


@torch.no_grad()
def neat_effects(model: SiteModel, clean: CleanPass, target_ids: tuple[int, ...], layer: int,
                 neurons: range | tuple[int, ...], ablate_to: Tensor, *, batch_rows: int = 512) -> Tensor:
    """Exact NEAT effects of `neurons` of `layer`: [len(neurons)] float32.

    ablate_to: [d_mlp] the value each neuron is set to (zeros, or reference means).
    Row 0 of every batch is the clean row, so each effect is a difference of two rows computed by
    the same kernels; rows 1.. carry resid_L + (ablate_to_i - a_i) * W_out[:, i] (trick 3).
    """
    if batch_rows < 2:
        raise ValueError(f"batch_rows must be at least 2 (one clean row plus ablations), got {batch_rows}")
    device = model.block_device(layer)  # a split or suffix replica: not necessarily model.device
    targets = torch.tensor(target_ids, device=model.head_device)
    index = neuron_index(neurons, device)
    delta = ablate_to.to(device)[index] - clean.acts[layer].to(device)[index]  # [n]
    starts = range(0, len(index), batch_rows - 1)
    state: dict[int, Tensor] = {}  # batch -> its rows where they are now
    effects: list[Tensor] = []

    def first(m: int) -> None:
        rows = index[starts[m]:starts[m] + batch_rows - 1]
        resid = clean.resid[layer].to(device).expand(len(rows) + 1, -1).clone()  # [1 + rows, d_model]
        resid[1:] += delta[starts[m]:starts[m] + len(rows), None] * held_w_out_columns(model, layer, rows)
        state[m] = resid

    def blocks(stage: range):
        def run(m: int) -> None:
            resid = state[m].to(model.block_device(stage.start), non_blocking=True)
            for later in stage:
                resid = model.arch.step(model.bf16, later, model.blocks[later], resid)
            state[m] = resid
        return run

    def last(m: int) -> None:
        log_p = head_log_p(model, state.pop(m), targets)  # [1 + rows], vocabulary in chunks
        effects.append(log_p[1:] - log_p[0])

    wavefront(len(starts), [first, *map(blocks, block_stages(model, layer)), last])
    return torch.cat(effects).float().cpu()


@torch.no_grad()
def neat_effects_bf16(model: SiteModel, clean: CleanPass, target_ids: tuple[int, ...], layer: int,
                      neurons: range | tuple[int, ...], ablate_to: Tensor, *, batch_rows: int = 512,
                      moments: HeadMoments | None = None, stats: dict | None = None) -> Tensor:
    """Near-exact NEAT effects with bf16 matrix multiplies (docs/design.md, "The NEAT engine", trick 5): [len(neurons)].

    Plain bf16 ruins the ranking (one neuron's effect is tiny next to the residual it rides on), so
    each row carries its *difference* from the clean row: matrix multiplies act on the difference in
    bf16 (their rounding is relative to the small difference) with the weights as held (once, in bf16,
    after attribution/held_weights.py), norms, activations and residual adds run in float32 on
    clean + difference, the clean row coming from the concept's cached clean trajectory (clean.blocks),
    and the head's log p(T) change from attribution/lm_head.py (a second-order expansion where its
    remainder bound is below 1e-7 nats, the whole vocabulary for the other rows at the end of the call).
    moments: the concept's head moments (computed here when not given: pass them to score many layers).
    stats: when given, its "rows" and "whole_vocabulary_rows" counts grow by this call's (benchmarks).
    """
    targets = torch.tensor(target_ids, device=model.head_device)
    if moments is None:
        moments = head_moments(model, clean.resid[-1])
    trajectory = _trajectory(model, clean, layer + 1)
    device = model.block_device(layer)
    index = neuron_index(neurons, device)
    delta = ablate_to.to(device)[index] - clean.acts[layer].to(device)[index]  # [n]
    head = DeferredHead(model, moments, targets)
    final = clean.resid[-1].to(model.head_device).view(1, -1)  # [1, d_model] float32
    starts = range(0, len(index), batch_rows)
    state: dict[int, Tensor] = {}  # batch -> its rows' differences where they are now

    def first(m: int) -> None:
        rows = index[starts[m]:starts[m] + batch_rows]
        state[m] = delta[starts[m]:starts[m] + len(rows), None] * held_w_out_columns(model, layer, rows)

    def blocks(stage: range):
        at = model.block_device(stage.start)
        cleans = [trajectory[later].to(at) for later in stage]

        def run(m: int) -> None:
            diff = state[m].to(at, non_blocking=True)  # [rows, d_model]
            for later, clean_block in zip(stage, cleans):
                diff = model.arch.diff_step(model.bf16, later, model.blocks[later], clean_block, diff)
            state[m] = diff
        return run

    wavefront(len(starts), [first, *map(blocks, block_stages(model, layer)), lambda m: head.add(final, state.pop(m))])
    effects = head.finish(batch_rows=batch_rows).float().cpu()
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + len(index)
        stats["whole_vocabulary_rows"] = stats.get("whole_vocabulary_rows", 0) + head.whole_rows
    return effects


@torch.no_grad()
def neat_effects_naive(model: SiteModel, clean: CleanPass, target_ids: tuple[int, ...], layer: int,
                       neurons: range | tuple[int, ...], ablate_to: Tensor) -> Tensor:
    """Reference: one full hooked forward per neuron. [len(neurons)] float32. Slow by design."""
    targets = torch.tensor(target_ids, device=model.device)
    embeds = clean.vector.view(1, 1, -1).to(model.device, model.dtype)
    effects = []
    for neuron in neurons:
        with masked(model, NeuronMask(layer, (neuron,), (float(ablate_to[neuron]),))):
            logits = model.hf(inputs_embeds=embeds).logits[:, -1]  # [1, vocab]
        effects.append(float(log_p_targets(logits, targets)[0]) - clean.log_p)
    return torch.tensor(effects, dtype=torch.float32)


# dtype -> engine: float32 is exact (equals the naive loop); bf16 keeps the ranking at about 2x speed.
NEAT_ENGINES = {"float32": neat_effects, "bf16": neat_effects_bf16}

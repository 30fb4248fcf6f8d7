"""NEAT (arXiv 2508.15875, docs/design.md, "Methods"): ablate each neuron, measure the change of log p(targets).

The concept vector c (mean last-layer hidden state over the concept's examples) is fed as a
one-position input. effect_i = log p(T | neuron i ablated) - log p(T); score_i = |effect_i|.

`neat_effects` is the fast exact engine (docs/design.md, "The NEAT engine", tricks 1-3): ablation rows are
batched, only the blocks after the ablated layer are recomputed, and the ablated layer itself is
a rank-1 update of its clean output. `neat_effects_bf16` adds trick 4 (bf16 difference propagation).
`neat_effects_naive` is the one-forward-per-neuron reference.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from attribution.errors import ConceptError
from attribution.lm_head import HeadMoments, head_moments, log_p_change
from attribution.masking import NeuronMask, masked, recording
from attribution.models import SiteModel


@dataclass(frozen=True, eq=False)  # compared by identity: a cache key for the head moments below
class CleanPass:
    """Everything the engine needs from the unablated forward of one concept vector."""

    vector: Tensor  # [d_model] the concept vector c
    resid: tuple[Tensor, ...]  # per layer L: residual stream after block L, [d_model]
    acts: Tensor  # [n_layers, d_mlp] clean neuron activations
    log_p: float  # log p(T) of the unablated model (float32 log-softmax)


# CleanPass -> the head moments of the bf16 engine (attribution/lm_head.py), kept while the pass lives.
_HEAD_MOMENTS: "weakref.WeakKeyDictionary[CleanPass, HeadMoments]" = weakref.WeakKeyDictionary()


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
    resid: dict[int, Tensor] = {}
    handles = []

    def keep_output(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # [1, 1, d_model]
            resid[layer] = hidden[0, -1].detach().clone()
        return hook

    try:
        for layer, block in enumerate(model.blocks):
            handles.append(block.register_forward_hook(keep_output(layer)))
        with recording(model, range(model.n_layers)) as acts:
            logits = model.hf(inputs_embeds=vector.view(1, 1, -1).to(model.device, model.dtype)).logits
    finally:
        for handle in handles:
            handle.remove()
    targets = torch.tensor(target_ids, device=logits.device)
    return CleanPass(
        vector=vector,
        resid=tuple(resid[layer] for layer in range(model.n_layers)),  # each on its block's device
        acts=torch.stack([acts[layer][0, -1].to(model.device) for layer in range(model.n_layers)]),  # [n_layers, d_mlp]
        log_p=float(log_p_targets(logits[:, -1], targets)[0]),
    )


def neuron_index(neurons: range | tuple[int, ...], device: torch.device) -> Tensor:  # [n] int64
    """A shard's neurons (a range or explicit picks) as an index tensor."""
    if isinstance(neurons, range):
        return torch.arange(neurons.start, neurons.stop, device=device)
    return torch.tensor(neurons, dtype=torch.long, device=device)


@torch.no_grad()
def run_suffix(model: SiteModel, resid: Tensor, after_layer: int) -> Tensor:
    """Blocks after_layer+1 .. last, final norm and head, at one position: [rows, d_model] -> logits."""
    for layer in range(after_layer + 1, model.n_layers):  # rows follow the blocks of a split replica
        resid = model.arch.step(model.blocks[layer], resid.to(model.block_device(layer)))
    return model.head(resid)


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
    w_out = model.w_out(layer)  # [d_model, d_mlp]
    index = neuron_index(neurons, device)
    delta = ablate_to.to(device)[index] - clean.acts[layer].to(device)[index]  # [n]
    effects = []
    for chunk in range(0, len(index), batch_rows - 1):
        rows = index[chunk:chunk + batch_rows - 1]
        resid = clean.resid[layer].to(device).expand(len(rows) + 1, -1).clone()  # [1 + rows, d_model]
        resid[1:] += delta[chunk:chunk + len(rows), None] * w_out[:, rows].T
        log_p = log_p_targets(run_suffix(model, resid, layer), targets)  # [1 + rows]
        effects.append(log_p[1:] - log_p[0])
    return torch.cat(effects).float().cpu()


@torch.no_grad()
def neat_effects_bf16(model: SiteModel, clean: CleanPass, target_ids: tuple[int, ...], layer: int,
                      neurons: range | tuple[int, ...], ablate_to: Tensor, *, batch_rows: int = 512) -> Tensor:
    """Near-exact NEAT effects with bf16 matrix multiplies (docs/design.md, "The NEAT engine", trick 5): [len(neurons)].

    Plain bf16 ruins the ranking (one neuron's effect is tiny next to the residual it rides on), so
    each row carries its *difference* from the float32 clean row: matrix multiplies act on the
    difference in bf16 (their rounding is relative to the small difference), norms, activations and
    residual adds run in float32 on clean + difference, and the head's log p(T) change comes from
    attribution/lm_head.py (a second-order expansion where its remainder bound is below 1e-7 nats,
    the whole vocabulary elsewhere).
    """
    device = model.block_device(layer)
    targets = torch.tensor(target_ids, device=model.head_device)
    moments = _HEAD_MOMENTS.get(clean)
    if moments is None:  # once per concept and actor: every shard of the concept reuses them
        moments = _HEAD_MOMENTS[clean] = head_moments(model, clean.resid[-1])
    w_out = model.w_out(layer)  # [d_model, d_mlp]
    index = neuron_index(neurons, device)
    delta = ablate_to.to(device)[index] - clean.acts[layer].to(device)[index]  # [n]
    effects = []
    for chunk in range(0, len(index), batch_rows):
        rows = index[chunk:chunk + batch_rows]
        resid = clean.resid[layer].to(device).view(1, -1)  # [1, d_model] float32
        diff = delta[chunk:chunk + len(rows), None] * w_out[:, rows].T  # [rows, d_model], exact rank-1
        for later in range(layer + 1, model.n_layers):  # rows follow the blocks of a split replica
            at = model.block_device(later)
            resid, diff = model.arch.diff_step(model.bf16, model.blocks[later], resid.to(at), diff.to(at))
        effects.append(log_p_change(model, moments, resid, diff, targets))
    return torch.cat(effects).float().cpu()


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

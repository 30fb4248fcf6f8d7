"""An independent, deliberately plain NEAT (docs/design.md, "Methods") written only with torch and transformers.

It shares no code with the package (attribution/, cluster/, storage/, jobs/): its own loading, its own
tokenization (one text at a time, never padded), its own hooks on the neuron sites, one full forward
per neuron and a float64 log-softmax. The exactness tests compare the package's engines against it.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

LLAMA_LIKE = ("llama", "mistral", "qwen2")  # the neuron is the input of mlp.down_proj


def load(path: str, dtype: torch.dtype = torch.float32):
    """The causal LM in `dtype` (float64 for the truth the float32 and bf16 engines are measured against)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(path)


def blocks(model):
    if model.config.model_type == "gpt2":
        return model.transformer.h
    if model.config.model_type in LLAMA_LIKE:
        return model.model.layers
    raise ValueError(f"naive_neat knows no neuron site for {model.config.model_type!r}")


def site(model, layer: int):
    """The module whose input is layer `layer`'s neuron vector [batch, pos, d_mlp]."""
    block = blocks(model)[layer]
    return block.mlp.c_proj if model.config.model_type == "gpt2" else block.mlp.down_proj


def target_ids(tokenizer, words) -> list[int]:
    """First real token of " " + word per word (a bare-space piece is skipped), duplicates dropped."""
    ids = []
    for word in words:
        pieces = [t for t in tokenizer.encode(" " + word, add_special_tokens=False)
                  if tokenizer.convert_ids_to_tokens(t) not in ("▁", "Ġ")]
        if pieces[0] not in ids:
            ids.append(pieces[0])
    return ids


def _real(tokenizer, text: str):
    """(input_ids [1, pos], real [pos] bool): the tokenizer's own special-token mask, no padding."""
    enc = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
    return enc["input_ids"], enc["special_tokens_mask"][0] == 0


@torch.no_grad()
def concept_vector(model, tokenizer, examples) -> torch.Tensor:
    """Mean over examples of the mean last hidden state over each example's non-special tokens: [d_model]."""
    means = []
    for text in examples:
        ids, real = _real(tokenizer, text)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]  # [pos, d_model]
        means.append(hidden[real].mean(0))
    return torch.stack(means).mean(0)


@torch.no_grad()
def reference_means(model, tokenizer, texts) -> torch.Tensor:
    """Every neuron's mean activation over all non-special tokens of the texts (pooled, not per text),
    read at the input of each layer's site: [n_layers, d_mlp] float64."""
    n_layers = len(blocks(model))
    total, count = None, 0
    for text in texts:
        ids, real = _real(tokenizer, text)
        seen = {}
        handles = [site(model, layer).register_forward_pre_hook(
            lambda module, args, layer=layer: seen.__setitem__(layer, args[0][0].double()))
            for layer in range(n_layers)]
        try:
            model(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
        sums = torch.stack([seen[layer][real].sum(0) for layer in range(n_layers)])  # [n_layers, d_mlp]
        total = sums if total is None else total + sums
        count += int(real.sum())
    return total / count


@torch.no_grad()
def log_p(model, vector, targets, hook=None, layer=None) -> float:
    """Mean over targets of the float64 log-softmax of the concept vector's one-position forward."""
    handle = site(model, layer).register_forward_pre_hook(hook) if hook else None
    try:
        logits = model(inputs_embeds=vector.view(1, 1, -1).to(model.dtype)).logits[0, -1].double()
    finally:
        if handle:
            handle.remove()
    return float(torch.log_softmax(logits, dim=-1)[list(targets)].mean())


def vector_effects(model, vector, targets, layer: int, neurons, values=None) -> list[float]:
    """effect_i = log p(T | neuron i of `layer` set to values[i] (0 if None)) - log p(T)."""
    base = log_p(model, vector, targets)
    out = []
    for neuron in neurons:
        value = 0.0 if values is None else float(values[neuron])

        def ablate(module, args, neuron=neuron, value=value):
            acts = args[0].clone()
            acts[..., neuron] = value
            return (acts,)
        out.append(log_p(model, vector, targets, ablate, layer) - base)
    return out


def effects(model, tokenizer, examples, words, layer: int, neurons, means=None) -> list[float]:
    """NEAT effects of `neurons` of `layer`, one full forward per neuron: zero ablation, or mean
    ablation with `means` ([n_layers, d_mlp], from `reference_means`)."""
    vector = concept_vector(model, tokenizer, examples)
    values = None if means is None else means[layer]
    return vector_effects(model, vector, target_ids(tokenizer, words), layer, neurons, values)


def prompt_log_p(hf, tokenizer, prompt, neurons, values) -> float:
    """log p(gold | prompt.text), mean over prompt.target_ids (float64 log-softmax): one prompt, never
    padded, the (layer, neuron)s set to `values[layer][neuron]` at every position."""
    enc = tokenizer(prompt.text, return_tensors="pt", return_special_tokens_mask=True)
    last = int((enc["special_tokens_mask"][0] == 0).nonzero().max())
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(layer, []).append(neuron)

    def hook(layer):
        def set_neurons(module, args):
            acts = args[0].clone()
            for neuron in by_layer[layer]:
                acts[..., neuron] = values[layer][neuron]
            return (acts,)
        return set_neurons

    handles = [site(hf, layer).register_forward_pre_hook(hook(layer)) for layer in by_layer]
    try:
        with torch.no_grad():
            logits = hf(input_ids=enc["input_ids"]).logits[0, last].double()
    finally:
        for h in handles:
            h.remove()
    log_probs = torch.log_softmax(logits, dim=-1)
    return float(log_probs[list(prompt.target_ids)].mean())

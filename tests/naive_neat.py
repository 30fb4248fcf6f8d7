"""An independent, deliberately plain NEAT (docs/design.md, "Methods") written only with torch and transformers.

It shares no code with attribution/: one full forward per neuron, a hook that zeroes the neuron at
the input of the MLP output projection, float32 log-softmax. Used to check the atlas's scores.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(path)


def site(model, layer: int):
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].mlp.c_proj
    return model.model.layers[layer].mlp.down_proj


def target_ids(tokenizer, words) -> list[int]:
    ids = []
    for word in words:
        pieces = [t for t in tokenizer.encode(" " + word, add_special_tokens=False)
                  if tokenizer.convert_ids_to_tokens(t) not in ("▁", "Ġ")]
        if pieces[0] not in ids:
            ids.append(pieces[0])
    return ids


@torch.no_grad()
def concept_vector(model, tokenizer, examples) -> torch.Tensor:
    means = []
    for text in examples:
        enc = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
        hidden = model(input_ids=enc["input_ids"], output_hidden_states=True).hidden_states[-1][0]
        means.append(hidden[enc["special_tokens_mask"][0] == 0].mean(0))
    return torch.stack(means).mean(0)


@torch.no_grad()
def log_p(model, vector, targets, hook=None, layer=None) -> float:
    handle = site(model, layer).register_forward_pre_hook(hook) if hook else None
    try:
        logits = model(inputs_embeds=vector.view(1, 1, -1)).logits[0, -1].float()
    finally:
        if handle:
            handle.remove()
    return float(torch.log_softmax(logits, dim=-1)[targets].mean())


def effects(model, tokenizer, examples, words, layer: int, neurons) -> list[float]:
    """effect_i = log p(T | neuron i of `layer` zeroed) - log p(T), one full forward per neuron."""
    vector = concept_vector(model, tokenizer, examples)
    targets = target_ids(tokenizer, words)
    base = log_p(model, vector, targets)
    out = []
    for neuron in neurons:
        def zero(module, args, neuron=neuron):
            acts = args[0].clone()
            acts[..., neuron] = 0.0
            return (acts,)
        out.append(log_p(model, vector, targets, zero, layer) - base)
    return out

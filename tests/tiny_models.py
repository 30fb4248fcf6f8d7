"""Tiny random-weight models of the supported architectures, saved as real HF directories."""
from __future__ import annotations

from pathlib import Path

import torch

from attribution.models import ModelSource, load_tokenizer, resolve_model_source, weights_revision


def smollm2_tokenizer():
    return load_tokenizer(resolve_model_source("smollm2-135m"))


def tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    # GQA (4 query heads over 2 key/value heads) so the engine's head mapping is exercised.
    gated = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        return LlamaConfig(**gated)
    if family == "mistral":
        return MistralConfig(**gated, sliding_window=16)
    if family == "qwen2":  # Q/K/V projections with biases
        return Qwen2Config(**gated)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=64, n_inner=128, n_layer=4, n_head=4, n_positions=128,
                          bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


def save_tiny_model(family: str, directory: Path, *, seed: int = 0) -> ModelSource:
    """A seeded random-weight causal LM with the SmolLM2 tokenizer, as a safetensors directory."""
    from transformers import AutoModelForCausalLM

    tokenizer = smollm2_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    # Random init is small; scale the MLPs up so that single neurons move log p measurably.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp" in name and param.dim() == 2:
                param.mul_(4.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return ModelSource(name=f"tiny-{family}", path=str(directory), revision=weights_revision(directory))

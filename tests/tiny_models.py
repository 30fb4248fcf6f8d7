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


def save_tiny_model(family: str, directory: Path, *, seed: int = 0, bos: bool = False) -> ModelSource:
    """A seeded random-weight causal LM with the SmolLM2 tokenizer, as a safetensors directory.

    bos: the saved tokenizer starts every text with a special BOS token (SmolLM2's adds none), so a
    mean or concept vector that averages special tokens in differs from one that leaves them out.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = smollm2_tokenizer()
    if bos:
        from tokenizers.processors import TemplateProcessing

        token = tokenizer.bos_token
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{token} $A", pair=f"{token} $A {token} $B",
            special_tokens=[(token, tokenizer.convert_tokens_to_ids(token))])
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


def hook_counts(model) -> list[tuple[int, int]]:
    """Forward pre-hooks and hooks per module: compare before and after to find a leaked hook
    (transformers keeps hooks of its own once hidden states were recorded)."""
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.hf.modules()]


def save_tiny_encoder(family: str, directory: Path, *, seed: int = 0) -> ModelSource:
    """A seeded random-weight BERT or RoBERTa encoder (2 layers, d_mlp 48) with MiniLM-L6's WordPiece
    tokenizer ([CLS] ... [SEP]), as a safetensors directory."""
    from transformers import AutoModel, BertConfig, RobertaConfig

    tokenizer = load_tokenizer(resolve_model_source("minilm-l6"))
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    config = BertConfig(**shape) if family == "bert" else RobertaConfig(**shape, type_vocab_size=1)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return ModelSource(name=f"tiny-{family}", path=str(directory), revision=weights_revision(directory))


@torch.no_grad()
def plain_neurons(model, texts: list[str]):
    """Test oracle: every layer's neuron vector recomputed from the MLP's own modules, not read at the site.

    One padded batch, the tokenizer's own padding and special-token mask. Returns (acts [texts, layers,
    pos, d_mlp] float64, real [texts, pos] bool: attended and not a special token).
    GPT-2: GELU output of `mlp.act`; Llama: act_fn(gate_proj(x)) * up_proj(x) from the MLP's input x;
    BERT/RoBERTa: F.gelu(intermediate.dense(x)).
    """
    import torch.nn.functional as F

    family = model.arch.family
    enc = model.tokenizer(list(texts), padding=True, return_tensors="pt", return_special_tokens_mask=True)
    special = enc.pop("special_tokens_mask").bool()
    outs: list[torch.Tensor] = []
    if family == "gpt2":
        hooks = [(b.mlp.act, lambda m, a, o: outs.append(o)) for b in model.blocks]
    elif family == "llama":
        hooks = [(b.mlp, lambda m, a, o: outs.append(m.act_fn(m.gate_proj(a[0])) * m.up_proj(a[0]))) for b in model.blocks]
    elif family == "bert":
        hooks = [(b.intermediate.dense, lambda m, a, o: outs.append(F.gelu(o))) for b in model.blocks]
    else:
        raise ValueError(family)
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        if model.is_encoder:
            model.hf(**enc)
        else:
            model.hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    acts = torch.stack(outs, dim=1).double()  # [texts, layers, pos, d_mlp]
    return acts.numpy(), (enc["attention_mask"].bool() & ~special).numpy()

"""Neuron sites and the single-position block step, declared once per architecture family.

A neuron is one coordinate of the input of the MLP's output projection (DESIGN.md section 3).
`step` runs one transformer block on a batch of single-position residuals: with one position,
attention is a softmax over one key (= 1), so its output is `o_proj(v)` and Q/K are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from attribution.errors import ModelError


def _llama_step(block: nn.Module, resid: Tensor) -> Tensor:  # [rows, d_model] -> [rows, d_model]
    attn = block.self_attn
    x = block.input_layernorm(resid)
    v = attn.v_proj(x)  # [rows, n_kv_heads * head_dim]
    rows = v.shape[0]
    n_rep = attn.num_key_value_groups  # query heads per key/value head (GQA)
    n_kv = v.shape[1] // attn.head_dim
    # Query head j reads key/value head j // n_rep, as transformers' repeat_kv does.
    v = v.view(rows, n_kv, 1, attn.head_dim).expand(rows, n_kv, n_rep, attn.head_dim)
    resid = resid + attn.o_proj(v.reshape(rows, n_kv * n_rep * attn.head_dim))
    return resid + block.mlp(block.post_attention_layernorm(resid))


def _gpt2_step(block: nn.Module, resid: Tensor) -> Tensor:  # [rows, d_model] -> [rows, d_model]
    d_model = resid.shape[-1]
    c_attn = block.attn.c_attn  # Conv1D: weight [d_model, 3 * d_model] = [q | k | v]
    v = torch.addmm(c_attn.bias[2 * d_model:], block.ln_1(resid), c_attn.weight[:, 2 * d_model:])
    resid = resid + block.attn.c_proj(v)
    return resid + block.mlp(block.ln_2(resid))


@dataclass(frozen=True)
class Architecture:
    """Where the neurons of one architecture family live, and how to run its blocks at one position."""

    family: str
    model_types: tuple[str, ...]  # transformers `config.model_type` values of the family
    blocks: Callable[[nn.Module], nn.ModuleList]
    site: Callable[[nn.Module], nn.Module]  # block -> module whose *input* is the neuron vector
    w_out: Callable[[nn.Module], Tensor]  # block -> [d_model, d_mlp]: column i is neuron i's write
    final_norm: Callable[[nn.Module], nn.Module]
    step: Callable[[nn.Module, Tensor], Tensor]
    block_macs: Callable[[object], int]  # transformers config -> multiply-adds of `step` for one row


def head_macs(config) -> int:
    """Multiply-adds of the LM head for one row: the whole vocabulary, needed for the exact log-softmax."""
    return config.vocab_size * _d_model(config)


def _d_model(config) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def _llama_macs(config) -> int:
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return d * kv_heads * head_dim + heads * head_dim * d + 3 * d * config.intermediate_size


def _gpt2_macs(config) -> int:
    d_mlp = config.n_inner or 4 * config.n_embd
    return 2 * config.n_embd * config.n_embd + 2 * config.n_embd * d_mlp


LLAMA = Architecture(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    blocks=lambda model: model.model.layers,
    site=lambda block: block.mlp.down_proj,
    w_out=lambda block: block.mlp.down_proj.weight,  # nn.Linear: [d_model, d_mlp]
    final_norm=lambda model: model.model.norm,
    step=_llama_step,
    block_macs=_llama_macs,
)

GPT2 = Architecture(
    family="gpt2",
    model_types=("gpt2",),
    blocks=lambda model: model.transformer.h,
    site=lambda block: block.mlp.c_proj,
    w_out=lambda block: block.mlp.c_proj.weight.T,  # Conv1D weight is [d_mlp, d_model]
    final_norm=lambda model: model.transformer.ln_f,
    step=_gpt2_step,
    block_macs=_gpt2_macs,
)

ARCHITECTURES: tuple[Architecture, ...] = (LLAMA, GPT2)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ARCHITECTURES for t in a.model_types)


def architecture_for(model_type: str, *, model_name: str = "") -> Architecture:
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    where = f" of model {model_name}" if model_name else ""
    raise ModelError(
        f"architecture {model_type!r}{where} is not supported: "
        f"supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
    )

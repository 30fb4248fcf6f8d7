"""Neuron sites and the single-position block step, declared once per architecture family.

A neuron is one coordinate of the input of the MLP's output projection (docs/design.md, "What a neuron is").
`step` runs one transformer block on a batch of single-position residuals: with one position,
attention is a softmax over one key (= 1), so its output is `o_proj(v)` and Q/K are skipped.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from attribution.errors import ModelError


_FOLDED_O_PROJ: "weakref.WeakKeyDictionary[nn.Module, Tensor]" = weakref.WeakKeyDictionary()


def _llama_step(block: nn.Module, resid: Tensor) -> Tensor:  # [rows, d_model] -> [rows, d_model]
    attn = block.self_attn
    v = attn.v_proj(block.input_layernorm(resid))  # [rows, n_kv_heads * head_dim]
    # o_proj(repeat_kv(v)) with the repeated heads folded into o_proj: 1/n_rep of its multiply-adds.
    folded = _FOLDED_O_PROJ.get(attn)
    if folded is None:
        folded = _FOLDED_O_PROJ[attn] = _fold_kv_heads(attn).detach().contiguous()
    resid = resid + torch.nn.functional.linear(v, folded, attn.o_proj.bias)
    return resid + block.mlp(block.post_attention_layernorm(resid))


def _gpt2_step(block: nn.Module, resid: Tensor) -> Tensor:  # [rows, d_model] -> [rows, d_model]
    d_model = resid.shape[-1]
    c_attn = block.attn.c_attn  # Conv1D: weight [d_model, 3 * d_model] = [q | k | v]
    v = torch.addmm(c_attn.bias[2 * d_model:], block.ln_1(resid), c_attn.weight[:, 2 * d_model:])
    resid = resid + block.attn.c_proj(v)
    return resid + block.mlp(block.ln_2(resid))


def _expand_kv_heads(attn: nn.Module, v: Tensor) -> Tensor:  # [rows, n_kv * hd] -> [rows, n_heads * hd]
    """Query head j reads key/value head j // n_rep (GQA), as transformers' repeat_kv does."""
    rows = v.shape[0]
    n_rep = attn.num_key_value_groups
    n_kv = v.shape[1] // attn.head_dim
    v = v.view(rows, n_kv, 1, attn.head_dim).expand(rows, n_kv, n_rep, attn.head_dim)
    return v.reshape(rows, n_kv * n_rep * attn.head_dim)


def _fold_kv_heads(attn: nn.Module) -> Tensor:  # o_proj weight [d_model, n_heads * hd] -> [d_model, n_kv * hd]
    """o_proj(repeat_kv(v)) == v @ folded.T: the query heads sharing a key/value head sum their columns."""
    weight = attn.o_proj.weight
    n_rep, head_dim = attn.num_key_value_groups, attn.head_dim
    return weight.view(weight.shape[0], -1, n_rep, head_dim).sum(dim=2).reshape(weight.shape[0], -1)


def _llama_diff_step(matmul: LowPrecisionMatmul, block: nn.Module, clean: Tensor, diff: Tensor) -> tuple[Tensor, Tensor]:
    """One block on (clean [1, d_model] float32, diff [rows, d_model]): matrix multiplies act on the
    difference in low precision (biases cancel); norms and the gated activation run in float32 on
    clean + diff. Returns the clean output and the rows' differences from it. Updates `diff` in place."""
    attn, mlp = block.self_attn, block.mlp
    w_v = matmul.weight((id(block), "v"), lambda: attn.v_proj.weight)
    w_o = matmul.weight((id(block), "o"), lambda: _fold_kv_heads(attn))
    w_gate_up = matmul.weight((id(block), "gate_up"), lambda: torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    w_down = matmul.weight((id(block), "down"), lambda: mlp.down_proj.weight)

    x = block.input_layernorm(clean)
    dx = block.input_layernorm(clean + diff).sub_(x)
    mid = clean + attn.o_proj(_expand_kv_heads(attn, attn.v_proj(x)))
    dmid = diff.add_(matmul.mm(matmul.mm(dx, w_v, low_output=True), w_o))
    y = block.post_attention_layernorm(mid)
    dy = block.post_attention_layernorm(mid + dmid).sub_(y)
    gate, up = mlp.gate_proj(y), mlp.up_proj(y)  # [1, d_mlp]
    acts = mlp.act_fn(gate) * up
    dgate, dup = matmul.mm(dy, w_gate_up).split(gate.shape[-1], dim=-1)  # [rows, d_mlp] each
    dacts = mlp.act_fn(dgate.add_(gate)).mul_(dup.add_(up)).sub_(acts)
    return mid + mlp.down_proj(acts), dmid.add_(matmul.mm(dacts, w_down))


def _gpt2_diff_step(matmul: LowPrecisionMatmul, block: nn.Module, clean: Tensor, diff: Tensor) -> tuple[Tensor, Tensor]:
    """GPT-2 version of `_llama_diff_step` (Conv1D weights are [in, out]: their transposes are used)."""
    d_model = clean.shape[-1]
    c_attn, mlp = block.attn.c_attn, block.mlp
    w_v = matmul.weight((id(block), "v"), lambda: c_attn.weight[:, 2 * d_model:].T)
    w_o = matmul.weight((id(block), "o"), lambda: block.attn.c_proj.weight.T)
    w_fc = matmul.weight((id(block), "fc"), lambda: mlp.c_fc.weight.T)
    w_proj = matmul.weight((id(block), "proj"), lambda: mlp.c_proj.weight.T)

    x = block.ln_1(clean)
    dx = block.ln_1(clean + diff).sub_(x)
    v = torch.addmm(c_attn.bias[2 * d_model:], x, c_attn.weight[:, 2 * d_model:])
    mid = clean + block.attn.c_proj(v)
    dmid = diff.add_(matmul.mm(matmul.mm(dx, w_v, low_output=True), w_o))
    y = block.ln_2(mid)
    dy = block.ln_2(mid + dmid).sub_(y)
    hidden = mlp.c_fc(y)
    acts = mlp.act(hidden)
    dacts = mlp.act(matmul.mm(dy, w_fc).add_(hidden)).sub_(acts)
    return mid + mlp.c_proj(acts), dmid.add_(matmul.mm(dacts, w_proj))


class LowPrecisionMatmul:
    """x [rows, in] @ weight.T in bf16 with a float32 result; bf16 weight copies made once and kept."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.weights: dict[object, Tensor] = {}

    def weight(self, key: object, make: Callable[[], Tensor]) -> Tensor:  # -> [out, in] in self.dtype
        low = self.weights.get(key)
        if low is None:
            low = self.weights[key] = make().detach().to(self.dtype).contiguous()
        return low

    def mm(self, x: Tensor, low_weight: Tensor, *, low_output: bool = False) -> Tensor:  # [rows, in] -> [rows, out]
        """float32 result, or the low-precision one when it only feeds another matrix multiply."""
        out = torch.nn.functional.linear(x.to(self.dtype), low_weight)
        return out if low_output else out.float()

    def __call__(self, x: Tensor, weight: Tensor) -> Tensor:  # weight: [out, in], any float dtype
        return self.mm(x, self.weight((weight.data_ptr(), tuple(weight.shape), tuple(weight.stride())),
                                      lambda: weight))


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
    diff_step: Callable[..., tuple[Tensor, Tensor]]  # (matmul, block, clean, diff) -> (clean, diff)
    encoder: bool = False  # no LM head: only the probing methods (neuronlens, selectivity) apply


def head_macs(config) -> int:
    """Multiply-adds of the LM head for one row: the whole vocabulary, needed for the exact log-softmax."""
    return config.vocab_size * _d_model(config)


def _d_model(config) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def _llama_macs(config) -> int:
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    # V projection, o_proj with the repeated key/value heads folded in, gated MLP (Q and K skipped).
    return 2 * d * kv_heads * head_dim + 3 * d * config.intermediate_size


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
    diff_step=_llama_diff_step,
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
    diff_step=_gpt2_diff_step,
)

def _no_lm_head(*args, **kwargs):
    raise ModelError("an encoder has no LM head: NEAT, AtP, NeurGrad, NEG and IG need a causal LM "
                     "(encoders support the methods neuronlens and selectivity)")


def _bert_macs(config) -> int:
    d, d_mlp = config.hidden_size, config.intermediate_size
    return 4 * d * d + 2 * d * d_mlp  # Q, K, V, O and the two MLP matrices


BERT = Architecture(  # BERT-family encoders (MiniLM), loaded with AutoModel: the model is the encoder
    family="bert",
    model_types=("bert", "roberta"),  # RobertaModel has the same encoder.layer[L].output.dense
    blocks=lambda model: model.encoder.layer,
    site=lambda block: block.output.dense,  # its input is GELU(intermediate.dense(x)): [batch, pos, d_mlp]
    w_out=lambda block: block.output.dense.weight,  # nn.Linear: [d_model, d_mlp]
    final_norm=_no_lm_head,
    step=_no_lm_head,
    block_macs=_bert_macs,
    diff_step=_no_lm_head,
    encoder=True,
)

ARCHITECTURES: tuple[Architecture, ...] = (LLAMA, GPT2, BERT)
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

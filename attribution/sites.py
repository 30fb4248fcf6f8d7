"""Neuron sites and the single-position block step, declared once per architecture family.

A neuron is one coordinate of the input of the MLP's output projection (docs/design.md, "What a neuron is").
`step` runs one transformer block on a batch of single-position residuals: with one position,
attention is a softmax over one key (= 1), so its output is `o_proj(v)` and Q/K are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from attribution.errors import ModelError


def held_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """The tensor a module holds for `name`: the bf16 original when `hold_in_bf16` parametrized it
    (reading `module.weight` would make a float32 copy), else the parameter itself."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return parametrizations[name].original
    return getattr(module, name)


@dataclass(frozen=True)
class BlockClean:
    """One block's clean intermediates at the concept's one position, float32, each [1, width]:
    the bf16 engine propagates differences from these instead of recomputing the clean row."""

    values: dict  # name -> [1, width]: "resid" (the block's input) and the architecture's intermediates

    def __getitem__(self, name: str) -> Tensor:
        return self.values[name]

    def to(self, device: torch.device) -> "BlockClean":
        if all(v.device == device for v in self.values.values()):
            return self
        return BlockClean({k: v.to(device) for k, v in self.values.items()})


def _llama_step(weights: "EngineWeights", layer: int, block: nn.Module, resid: Tensor) -> Tensor:
    """[rows, d_model] -> [rows, d_model], float32 (a bf16-held block is upcast as it is read)."""
    attn = block.self_attn
    v = attn.v_proj(block.input_layernorm(resid))  # [rows, n_kv_heads * head_dim]
    # o_proj(repeat_kv(v)) with the repeated heads folded into o_proj: 1/n_rep of its multiply-adds.
    resid = resid + torch.nn.functional.linear(v, _folded_o(weights, layer, attn, resid.dtype), attn.o_proj.bias)
    return resid + block.mlp(block.post_attention_layernorm(resid))


def _gpt2_step(weights: "EngineWeights", layer: int, block: nn.Module, resid: Tensor) -> Tensor:
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


def _fold_kv_heads(attn: nn.Module, weight: Tensor | None = None) -> Tensor:
    """o_proj weight [d_model, n_heads * hd] -> [d_model, n_kv * hd], in float32 (or the model's dtype):
    o_proj(repeat_kv(v)) == v @ folded.T: the query heads sharing a key/value head sum their columns."""
    weight = attn.o_proj.weight if weight is None else weight
    n_rep, head_dim = attn.num_key_value_groups, attn.head_dim
    if n_rep == 1:
        return weight
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))  # sum in float32, round once
    return weight.view(weight.shape[0], -1, n_rep, head_dim).sum(dim=2).reshape(weight.shape[0], -1)


def _folded_o(weights: "EngineWeights", layer: int, attn: nn.Module, dtype: torch.dtype) -> Tensor:
    """The folded o_proj in the computation's dtype: made once and kept for a float32-held model; folded
    per read (a one-layer temporary, like every read of a held weight) when o_proj is held in bf16."""
    if parametrize.is_parametrized(attn.o_proj):
        return _fold_kv_heads(attn).to(dtype)
    return weights.derived((layer, "o_folded", dtype), lambda: _fold_kv_heads(attn).to(dtype))


@torch.no_grad()
def _llama_clean_block(weights: "EngineWeights", layer: int, block: nn.Module, resid: Tensor) -> BlockClean:
    """Block `layer`'s clean intermediates from its input resid [1, d_model], float32."""
    attn, mlp = block.self_attn, block.mlp
    x = block.input_layernorm(resid)
    mid = resid + torch.nn.functional.linear(attn.v_proj(x), _folded_o(weights, layer, attn, resid.dtype),
                                             attn.o_proj.bias)
    y = block.post_attention_layernorm(mid)
    gate, up = mlp.gate_proj(y), mlp.up_proj(y)  # [1, d_mlp]
    return BlockClean({"resid": resid, "mid": mid, "gate": gate, "up": up, "acts": mlp.act_fn(gate) * up})


def _llama_diff_step(weights: "EngineWeights", layer: int, block: nn.Module, clean: BlockClean,
                     diff: Tensor) -> Tensor:
    """One block on diff [rows, d_model] (each row's difference from the clean row): matrix multiplies
    act on the difference in bf16 (biases cancel); norms and the gated activation run in float32 on
    clean + diff, from the block's cached clean intermediates. Returns the output difference
    (updates `diff` in place)."""
    attn, mlp = block.self_attn, block.mlp
    w_v = weights.low((layer, "v"), lambda: held_weight(attn.v_proj))
    w_o = weights.low((layer, "o"), lambda: _fold_kv_heads(attn, held_weight(attn.o_proj)))
    w_gate_up = weights.low((layer, "gate_up"),
                            lambda: torch.cat([held_weight(mlp.gate_proj), held_weight(mlp.up_proj)]))
    w_down = weights.low((layer, "down"), lambda: held_weight(mlp.down_proj))

    resid, mid = clean["resid"], clean["mid"]
    dx = block.input_layernorm(resid + diff).sub_(block.input_layernorm(resid))
    dmid = diff.add_(weights.mm(weights.mm(dx, w_v, low_output=True), w_o))
    dy = block.post_attention_layernorm(mid + dmid).sub_(block.post_attention_layernorm(mid))
    gate, up = clean["gate"], clean["up"]  # [1, d_mlp]
    dgate, dup = weights.mm(dy, w_gate_up).split(gate.shape[-1], dim=-1)  # [rows, d_mlp] each
    dacts = mlp.act_fn(dgate.add_(gate)).mul_(dup.add_(up)).sub_(clean["acts"])
    return dmid.add_(weights.mm(dacts, w_down))


@torch.no_grad()
def _gpt2_clean_block(weights: "EngineWeights", layer: int, block: nn.Module, resid: Tensor) -> BlockClean:
    d_model = resid.shape[-1]
    c_attn, mlp = block.attn.c_attn, block.mlp
    v = torch.addmm(c_attn.bias[2 * d_model:], block.ln_1(resid), c_attn.weight[:, 2 * d_model:])
    mid = resid + block.attn.c_proj(v)
    hidden = mlp.c_fc(block.ln_2(mid))
    return BlockClean({"resid": resid, "mid": mid, "hidden": hidden, "acts": mlp.act(hidden)})


def _gpt2_diff_step(weights: "EngineWeights", layer: int, block: nn.Module, clean: BlockClean,
                    diff: Tensor) -> Tensor:
    """GPT-2 version of `_llama_diff_step` (Conv1D weights are [in, out]: their transposes are used)."""
    d_model = diff.shape[-1]
    c_attn, mlp = block.attn.c_attn, block.mlp
    w_v = weights.low((layer, "v"), lambda: held_weight(c_attn)[:, 2 * d_model:].T)
    w_o = weights.low((layer, "o"), lambda: held_weight(block.attn.c_proj).T)
    w_fc = weights.low((layer, "fc"), lambda: held_weight(mlp.c_fc).T)
    w_proj = weights.low((layer, "proj"), lambda: held_weight(mlp.c_proj).T)

    resid, mid = clean["resid"], clean["mid"]
    dx = block.ln_1(resid + diff).sub_(block.ln_1(resid))
    dmid = diff.add_(weights.mm(weights.mm(dx, w_v, low_output=True), w_o))
    dy = block.ln_2(mid + dmid).sub_(block.ln_2(mid))
    dacts = mlp.act(weights.mm(dy, w_fc).add_(clean["hidden"])).sub_(clean["acts"])
    return dmid.add_(weights.mm(dacts, w_proj))


class EngineWeights:
    """The engines' weights beyond the modules' own, owned by one SiteModel (its `bf16` field).

    low(key, make): the weight a bf16 multiply reads, [out, in] bf16. When `make()` returns a bf16
    tensor (a weight held once in bf16, see attribution/held_weights.py) it is used as is and
    nothing is copied; otherwise (a float32-held model) a bf16 copy is made once and kept.
    derived(key, make): a float32 tensor derived from the weights (a folded GQA o_proj), made once.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self.weights: dict[object, Tensor] = {}

    def low(self, key: object, make: Callable[[], Tensor]) -> Tensor:  # -> [out, in] in self.dtype
        low = self.weights.get(key)
        if low is None:
            low = make().detach()
            if low.dtype != self.dtype:  # a held bf16 weight, or a transposed view of one, is used as is
                low = low.to(self.dtype).contiguous()
            self.weights[key] = low  # a reference when held once, else the only copy
        return low

    def derived(self, key: object, make: Callable[[], Tensor]) -> Tensor:
        value = self.weights.get(key)
        if value is None:
            value = self.weights[key] = make().detach().contiguous()
        return value

    def mm(self, x: Tensor, low_weight: Tensor, *, low_output: bool = False) -> Tensor:  # [rows, in] -> [rows, out]
        """float32 result, or the low-precision one when it only feeds another matrix multiply."""
        out = torch.nn.functional.linear(x.to(self.dtype), low_weight)
        return out if low_output else out.float()


LowPrecisionMatmul = EngineWeights  # the name attribution/models.py knows


@dataclass(frozen=True)
class Architecture:
    """Where the neurons of one architecture family live, and how to run its blocks at one position."""

    family: str
    model_types: tuple[str, ...]  # transformers `config.model_type` values of the family
    blocks: Callable[[nn.Module], nn.ModuleList]
    site: Callable[[nn.Module], nn.Module]  # block -> module whose *input* is the neuron vector
    w_out: Callable[[nn.Module], Tensor]  # block -> [d_model, d_mlp]: column i is neuron i's write
    final_norm: Callable[[nn.Module], nn.Module]
    step: Callable[..., Tensor]  # (weights, layer, block, resid [rows, d_model]) -> [rows, d_model]
    block_macs: Callable[[object], int]  # transformers config -> multiply-adds of `step` for one row
    diff_step: Callable[..., Tensor]  # (weights, layer, block, BlockClean, diff [rows, d_model]) -> diff
    clean_block: Callable[..., BlockClean]  # (weights, layer, block, resid [1, d_model]) -> intermediates
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
    clean_block=_llama_clean_block,
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
    clean_block=_gpt2_clean_block,
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
    clean_block=_no_lm_head,
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

"""How many bytes a model's parts take and how a replica is split over an actor's GPUs (pure arithmetic).

Parameters are counted exactly by instantiating the model on the meta device (no weights, no memory).
Sizes are in bytes; GPU memory in decimal GB (1e9 bytes), below what an "80GB" A100 or H100 holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from attribution.sites import architecture_for, head_macs

GB = 10**9
DTYPE_BYTES = {"float32": 4, "bf16": 2}
# Per GPU, besides the weights: the CUDA context, cuBLAS workspaces and allocator slack.
FIXED_OVERHEAD = 2 * GB


@dataclass(frozen=True)
class ModelParams:
    """Parameter counts of a causal LM by part (the layout the engine walks: embed, blocks, head)."""

    embed: int  # input embeddings and whatever else runs before block 0 (GPT-2's positions)
    blocks: tuple[int, ...]  # per block
    head: int  # final norm + LM head; a tied embedding matrix is counted here, once
    unused_at_one_position: tuple[int, ...]  # per block: Q and K projections (the engine skips them)
    tied: bool

    @property
    def total(self) -> int:
        return self.embed + sum(self.blocks) + self.head


@dataclass(frozen=True)
class PartBytes:
    """Bytes of a replica's parts; a suffix replica holds 0 bytes of the blocks before its first layer."""

    embed: int
    blocks: tuple[int, ...]
    head: int

    @property
    def total(self) -> int:
        return self.embed + sum(self.blocks) + self.head

    @property
    def first_layer(self) -> int:
        return next((i for i, size in enumerate(self.blocks) if size), len(self.blocks))


@dataclass(frozen=True)
class LayerSplit:
    """Contiguous layer ranges per device, embeddings with the first, final norm + head with the last."""

    ranges: tuple[range, ...]  # per device slot
    device_bytes: tuple[int, ...]  # weights (and engine caches) per device

    @property
    def devices(self) -> int:
        return len(self.ranges)

    def describe(self) -> str:  # "L0-12: 67.5 GB | L13-25: 63.3 GB"
        return " | ".join(f"L{r.start}-{r.stop - 1}: {size / GB:.1f} GB"
                          for r, size in zip(self.ranges, self.device_bytes))


_COUNTS: dict[str, ModelParams] = {}


def count_parameters(config) -> ModelParams:
    """Exact parameter counts of the model a transformers config describes (meta device, cached)."""
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if key not in _COUNTS:
        _COUNTS[key] = _count(config)
    return _COUNTS[key]


def _count(config) -> ModelParams:
    from transformers import AutoModelForCausalLM

    arch = architecture_for(config.model_type)
    with torch.device("meta"):  # shapes only: a 70B model costs nothing here
        model = AutoModelForCausalLM.from_config(config)
    blocks = arch.blocks(model)
    names = {id(module): name for name, module in model.named_modules()}
    prefix = names[id(blocks)] + "."
    head_prefixes = (names[id(arch.final_norm(model))] + ".", names[id(model.get_output_embeddings())] + ".")
    per_block = [0] * len(blocks)
    unused = [0] * len(blocks)
    embed = head = 0
    for name, param in model.named_parameters():  # a tied matrix appears once, under the embedding
        tied = param is model.get_output_embeddings().weight
        if name.startswith(prefix):
            layer = int(name[len(prefix):].split(".", 1)[0])
            per_block[layer] += param.numel()
            if arch.family == "llama" and (".q_proj." in name or ".k_proj." in name):
                unused[layer] += param.numel()
        elif tied or name.startswith(head_prefixes):
            head += param.numel()
        else:
            embed += param.numel()
    return ModelParams(embed=embed, blocks=tuple(per_block), head=head, unused_at_one_position=tuple(unused),
                       tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight)


def model_bytes(config, dtype: str = "float32") -> PartBytes:
    """Bytes of the weights alone, stored in `dtype` (float32 or bf16)."""
    params, width = count_parameters(config), DTYPE_BYTES[dtype]
    return PartBytes(params.embed * width, tuple(b * width for b in params.blocks), params.head * width)


def replica_bytes(config, *, engine: str = "float32", first_layer: int = 0) -> PartBytes:
    """What an actor holds: float32 weights (load_model keeps them float32) plus the engine's caches.

    engine float32 keeps a folded copy of each GQA o_proj (sites._fold_kv_heads); engine bf16 keeps bf16
    copies of every matrix it multiplies differences by (exactly the block's and the head's multiply-adds
    per row, sites.block_macs / head_macs) next to the float32 weights the clean row uses.
    A suffix replica (first_layer > 0) holds blocks first_layer.. without Q and K and no input embeddings.
    """
    params = count_parameters(config)
    arch = architecture_for(config.model_type)
    if engine == "bf16":
        block_extra, head_extra = 2 * arch.block_macs(config), 2 * head_macs(config)
    elif engine == "float32":
        block_extra, head_extra = (4 * _d_model(config) * _kv_width(config) if arch.family == "llama" else 0), 0
    else:
        raise ValueError(f"engine {engine!r} is not one of float32, bf16")
    blocks = []
    for layer, (size, unused) in enumerate(zip(params.blocks, params.unused_at_one_position)):
        if layer < first_layer:
            blocks.append(0)
        else:
            blocks.append(4 * (size - (unused if first_layer else 0)) + block_extra)
    embed = 0 if first_layer else 4 * params.embed
    return PartBytes(embed, tuple(blocks), 4 * params.head + head_extra)


def activation_bytes(config, *, engine: str, batch_rows: int) -> int:
    """Per GPU headroom: fixed overhead plus the peak of one forward of `batch_rows` single-position rows.

    Per row, the MLP step holds about 18 bytes per neuron (bf16 engine: the bf16 gate/up product, its
    float32 copy, the activation, its bf16 cast; float32: 16) and the head 6 bytes per vocabulary entry
    (bf16 logits of the difference and their float32 copy; float32: logits and the log-sum-exp's
    temporary, 8), plus a few float32 residuals of d_model.
    """
    d_mlp = _d_mlp(config)
    mlp, head = (18 * d_mlp, 6 * config.vocab_size) if engine == "bf16" else (16 * d_mlp, 8 * config.vocab_size)
    return FIXED_OVERHEAD + batch_rows * (max(mlp, head) + 32 * _d_model(config))


def split_layers(sizes: PartBytes, devices: int) -> LayerSplit:
    """Cut the held blocks into `devices` contiguous ranges minimising the largest device's bytes
    (embeddings go with the first range, final norm + head with the last); deterministic."""
    first = sizes.first_layer
    blocks = sizes.blocks[first:]
    n = len(blocks)
    if not 1 <= devices <= n:
        raise ValueError(f"cannot split {n} blocks over {devices} devices")
    prefix = [0]
    for size in blocks:
        prefix.append(prefix[-1] + size)

    def part(device: int, start: int, stop: int) -> int:  # bytes of blocks start..stop-1 on `device`
        extra = (sizes.embed if device == 0 else 0) + (sizes.head if device == devices - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    # best[d][i]: smallest possible largest device holding blocks 0..i-1 on devices 0..d-1
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(devices + 1)]
    cut = [[0] * (n + 1) for _ in range(devices + 1)]
    best[0][0] = 0
    for d in range(1, devices + 1):
        for i in range(d, n - (devices - d) + 1):
            for j in range(d - 1, i):  # device d-1 holds blocks j..i-1; ties keep the earliest cut
                value = max(best[d - 1][j], part(d - 1, j, i))
                if value < best[d][i]:
                    best[d][i], cut[d][i] = value, j
    bounds = [n]
    for d in range(devices, 0, -1):
        bounds.append(cut[d][bounds[-1]])
    bounds.reverse()
    ranges = tuple(range(first + a, first + b) for a, b in zip(bounds, bounds[1:]))
    return LayerSplit(ranges, tuple(part(d, a, b) for d, (a, b) in enumerate(zip(bounds, bounds[1:]))))


def fits(sizes: PartBytes, *, devices: int, gpu_memory: float, headroom: int) -> bool:
    held = sum(1 for size in sizes.blocks if size)
    if devices > held:
        return False
    return max(split_layers(sizes, devices).device_bytes) + headroom <= gpu_memory


def gpus_needed(sizes: PartBytes, *, gpu_memory: float, headroom: int, most: int = 64) -> int | None:
    """The fewest GPUs of `gpu_memory` bytes that hold the replica with `headroom` each; None if > most."""
    for devices in range(1, most + 1):
        if fits(sizes, devices=devices, gpu_memory=gpu_memory, headroom=headroom):
            return devices
    return None


def first_fitting_layer(config, *, engine: str, devices: int, gpu_memory: float, headroom: int) -> int | None:
    """The earliest layer L >= 1 whose suffix replica (blocks L.., norm, head) fits on `devices` GPUs."""
    n_layers = len(count_parameters(config).blocks)
    for layer in range(1, n_layers):
        if fits(replica_bytes(config, engine=engine, first_layer=layer), devices=devices,
                gpu_memory=gpu_memory, headroom=headroom):
            return layer
    return None


def _d_model(config) -> int:
    return getattr(config, "hidden_size", None) or config.n_embd


def _d_mlp(config) -> int:
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * _d_model(config)


def _kv_width(config) -> int:  # n_kv_heads * head_dim: the width of V (and of o_proj folded over GQA)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (getattr(config, "num_key_value_heads", None) or heads) * head_dim

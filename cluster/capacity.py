"""How many bytes a model's parts take and how a replica is split over an actor's GPUs (pure arithmetic).

Parameters are counted exactly by instantiating the model on the meta device (no weights, no memory).
Sizes are in bytes; GPU memory in decimal GB (1e9 bytes), below what an "80GB" A100 or H100 holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from attribution.lm_head import HEAD_VOCAB_CHUNK
from attribution.sites import architecture_for

GB = 10**9
DTYPE_BYTES = {"float32": 4, "bf16": 2}
# Per GPU, besides the weights: the CUDA context, cuBLAS workspaces and allocator slack.
FIXED_OVERHEAD = 2 * GB
# Per CPU actor: the interpreter with torch, transformers, Ray and pyarrow imported, the tokenizer and
# allocator slack (measured 0.4-0.45 GB resident here, benchmarks/bench_memory.py), with margin.
PROCESS_OVERHEAD = 3 * GB // 4
# The clean forwards over a concept's texts run PREPARE_TEXTS texts at a time (attribution/neat.py
# text_batches); texts are assumed no longer than PREPARE_TOKENS tokens (the built-in ones: under 30).
PREPARE_TEXTS = 32
PREPARE_TOKENS = 64


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


def weight_width(engine: str) -> int:
    """Bytes per held weight: the float32 engine computes in float32 (a bf16 checkpoint is upcast as it
    loads); the bf16 engine holds every weight once in bf16 (the checkpoint's own tensors when bf16)."""
    if engine not in DTYPE_BYTES:
        raise ValueError(f"engine {engine!r} is not one of float32, bf16")
    return DTYPE_BYTES[engine]


def replica_bytes(config, *, engine: str = "float32", first_layer: int = 0, concepts: int = 0) -> PartBytes:
    """What an actor holds beyond its activations: weights in the engine's width, the engine's caches,
    and (concepts > 0) the bf16 engine's per-concept head moments, on the head's device.

    A full replica holds Q and K (its clean forwards over the concept's texts need them); a suffix
    replica (first_layer > 0) holds blocks first_layer.. without Q and K and no input embeddings.
    Both engines keep a folded copy of each o_proj (sites._fold_kv_heads) in their width (the bf16
    engine only under GQA: without it the fold is o_proj itself).
    """
    params = count_parameters(config)
    arch = architecture_for(config.model_type)
    width = weight_width(engine)
    fold = width * _d_model(config) * _kv_width(config) if arch.family == "llama" else 0
    if engine == "bf16" and _kv_width(config) == _d_model(config):
        fold = 0  # without GQA the folded o_proj is o_proj itself: the bf16 engine holds it once
    blocks = []
    for layer, (size, unused) in enumerate(zip(params.blocks, params.unused_at_one_position)):
        if layer < first_layer:
            blocks.append(0)
        else:
            blocks.append(width * (size - (unused if first_layer else 0)) + fold)
    embed = 0 if first_layer else width * params.embed
    moments = concepts * moment_bytes(config) + moment_build_bytes(config) if engine == "bf16" and concepts else 0
    return PartBytes(embed, tuple(blocks), width * params.head + moments)


def moment_bytes(config) -> int:
    """One concept's head moments (attribution/lm_head.py HeadMoments): W^T diag(p) W [d_model, d_model],
    W^T p [d_model] and p [vocab], float32."""
    d_model = _d_model(config)
    return 4 * (d_model * d_model + d_model + config.vocab_size)


def moment_build_bytes(config) -> int:
    """Building them takes HEAD_VOCAB_CHUNK rows of W at a time: the float32 chunk and its p-weighted copy."""
    return 2 * 4 * min(HEAD_VOCAB_CHUNK, config.vocab_size) * _d_model(config)


def trajectory_bytes(config, *, concepts: int, ablations: int = 1) -> int:
    """Clean trajectories of every concept (per layer: the residual and the block's clean intermediates,
    at most 4 x d_model + 3 x d_mlp float32) plus an ablation value per neuron for each (concept, mode)."""
    n_layers, d_model, d_mlp = len(count_parameters(config).blocks), _d_model(config), _d_mlp(config)
    per_concept = 4 * n_layers * (4 * d_model + 3 * d_mlp) + 4 * d_model
    return concepts * (per_concept + ablations * 4 * n_layers * d_mlp)


def batch_bytes(config, *, engine: str, batch_rows: int) -> int:
    """Peak of one engine forward of `batch_rows` single-position rows.

    Per row, the MLP step holds about 18 bytes per neuron (bf16 engine: the bf16 gate/up product, its
    float32 copy, the activation, its bf16 cast; float32: 16), and the head 12 bytes per entry of one
    HEAD_VOCAB_CHUNK of the vocabulary (logits, their exponentials, a bf16 or float32 input copy; the
    online logsumexp never holds [rows, vocab]), plus a few float32 residuals of d_model.
    """
    d_mlp, d_model = _d_mlp(config), _d_model(config)
    mlp = (18 if engine == "bf16" else 16) * d_mlp
    head = 12 * min(HEAD_VOCAB_CHUNK, config.vocab_size)
    return batch_rows * (max(mlp, head) + 32 * d_model)


def prepare_bytes(config, *, engine: str) -> int:
    """Peak of a full replica's clean forwards over a concept's texts (concept vectors, reference means):
    PREPARE_TEXTS texts of up to PREPARE_TOKENS tokens, all float32: the block's input, output and the
    last hidden state (only the last is kept), one block's MLP and attention temporaries; the bf16
    engine runs them in float32 by upcasting one weight matrix at a time."""
    d_model, d_mlp = _d_model(config), _d_mlp(config)
    tokens = PREPARE_TEXTS * PREPARE_TOKENS
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    hidden = 3 * 4 * tokens * d_model
    layer = 4 * tokens * (4 * d_mlp + 8 * d_model) + 2 * 4 * PREPARE_TEXTS * heads * PREPARE_TOKENS ** 2
    upcast = 4 * d_mlp * d_model if engine == "bf16" else 0  # the largest block matrix, in float32
    return hidden + layer + upcast


def activation_bytes(config, *, engine: str, batch_rows: int, concepts: int = 0, ablations: int = 1,
                     prepares: bool = True, device: str = "cuda") -> int:
    """Headroom every device of a replica keeps besides its held weights: the fixed overhead (CUDA
    context and allocator slack on a GPU, the process and its libraries on a CPU), the larger of one
    batch and (prepares: a full replica) the clean forwards over texts, and the clean trajectories."""
    peak = batch_bytes(config, engine=engine, batch_rows=batch_rows)
    if prepares:
        peak = max(peak, prepare_bytes(config, engine=engine))
    overhead = FIXED_OVERHEAD if device == "cuda" else PROCESS_OVERHEAD
    return overhead + peak + trajectory_bytes(config, concepts=concepts, ablations=ablations)


@dataclass(frozen=True)
class ActorMemory:
    """What one actor allocates, by part (bytes); on a CPU actor this is its resident set."""

    weights: int  # held weights and engine caches
    moments: int  # bf16 engine: every concept's head moments plus one chunk of building them
    trajectories: int
    peak: int  # the larger of one batch and the clean forwards over texts
    overhead: int
    parameters: int  # of the layers the replica covers (Q and K counted even where not held)
    loading: int = 0  # CPU: the checkpoint's pages of the held tensors, mapped while they load (safetensors mmap)

    @property
    def total(self) -> int:
        return self.weights + self.overhead + max(self.moments + self.trajectories + self.peak, self.loading)

    @property
    def bytes_per_parameter(self) -> float:
        return self.weights / self.parameters

    def describe(self) -> str:  # "14.1 GB: 2.00 bytes per parameter ..."
        return (f"{self.total / GB:.1f} GB: weights {self.weights / GB:.1f} GB ({self.bytes_per_parameter:.2f} bytes "
                f"per parameter), head moments {self.moments / GB:.2f} GB, trajectories {self.trajectories / GB:.2f} GB, "
                f"activations {self.peak / GB:.2f} GB, overhead {self.overhead / GB:.2f} GB"
                + (f", or while loading the mapped checkpoint {self.loading / GB:.2f} GB" if self.loading else ""))


def actor_memory(config, *, engine: str, batch_rows: int, concepts: int, ablations: int = 1,
                 first_layer: int = 0, device: str = "cuda") -> ActorMemory:
    """An actor's whole allocation on one device (a CPU actor, or a replica on one GPU), by part."""
    held = replica_bytes(config, engine=engine, first_layer=first_layer)
    with_moments = replica_bytes(config, engine=engine, first_layer=first_layer, concepts=concepts)
    params = count_parameters(config)
    covered = (0 if first_layer else params.embed) + sum(params.blocks[first_layer:]) + params.head
    peak = batch_bytes(config, engine=engine, batch_rows=batch_rows)
    if not first_layer:
        peak = max(peak, prepare_bytes(config, engine=engine))
    # On a CPU the safetensors file is memory-mapped while it loads: its pages of every held tensor are
    # resident next to the loaded weights until loading ends (on a GPU they are the host's page cache).
    held_params = covered - (sum(params.unused_at_one_position[first_layer:]) if first_layer else 0)
    loading = checkpoint_width(config) * held_params if device == "cpu" else 0
    return ActorMemory(weights=held.total, moments=with_moments.total - held.total,
                       trajectories=trajectory_bytes(config, concepts=concepts, ablations=ablations), peak=peak,
                       overhead=FIXED_OVERHEAD if device == "cuda" else PROCESS_OVERHEAD, parameters=covered,
                       loading=loading)


def checkpoint_width(config) -> int:
    """Bytes per stored weight: 2 for a bf16/float16 checkpoint (config.json torch_dtype), else 4."""
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return 2 if dtype.replace("torch.", "") in ("bfloat16", "float16") else 4


def ray_memory(config, *, engine: str, gpus: float, batch_rows: int, concepts: int, ablations: int = 1,
               first_layer: int = 0) -> int:
    """The `memory=` an actor asks Ray for: its whole allocation on a CPU, its host side on GPUs."""
    if gpus > 0:
        return host_bytes(config, engine=engine, concepts=concepts, ablations=ablations)
    return actor_memory(config, engine=engine, batch_rows=batch_rows, concepts=concepts, ablations=ablations,
                        first_layer=first_layer, device="cpu").total


def host_bytes(config, *, engine: str, concepts: int, ablations: int = 1) -> int:
    """Host memory of a GPU actor (its Ray `memory=`): the process, the largest tensor on its way to the
    GPU (weights load tensor by tensor, never the whole model on the host), and CPU copies of trajectories."""
    params = count_parameters(config)
    largest = max(params.embed, params.head, max(params.blocks)) * 4  # a float32 upcast of one part at most
    return PROCESS_OVERHEAD + largest + trajectory_bytes(config, concepts=concepts, ablations=ablations)


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


def first_fitting_layer(config, *, engine: str, devices: int, gpu_memory: float, headroom: int,
                        concepts: int = 0) -> int | None:
    """The earliest layer L >= 1 whose suffix replica (blocks L.., norm, head) fits on `devices` GPUs."""
    n_layers = len(count_parameters(config).blocks)
    for layer in range(1, n_layers):
        if fits(replica_bytes(config, engine=engine, first_layer=layer, concepts=concepts), devices=devices,
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

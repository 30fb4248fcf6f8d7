"""Replicas split over an actor's devices by layer, and suffix replicas that hold only blocks L..

The model is built on the meta device and only the tensors the replica holds are read from the
safetensors files, each straight onto its device: a suffix replica never materialises the blocks
before its first layer (nor Q/K or the input embeddings, which the single-position engine never
reads), so its memory is what it holds, not the whole model's.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from attribution.errors import ModelError
from attribution.sites import Architecture


@dataclass(frozen=True)
class Placement:
    """Where a replica's parts live, as device slots of the actor: slot i is cuda:i (the CPU on a CPU actor).

    blocks[L] is block L's slot, None where the replica does not hold it (a suffix replica's earlier
    blocks). embed is None for a suffix replica: it runs only the engine's single-position suffix.
    """

    blocks: tuple[int | None, ...]
    head: int  # final norm + LM head (and a tied embedding matrix)
    embed: int | None = 0

    @classmethod
    def from_ranges(cls, ranges, n_layers: int, *, suffix: bool = False) -> "Placement":
        """Device slot i holds the blocks of ranges[i]; embeddings on slot 0 (none for a suffix)."""
        blocks: list[int | None] = [None] * n_layers
        for slot, layers in enumerate(ranges):
            for layer in layers:
                blocks[layer] = slot
        return cls(tuple(blocks), head=len(ranges) - 1, embed=None if suffix else 0)

    @property
    def first_layer(self) -> int:
        return next(layer for layer, slot in enumerate(self.blocks) if slot is not None)

    @property
    def suffix_only(self) -> bool:
        return self.embed is None

    @property
    def devices(self) -> int:
        return 1 + max(slot for slot in (*self.blocks, self.head, self.embed) if slot is not None)

    def describe(self) -> str:  # "slot 0: L0-12 + embed | slot 1: L13-25 + head"
        parts = []
        for slot in range(self.devices):
            layers = [layer for layer, s in enumerate(self.blocks) if s == slot]
            text = f"L{layers[0]}-{layers[-1]}" if layers else "-"
            if self.embed == slot:
                text = "embed + " + text
            if self.head == slot:
                text += " + head"
            parts.append(f"{slot}: {text}")
        return " | ".join(parts)


def slot_device(slot: int, device: torch.device) -> torch.device:
    return torch.device("cuda", slot) if device.type == "cuda" else device


def load_placed(path: str, config, arch: Architecture, placement: Placement, device: torch.device,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM (weights in `dtype`) with every held tensor on its slot's device and the rest left on meta.

    A full replica (embed held) gets accelerate's hooks, so its ordinary forward (clean pass, concept
    vector, reference means) moves hidden states between devices; the engine moves its rows itself.
    """
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    if device.type == "cuda" and placement.devices > torch.cuda.device_count():
        raise ModelError(f"placement {placement.describe()} needs {placement.devices} GPUs; "
                         f"this actor sees {torch.cuda.device_count()}")
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) computed on the CPU
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    n_layers = len(arch.blocks(hf))
    if len(placement.blocks) != n_layers:
        raise ModelError(f"placement has {len(placement.blocks)} layers; the model has {n_layers}")
    slots = _tensor_slots(hf, arch, placement)
    tied = _tied(hf)
    head_weight = _module_names(hf)[id(hf.get_output_embeddings())] + ".weight"
    # a tied pair is one tensor, stored and loaded under the embedding's name
    wanted = {name: slot_device(slot, device) for name, slot in slots.items()
              if slot is not None and not (tied and name == head_weight)}
    loaded = _load_tensors(Path(path), hf, wanted, set_module_tensor_to_device, dtype)
    missing = sorted(set(wanted) - loaded)
    if missing:
        raise ModelError(f"model directory {path}: the safetensors files lack {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    # accelerate's device_map keys whole blocks (as transformers' own device maps do): a block's hook
    # then moves all its inputs (hidden states, rotary cos/sin, mask) to its device at once.
    unit = _placement_unit(hf, arch)
    unit_slots = {unit(name): slot for name, slot in slots.items() if slot is not None}
    fallback = placement.embed if placement.embed is not None else placement.head
    for name, buffer in hf.named_buffers():  # small (rotary frequencies): with their unit, else slot 0
        slot = unit_slots.setdefault(unit(name), fallback)
        set_module_tensor_to_device(hf, name, slot_device(slot, device), value=buffer, clear_cache=False)
    if tied:  # loading replaced the embedding's parameter: the head must use it again
        hf.get_output_embeddings().weight = hf.get_input_embeddings().weight
    hf.eval().requires_grad_(False)
    if not placement.suffix_only:
        device_map = {key: slot if device.type == "cuda" else str(device) for key, slot in unit_slots.items()}
        # force_hooks: the same hooks on one device (a CPU test) as on several
        quiet = logging.getLogger("accelerate.big_modeling")  # its "offloaded to the cpu" note is wrong here
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            dispatch_model(hf, device_map=device_map, force_hooks=True,
                           skip_keys=sorted(getattr(hf, "_skip_keys_device_placement", None) or []) or None)
        finally:
            quiet.setLevel(level)
    return hf


def _tied(hf: nn.Module) -> bool:
    """The LM head shares the input embedding matrix (init_empty_weights does not tie it: ask the config)."""
    return bool(getattr(hf.config, "tie_word_embeddings", False))


def _placement_unit(hf: nn.Module, arch: Architecture):
    """Tensor name -> the module that moves as one: a block, the final norm, the head, the input
    embeddings, or else the tensor's own module ("model.layers.3.mlp.up_proj.weight" -> "model.layers.3")."""
    names = _module_names(hf)
    blocks = names[id(arch.blocks(hf))] + "."
    units = tuple(names[id(m)] for m in (arch.final_norm(hf), hf.get_output_embeddings(), hf.get_input_embeddings()))

    def unit(name: str) -> str:
        if name.startswith(blocks):
            return blocks + name[len(blocks):].split(".", 1)[0]
        return next((u for u in units if name.startswith(u + ".")), name.rsplit(".", 1)[0])
    return unit


def _module_names(hf: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in hf.named_modules()}


def _tensor_slots(hf: nn.Module, arch: Architecture, placement: Placement) -> dict[str, int | None]:
    """Every parameter's device slot, None for those the replica does not hold."""
    names = _module_names(hf)
    blocks_prefix = names[id(arch.blocks(hf))] + "."
    head_prefixes = (names[id(arch.final_norm(hf))] + ".", names[id(hf.get_output_embeddings())] + ".")
    embed_prefix = names[id(hf.get_input_embeddings())] + "."
    tied = _tied(hf)
    slots: dict[str, int | None] = {}
    for name, _ in hf.named_parameters(remove_duplicate=False):
        if name.startswith(blocks_prefix):
            layer = int(name[len(blocks_prefix):].split(".", 1)[0])
            slot = placement.blocks[layer]
            if placement.suffix_only and arch.family == "llama" and (".q_proj." in name or ".k_proj." in name):
                slot = None  # one position: attention is o_proj(v); Q and K are never read
        elif name.startswith(head_prefixes):
            slot = placement.head
        elif name.startswith(embed_prefix):
            slot = placement.head if tied else placement.embed  # a tied matrix is the head's weight
        else:  # before block 0 (GPT-2's position embeddings)
            slot = placement.embed
        slots[name] = slot
    return slots


def _load_tensors(path: Path, hf: nn.Module, wanted: dict[str, torch.device], set_tensor,
                  dtype: torch.dtype = torch.float32) -> set[str]:
    """Read the wanted tensors from the directory's safetensors files, each onto its device, in `dtype`."""
    from safetensors import safe_open

    prefix = getattr(hf, "base_model_prefix", "")
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    loaded: set[str] = set()
    for file in files:
        with safe_open(str(path / file), framework="pt") as handle:
            for key in handle.keys():
                # checkpoints saved from the bare model (original GPT-2) lack the base model's prefix
                name = key if key in wanted else f"{prefix}.{key}"
                if name not in wanted or name in loaded:
                    continue
                value = handle.get_tensor(key).to(wanted[name], dtype)
                set_tensor(hf, name, wanted[name], value=value, clear_cache=False)  # no empty_cache per tensor
                loaded.add(name)
    return loaded

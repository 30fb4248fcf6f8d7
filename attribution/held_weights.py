"""Hold a model's multiplied weights once, in bf16, for the bf16 NEAT engine (about 2 bytes per parameter).

Each weight matrix of the blocks and the LM head (with a tied input embedding: the same matrix) is
replaced by its bf16 value (a bf16 checkpoint's own tensor, unchanged) under a parametrization that
upcasts it to float32 whenever a module reads it: the model's ordinary forward, the float32 engine's
steps, gradients and the clean passes all still compute in float32, one layer at a time, while the
bf16 engine reads the held bf16 tensors directly (sites.held_weight) and copies nothing.
Every other 2-D weight (an untied input embedding, position embeddings) is held the same way;
norms and biases (a few vectors per block) stay float32.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from attribution.models import SiteModel
from attribution.sites import held_weight


class UpcastToFloat32(nn.Module):
    """Parametrization: the held bf16 weight, read as float32 (a temporary per read)."""

    def forward(self, weight: Tensor) -> Tensor:
        return weight.float()


def _is_held(module: nn.Module, name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, name)


def _hold(modules: list[nn.Module], value: Tensor) -> None:
    """Give every module in `modules` the same bf16 parameter `value` behind an upcast."""
    param = nn.Parameter(value.detach(), requires_grad=False)
    for module in modules:
        if _is_held(module):
            continue
        module.weight = param
        parametrize.register_parametrization(module, "weight", UpcastToFloat32(), unsafe=True)


def _matrices(root: nn.Module) -> list[nn.Module]:
    """Modules under `root` with a 2-D `weight` parameter (nn.Linear, transformers' Conv1D, nn.Embedding),
    held or not (looked up without reading `module.weight`, which upcasts a held one)."""
    out = []
    for module in root.modules():
        weight = held_original(module) if _is_held(module) else module._parameters.get("weight")
        if weight is not None and weight.dim() == 2:
            out.append(module)
    return out


@torch.no_grad()
def hold_in_bf16(model: SiteModel) -> None:
    """Replace the model's multiplied weights by single bf16 copies (idempotent; meta tensors are skipped).

    A float32 checkpoint's weights are rounded to bf16 here, so clean passes that must be exact float32
    are computed before this call (cluster/prepare.py); a bf16 checkpoint loses nothing."""
    dtype = model.bf16.dtype
    if _is_held(model.hf.get_output_embeddings()):  # held already (every replica holds the head)
        return
    model.bf16.weights.clear()  # copies and float32 folds made before holding: the engine remakes what it needs
    for layer, block in enumerate(model.blocks):
        if model.block_device(layer).type == "meta":  # a suffix replica's earlier blocks: not held
            continue
        if model.arch.family == "llama":  # gate and up as one [2 d_mlp, d_model] tensor: one multiply
            mlp = block.mlp
            if not _is_held(mlp.gate_proj):
                gate_up = torch.cat([mlp.gate_proj.weight.to(dtype), mlp.up_proj.weight.to(dtype)])
                d_mlp = mlp.gate_proj.weight.shape[0]
                _hold([mlp.gate_proj], gate_up[:d_mlp])
                _hold([mlp.up_proj], gate_up[d_mlp:])
                model.bf16.weights[(layer, "gate_up")] = gate_up  # the same storage as the two parameters
        for module in _matrices(block):
            if held_weight(module).device.type != "meta" and not _is_held(module):
                _hold([module], module.weight.to(dtype))
        for param in block.parameters():  # norms and biases: float32 (a bf16 checkpoint's are upcast)
            if param.dim() == 1 and param.dtype != torch.float32 and param.device.type != "meta":
                param.data = param.data.float()
    head, embed = model.hf.get_output_embeddings(), model.hf.get_input_embeddings()
    if not _is_held(head):
        tied = head.weight is embed.weight
        _hold([head, embed] if tied else [head], head.weight.to(dtype))
    for module in _matrices(model.hf):  # the rest: an untied input embedding, GPT-2's position embeddings
        if held_weight(module).device.type != "meta" and not _is_held(module):
            _hold([module], module.weight.to(dtype))
    for param in model.arch.final_norm(model.hf).parameters():
        param.data = param.data.float()


def held_original(module: nn.Module) -> Tensor:
    return module.parametrizations["weight"].original


def held_bytes(model: SiteModel) -> tuple[int, int]:
    """(bytes the replica holds: every storage of its parameters, buffers and engine copies counted
    once, meta tensors not at all; parameters of the whole model, tied matrices once).
    Their ratio is the replica's bytes per parameter."""
    storages: dict[tuple[str, int], int] = {}
    tensors = [*model.hf.parameters(), *model.hf.buffers(), *model.bf16.weights.values()]
    for tensor in tensors:  # a held weight is its ParametrizationList's `original` parameter
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values()), sum(p.numel() for p in model.hf.parameters())

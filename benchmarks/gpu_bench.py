"""GPU benchmark of the NEAT engines, nothing downloaded (README "GPU benchmark").

Sections, each in its own process with its own timeout (one that fails or runs out of memory is
reported and the others still run):
  smollm2      the packaged SmolLM2-135M, every neuron, float32 and bf16 engines
  llama-7b     random weights with Llama-2-7B's geometry (d_model 4096, d_mlp 11008, MHA, vocab 32000), a few layers
  llama-13b    random weights with Llama-2-13B's geometry (d_model 5120, d_mlp 13824, vocab 32000), a few layers
Per engine: neurons/s, achieved TFLOP/s (the engine's multiply-adds: blocks after the neuron's layer at one
position, Q/K skipped, plus the LM head), MFU against the device's dense bf16 peak (a table by device
name, else a measured bf16 GEMM), and the replica's bytes per parameter (weights and engine caches held).
Output: JSON on stdout, a short table on stderr.

    benchmarks/gpu.sh                          # on a GPU
    benchmarks/gpu.sh --device cpu --tiny      # seconds, on any machine (tests/test_gpu_bench.py)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("smollm2", "llama-7b", "llama-13b")
# Dense bf16 tensor-core peaks (FLOP/s) by device name (vendor data sheets; SXM parts unless named).
BF16_PEAKS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "A10G": 125e12, "A10": 125e12, "RTX 4090": 165e12, "V100": 125e12}
GEOMETRIES = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      vocab_size=32000),
}
TINY = dict(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4, vocab_size=512)


def bf16_peak(device) -> tuple[float, str]:
    """The device's dense bf16 peak and where it came from (the table, or a measured GEMM)."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in sorted(BF16_PEAKS, key=len, reverse=True):  # "H100 PCIe" before "H100"
            if key in name:
                return BF16_PEAKS[key], f"table ({name})"
    # Unknown device: the best of a measured GEMM in bf16 and (a CPU may lack fast bf16) float32.
    size = 8192 if device.type == "cuda" else 512
    best = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best[dtype] = float("inf")
        for _ in range(3):
            _sync(device)
            started = time.perf_counter()
            a @ b
            _sync(device)
            best[dtype] = min(best[dtype], time.perf_counter() - started)
    dtype = min(best, key=best.get)
    return 2 * size**3 / best[dtype], f"measured {size}^3 {str(dtype).replace('torch.', '')} GEMM"


def _significant(x: float) -> float:  # 4 significant digits: a CPU's TFLOP/s are small numbers
    return float(f"{x:.4g}")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_site_model(geometry: dict, layers: int, device, *, seed: int = 0):
    """A random-weight Llama (float32 weights: both engines' clean rows use them) as a SiteModel."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attribution.models import ModelSource, SiteModel, pin_precision
    from attribution.sites import architecture_for

    config = LlamaConfig(**geometry, num_hidden_layers=layers, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.eval().requires_grad_(False)
    return SiteModel(source=ModelSource("random", "", "random"), hf=hf, tokenizer=None,
                     arch=architecture_for("llama"), device=device, dtype=torch.float32,
                     precision=pin_precision(device, "float32"))


def held_bytes(model) -> int:
    """Weights and engine caches the replica holds (bf16 copies, folded o_proj)."""
    from attribution import sites

    tensors = {id(t): t for t in model.hf.parameters() if t.device.type != "meta"}
    tensors.update({id(t): t for t in model.bf16.weights.values()})
    folded = getattr(sites, "_FOLDED_O_PROJ", {})
    tensors.update({id(t): t for t in list(folded.values())})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_engines(model, layers: list[int], neurons: int, *, batch_rows: int, concept_vector=None,
                targets=(5, 17, 123)) -> list[dict]:
    """Both engines on `neurons` neurons of each of `layers`: throughput, TFLOP/s, bytes per parameter."""
    import torch

    from attribution.neat import NEAT_ENGINES, clean_pass
    from attribution.sites import head_macs

    config = model.hf.config
    device = model.device
    vector = concept_vector if concept_vector is not None else torch.randn(model.d_model, device=device)
    clean = clean_pass(model, vector, targets)
    macs = model.arch.block_macs(config)
    parameters = sum(p.numel() for p in model.hf.parameters())
    out = []
    for engine_name, engine in NEAT_ENGINES.items():
        zeros = torch.zeros(model.d_mlp, device=device)
        engine(model, clean, targets, layers[-1], range(min(neurons, batch_rows)), zeros, batch_rows=batch_rows)  # warm
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        started = time.perf_counter()
        for layer in layers:
            engine(model, clean, targets, layer, range(neurons), zeros, batch_rows=batch_rows)
        _sync(device)
        seconds = time.perf_counter() - started
        flops = sum(2.0 * neurons * (macs * (model.n_layers - 1 - layer) + head_macs(config)) for layer in layers)
        row = {"engine": engine_name, "neurons": neurons * len(layers), "seconds": round(seconds, 4),
               "neurons_per_second": round(neurons * len(layers) / seconds, 1), "tflops": flops / seconds / 1e12,
               "bytes_per_parameter": round(held_bytes(model) / parameters, 3), "batch_rows": batch_rows}
        if device.type == "cuda":
            row["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        out.append(row)
    return out


def section(name: str, device_name: str, tiny: bool) -> dict:
    import torch

    device = torch.device(device_name)
    peak, peak_source = bf16_peak(device)
    if name == "smollm2":
        from attribution.concepts import load_concept_file, resolve_targets
        from attribution.models import load_model, resolve_model_source
        from attribution.neat import concept_vector

        model = load_model(resolve_model_source("smollm2-135m"), device=device_name)
        concept = load_concept_file(REPO / "configs" / "concepts" / "builtin.yaml")[0]
        targets = resolve_targets(model.tokenizer, concept).ids
        layers = [28, 29] if tiny else list(range(model.n_layers))
        neurons = 64 if tiny else model.d_mlp
        examples = concept.examples[:4] if tiny else concept.examples
        rows = run_engines(model, layers, neurons, batch_rows=64 if tiny else 4096, targets=targets,
                           concept_vector=concept_vector(model, examples))
        what = f"SmolLM2-135M, {len(layers)} layers x {neurons} neurons, concept {concept.name}"
    else:
        geometry = TINY if tiny else GEOMETRIES[name]
        n_layers = 2 if tiny else 4
        model = random_site_model(geometry, n_layers, device)
        neurons = 64 if tiny else 8192
        rows = run_engines(model, [0], neurons, batch_rows=64 if tiny else 4096)
        what = f"random weights, {name} geometry{' (tiny widths)' if tiny else ''}, {n_layers} layers, {neurons} layer-0 neurons"
    for row in rows:
        row["mfu"] = _significant(row["tflops"] * 1e12 / peak)
        row["tflops"] = _significant(row["tflops"])
    return {"section": name, "what": what, "device": str(device), "bf16_peak_tflops": _significant(peak / 1e12),
            "peak_source": peak_source, "engines": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and few neurons: checks the script runs")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per section")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section in this process
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.section:
        print(json.dumps(section(args.section, args.device, args.tiny)))
        return
    results = []
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            parser.error(f"--sections: {name!r} is not one of {', '.join(SECTIONS)}")
        command = [sys.executable, __file__, "--section", name, "--device", args.device] + (["--tiny"] if args.tiny else [])
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode == 0:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"section": name, "error": f"exit {done.returncode}: {tail}"})
        except subprocess.TimeoutExpired:
            results.append({"section": name, "error": f"timed out after {args.timeout:g} s"})
        results[-1]["wall_seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: done in {results[-1]['wall_seconds']} s", file=sys.stderr)
    print(json.dumps({"device": args.device, "tiny": args.tiny, "date": time.strftime("%Y-%m-%d"),
                      "sections": results}))
    print(f"{'section':<10} {'engine':<8} {'neurons/s':>12} {'TFLOP/s':>9} {'MFU':>7} {'bytes/param':>11}",
          file=sys.stderr)
    for result in results:
        if "error" in result:
            print(f"{result['section']:<10} error: {result['error']}", file=sys.stderr)
            continue
        for row in result["engines"]:
            print(f"{result['section']:<10} {row['engine']:<8} {row['neurons_per_second']:>12,.0f} "
                  f"{row['tflops']:>9.4g} {100 * row['mfu']:>6.1f}% {row['bytes_per_parameter']:>11.2f}",
                  file=sys.stderr)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""An actor's peak resident memory against the planner's estimate (cluster/capacity.py), on CPU.

A random-weight Llama is built in code (nothing downloaded) and saved as a bf16 safetensors checkpoint,
as real Llama checkpoints are; a fresh process then does what an actor does (load the replica, prepare
the concepts, score a shard of layer 0) and reports its peak resident set (VmHWM in /proc/self/status). The
planner's estimate must be above it, by at most 25%.

    python benchmarks/bench_memory.py                  # ~1B parameters (d_model 2048, 16 layers), float32 engine
    python benchmarks/bench_memory.py --shape small    # ~0.25B (tests/test_memory.py runs the 0.15B "test" shape)
    python benchmarks/bench_memory.py --dtype bf16     # the bf16 engine
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONCEPTS = REPO / "tests" / "data" / "unseen_concepts.yaml"
# Llama geometries; the vocabulary is the SmolLM2 tokenizer's (49,152) so the packaged tokenizer serves.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16),
    "test": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=8,
                  num_key_value_heads=8),
}

CHILD = r"""
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import yaml
from cluster.config import load_job_config
from cluster.plan import Shard, resolve_job
from cluster.scorer import ScorerSpec, ShardScorer

plan = resolve_job(load_job_config(sys.argv[2]))
scorer = ShardScorer(ScorerSpec.from_plan(plan))  # loads the replica and prepares every concept
rows = plan.config.batch_rows
table = scorer.score_table(Shard("neat", 0, 0, 2 * rows))  # two full batches of layer 0, every concept
# VmHWM is this process image's own peak. ru_maxrss is not: Linux carries the parent's high-water mark
# across fork + exec, so a child of a 3 GB pytest process reported 3.7 GB for a 1.4 GB actor.
try:
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": peak, "rows": table.num_rows}))
"""


def save_random_llama(directory: Path, shape: dict, *, seed: int = 0) -> Path:
    """A random-weight Llama of `shape` with the SmolLM2 tokenizer, saved as a bf16 checkpoint (built in
    bf16: the host never holds it in float32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(**shape, vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def write_job(path: Path, model_dir: Path, *, dtype: str, batch_rows: int, concepts: int) -> Path:
    import yaml

    chosen = yaml.safe_load(CONCEPTS.read_text())["concepts"][:concepts]
    (path.parent / "concepts.yaml").write_text(yaml.safe_dump({"concepts": chosen}))
    path.write_text(yaml.safe_dump({
        "model": str(model_dir), "concepts": str(path.parent / "concepts.yaml"), "atlas": str(path.parent / "atlas"),
        "run_id": "m", "dtype": dtype, "device": "cpu", "batch_rows": batch_rows, "ablation": ["zero"],
        "cluster": {"actors": 1, "cpus_per_actor": 2}}))
    return path


def measure(model_dir: Path, *, dtype: str, batch_rows: int = 64, concepts: int = 2) -> dict:
    """Peak RSS of a fresh process acting as one actor, and the planner's estimate for it (bytes)."""
    from cluster.capacity import actor_memory
    from cluster.config import load_job_config
    from cluster.plan import resolve_job
    from attribution.models import read_model_config

    job = write_job(Path(tempfile.mkdtemp(prefix="bench-memory-")) / "job.yaml", model_dir, dtype=dtype,
                    batch_rows=batch_rows, concepts=concepts)
    plan = resolve_job(load_job_config(job))
    estimate = actor_memory(read_model_config(plan.model), engine=dtype, batch_rows=batch_rows,
                            concepts=len(plan.concepts), ablations=len(plan.config.ablation), device="cpu")
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(job)], check=True, capture_output=True,
                         text=True).stdout
    child = json.loads(out.strip().splitlines()[-1])
    return {"dtype": dtype, "peak_rss": child["peak_rss"],
            "estimate": estimate.total, "ratio": child["peak_rss"] / estimate.total,
            "estimate_parts": estimate.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--dtype", choices=["float32", "bf16"], default="float32")
    parser.add_argument("--batch-rows", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from attribution.models import read_model_config, ModelSource
    from cluster.capacity import count_parameters

    with tempfile.TemporaryDirectory(prefix="bench-memory-model-") as tmp:
        model_dir = save_random_llama(Path(tmp) / f"llama-{args.shape}", SHAPES[args.shape])
        params = count_parameters(read_model_config(ModelSource("m", str(model_dir), "r"))).total
        result = measure(model_dir, dtype=args.dtype, batch_rows=args.batch_rows)
    result["parameters"] = params
    print(json.dumps(result))
    print(f"{args.shape} Llama ({params / 1e9:.2f} B parameters, bf16 checkpoint), {args.dtype} engine, "
          f"{args.batch_rows}-row batches: peak RSS {result['peak_rss'] / 1e9:.2f} GB, planner "
          f"{result['estimate'] / 1e9:.2f} GB ({result['estimate_parts']}); measured / planned = {result['ratio']:.2f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()

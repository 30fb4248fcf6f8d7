"""Resident memory of a full SmolLM2 replica against suffix replicas (README "Big models").

Each replica loads in a fresh process; the numbers are the bytes of the tensors it holds and the growth
of the process's resident set (VmRSS) from after the imports to after every held tensor was read once
(safetensors are memory-mapped: pages count when touched, as scoring touches them). Run: python benchmarks/bench_replicas.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys, torch
sys.path.insert(0, sys.argv[1])
from attribution.models import load_model, resolve_model_source
from attribution.placement import Placement

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

source = resolve_model_source("smollm2-135m")
first = int(sys.argv[2])
import transformers, accelerate, safetensors  # imports before the baseline
before = rss()
placement = None if first == 0 else Placement.from_ranges([range(first, 30)], 30, suffix=True)
model = load_model(source, device="cpu", placement=placement)
held = {id(t): t for t in [*model.hf.parameters(), *model.hf.buffers()] if t.device.type != "meta"}
for tensor in held.values():  # page in what is memory-mapped from the safetensors file, as scoring would
    float(tensor.float().sum())
print(json.dumps({"first_layer": first, "rss_growth": rss() - before, "held_bytes": sum(t.numel() * t.element_size() for t in held.values())}))
"""


def measure(first_layer: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(first_layer)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    rows = [measure(first) for first in (0, 20, 29)]
    print("| replica | tensors held (MB) | resident set growth (MB) |")
    print("|---|---:|---:|")
    for row in rows:
        name = "full (layers 0-29)" if row["first_layer"] == 0 else f"suffix, layers {row['first_layer']}-29"
        print(f"| {name} | {row['held_bytes'] / 1e6:.0f} | {row['rss_growth'] / 1e6:.0f} |")


if __name__ == "__main__":
    main()

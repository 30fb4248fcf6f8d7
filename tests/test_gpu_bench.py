"""benchmarks/gpu.sh runs anywhere: on the CPU with tiny widths it reports every section (README "GPU benchmark")."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_on_cpu_with_tiny_models():
    done = subprocess.run([str(REPO / "benchmarks" / "gpu.sh"), "--device", "cpu", "--tiny", "--timeout", "600"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [s["section"] for s in report["sections"]] == ["smollm2", "llama-7b", "llama-13b"]
    for section in report["sections"]:
        assert section["bf16_peak_tflops"] > 0 and section["peak_source"].startswith("measured")
        engines = {row["engine"]: row for row in section["engines"]}
        assert set(engines) == {"float32", "bf16"}
        for row in engines.values():
            assert row["neurons"] > 0 and row["neurons_per_second"] > 0 and row["tflops"] > 0 and row["mfu"] > 0
        # float32 weights (4 bytes) plus the folded o_proj copies of the float32 engine
        assert 4.0 <= engines["float32"]["bytes_per_parameter"] < 4.6
    assert "neurons/s" in done.stderr and "MFU" in done.stderr  # the table a person reads

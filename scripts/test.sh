#!/usr/bin/env bash
# Set everything up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# The report layout test renders pages in headless Chromium: install it when absent (CI runs as root
# with apt access; elsewhere the test is skipped with a reason).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
    || echo "warning: could not install chromium; tests/test_report_layout.py will be skipped" >&2
fi
. .venv/bin/activate
python -m pytest -q "$@"

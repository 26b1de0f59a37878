#!/usr/bin/env bash
# Install everything into .venv, then run the test suite (CPU, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

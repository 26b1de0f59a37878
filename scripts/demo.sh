#!/usr/bin/env bash
# Install everything into .venv, then run the main job on the embedded default:
# distil the tiny teacher into a 4-step edge-to-image ControlNet on synthetic scenes (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python recipes/edge.py --output-dir runs/edge --resume latest "$@"

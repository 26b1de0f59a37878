#!/usr/bin/env bash
# Train the four ControlNet students on the embedded default and score them on held-out
# scenes; writes docs/results/<condition>/{results.json,results.md,samples.png}.
# CPU, 2 cores: about an hour in all. Pass STEPS=... to change the training length.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
STEPS_EDGE=${STEPS_EDGE:-300}
STEPS=${STEPS:-150}
$PY recipes/edge.py --output-dir runs/edge --resume latest --max-steps "$STEPS_EDGE"
for c in depth sr inpaint; do
  $PY recipes/$c.py --output-dir runs/$c --resume latest --max-steps "$STEPS" --validate-every 0 --checkpoint-every 50
done
for c in edge depth sr inpaint; do
  $PY -m condistill.cli eval --condition $c --student runs/$c --num-images 128 --batch-size 64 \
      --cache-dir runs/eval-cache --out docs/results/$c
done

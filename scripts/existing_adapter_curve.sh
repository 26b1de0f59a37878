#!/usr/bin/env bash
# How many CoDi steps an existing conventional ControlNet needs to become a 4-step one, against
# CoDi from the UNet initialisation (docs/existing-adapters.md), on the embedded default (CPU).
#
#   1. the conventional edge ControlNet: the edge recipe's cpu-demo preset with --loss diffusion
#      (700 steps), the same adapter that the results table's 50-step baseline is;
#   2. two CoDi students, one from that ControlNet (--adapter-options pretrained_controlnet=...)
#      and one from the UNet (the default), each trained in stages to every length of LENGTHS;
#      after each stage its exported adapter is copied to <run>-<steps>. The learning rate is
#      constant after its 20-step warm-up, so a resumed stage replays an uninterrupted run
#      (tests/training/test_loop.py::test_resume_matches_uninterrupted_run);
#   3. one `condistill eval` scoring all of them at 4 steps, the existing ControlNet itself at
#      4 CoDi steps (length 0) and at 50 DDIM steps + CFG 4, on the same 64 held-out scenes.
#
# Runs resume where they stopped, so the script can be re-run after an interruption.
#   bash scripts/existing_adapter_curve.sh          # writes docs/results/existing-controlnet-curve/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LENGTHS=${LENGTHS:-"100 200 400 700"}
ROOT=${ROOT:-runs/curve}
OUT=${OUT:-docs/results/existing-controlnet-curve}
NUM_IMAGES=${NUM_IMAGES:-64}
mkdir -p "$ROOT/logs"
baseline=$ROOT/edge-controlnet-baseline

train() {  # output_dir steps [extra options...]
  local out=$1 steps=$2
  shift 2
  $PY recipes/edge.py --adapter controlnet --output-dir "$out" --max-steps "$steps" --validate-every 0 \
      --threads 1 --resume latest "$@" >> "$ROOT/logs/$(basename "$out").log" 2>&1
}

staged() {  # output_dir [extra options...]: train to each length, keeping a copy of each export
  local out=$1
  shift
  for steps in $LENGTHS; do
    if [ ! -d "$out-$steps" ]; then
      train "$out" "$steps" "$@"
      cp -r "$out/adapter" "$out-$steps.tmp" && mv "$out-$steps.tmp" "$out-$steps"
    fi
  done
}

# the existing ControlNet and the from-UNet student share the machine's two cores
[ -d "$baseline/adapter" ] || train "$baseline" 700 --loss diffusion &
first=$!
staged "$ROOT/from-unet" --loss codi &
second=$!
wait $first && wait $second
staged "$ROOT/from-controlnet" --loss codi --adapter-options "{\"pretrained_controlnet\": \"$baseline\"}"

rows=(--row "existing-controlnet-50=$baseline:ddim:50:4" --row "existing-controlnet-4=$baseline:codi-stochastic:4")
for steps in $LENGTHS; do
  rows+=(--row "from-unet-$steps-4=$ROOT/from-unet-$steps:codi-stochastic:4")
  rows+=(--row "from-controlnet-$steps-4=$ROOT/from-controlnet-$steps:codi-stochastic:4")
done
$PY -m condistill eval --condition edge "${rows[@]}" --num-images "$NUM_IMAGES" --batch-size 64 \
    --cache-dir runs/eval-cache --out "$OUT" >> "$ROOT/logs/eval.log" 2>&1
echo "wrote $OUT"

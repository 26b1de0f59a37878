#!/usr/bin/env bash
# Reproduce docs/results.md on the embedded default (CPU is enough).
#
# Trains, for every (condition, adapter) pair of the results page, the distilled student
# (the recipe's cpu-demo preset) and the conventional baseline (the same preset with
# --loss diffusion: same data, same step budget), then scores both with `condistill eval`
# on the same held-out scenes: student at 1/2/4 steps, baseline at 50 DDIM + CFG, 4 DDIM and
# 4 LCM steps, the teacher at 50 DDIM + CFG, and bicubic up-scaling for sr.
# Writes docs/results/<condition>-<adapter>/{results.json,results.md,samples.png}.
#
# JOBS training runs go at once, one CPU thread each (3 suits 2 cores: about 1 s per step
# each). Evaluations run one at a time so their latency columns are not disturbed by each
# other. Runs resume where they stopped, so the script can be re-run after an interruption.
#   JOBS=3 bash scripts/reproduce_results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
JOBS=${JOBS:-3}
NUM_IMAGES=${NUM_IMAGES:-64}
GUIDANCE=${GUIDANCE:-4}
# condition:adapter[:steps]; without steps the recipe preset's length is used (edge 700,
# depth 400, sr 2400, inpaint 1000, segmentation 700) and the pair is named <condition>-<adapter>;
# with steps it is named <condition>-<adapter>-<steps>. The edge pairs are measured at the preset
# and at 2,100 steps, the sr T2I-Adapter and LoRA pairs at 400.
PAIRS=${PAIRS:-"edge:controlnet edge:t2i_adapter edge:lora edge:controlnet:2100 edge:t2i_adapter:2100 edge:lora:2100 depth:controlnet sr:controlnet inpaint:controlnet sr:t2i_adapter:400 sr:lora:400 segmentation:controlnet"}

pair_name() {  # condition adapter [steps]
  echo "$1-$2${3:+-$3}"
}

train_jobs() {
  for pair in $PAIRS; do
    IFS=: read -r c a steps <<< "$pair"
    echo "$c $a codi runs/results/$(pair_name "$c" "$a" "$steps") ${steps:-preset}"
    echo "$c $a diffusion runs/results/$(pair_name "$c" "$a" "$steps")-baseline ${steps:-preset}"
  done
}

train_one() {  # condition adapter loss output_dir steps|preset
  mkdir -p "$4"
  local steps=()
  [ "$5" = preset ] || steps=(--max-steps "$5")
  OMP_NUM_THREADS=1 $PY -m condistill train "$1" --adapter "$2" --loss "$3" --output-dir "$4" --resume latest \
      "${steps[@]}" --validate-every 0 > "$4.log" 2>&1 && echo "trained $4" || { echo "FAILED $4 (see $4.log)"; return 1; }
}
export -f train_one
export PY

train_jobs | xargs -P "$JOBS" -L 1 bash -c 'train_one "$@"' _

for pair in $PAIRS; do
  IFS=: read -r c a steps <<< "$pair"
  name=$(pair_name "$c" "$a" "$steps")
  $PY -m condistill.cli eval --condition "$c" --student "runs/results/$name" \
      --baseline "runs/results/$name-baseline" --guidance "$GUIDANCE" --num-images "$NUM_IMAGES" \
      --batch-size 64 --cache-dir runs/eval-cache --out "docs/results/$name"
done

#!/usr/bin/env bash
# The whole GPU story in one script, sized for one short GPU window (<= 8 minutes, no Ray):
#
#   1. build the RoIAlign op for this device's architecture (python -m model.build --cuda);
#   2. run tests/gpu;
#   3. RoIAlign CUDA benchmark vs torchvision (ratio, GB/s vs a device-to-device copy measured in
#      the same run, deterministic backward next to the atomic one)   benchmarks/roi_align.py;
#   4. ours vs torchvision R50-FPN, 800 px, batch 8, bf16 and fp16 autocast, inference and
#      training images/s in the same run                                benchmarks/model.py;
#   5. Predictor images/s                                                benchmarks/gpu_predictor.py;
#   6. torchvision's R50-FPN v2 file: maskray's Predictor vs torchvision's loop on the device, COCO-size
#      and 12-MP photos, ratio in the same run                           benchmarks/pretrained.py;
#   7. Keypoint R-CNN (17 keypoints, masks off): torchvision's keypointrcnn_resnet50_fpn weights in
#      maskray's model, same detections and keypoints in float32, then inference and training
#      images/s of both under autocast                                   benchmarks/keypoint_model.py;
#   8. append a dated section with every step's status, time and output to benchmarks/RESULTS.md.
#
# Usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--results PATH]
#   --device cpu --quick   tiny sizes, well under a minute: what CI runs so the script cannot rot.
#   --results PATH         where the section goes (default benchmarks/RESULTS.md).
# Python: $PYTHON if set, else python3 (the GPU image: Python 3.12, torch 2.11+cu130, torchvision 0.26).
# Every step has its own time limit; a failed step is recorded and the next one still runs; the
# exit status is 1 when any step failed (a skipped step is not a failure).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
DEVICE=cuda
QUICK=0
RESULTS=benchmarks/RESULTS.md
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs cuda or cpu}"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --results) RESULTS="${2:?--results needs a path}"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STEPS=()     # names in order
FAILED=0
START=$(date +%s)

# run_step NAME LIMIT_S CMD...: runs CMD with a time limit, output to $WORK/NAME.out, status to $WORK/NAME.status
run_step() {
  local name="$1" limit="$2"
  shift 2
  STEPS+=("$name")
  local t0 rc status
  t0=$(date +%s)
  echo "== $name: $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.out" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    status=ok
    if grep -q '^skipped:' "$WORK/$name.out"; then status=skipped; fi
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="FAILED (time limit ${limit} s)"
    FAILED=1
  else
    status="FAILED (exit $rc)"
    FAILED=1
  fi
  echo "$status, $(( $(date +%s) - t0 )) s" >"$WORK/$name.status"
  echo "== $name: $status" >&2
  tail -n 5 "$WORK/$name.out" >&2
}

if [ "$DEVICE" = cuda ]; then
  BUILD_ARGS=(--cuda)
else
  BUILD_ARGS=(--no-cuda)
fi
if [ $QUICK -eq 1 ]; then
  ROI_ARGS=(--device "$DEVICE" --rois-per-image 16 --channels 8 --repeat 1 --cases fpn single)
  MODEL_ARGS=(--device "$DEVICE" --height 64 --width 64 --batch 1 --rounds 1 --iters 1 --warmup 0)
  AMPS=(bf16)
  PRED_ARGS=(--device "$DEVICE" --size 64 --batch 2 --rounds 1 --backbone resnet18)
  PRETRAINED_ARGS=(--device "$DEVICE" --in-process --photos 1 --big 0 --min-size 128)
  KEYPOINT_ARGS=(--device "$DEVICE" --height 64 --width 64 --batch 1 --rounds 1 --iters 1 --warmup 0)
else
  ROI_ARGS=(--device "$DEVICE" --rois-per-image 1000 --repeat 10 --cases fpn single)
  MODEL_ARGS=(--device "$DEVICE" --height 800 --width 800 --batch 8 --rounds 3 --iters 2 --warmup 2)
  AMPS=(bf16 fp16)
  PRED_ARGS=(--device "$DEVICE" --size 800 --batch 8 --rounds 3)
  PRETRAINED_ARGS=(--device "$DEVICE" --in-process --photos 16 --big 2)
  KEYPOINT_ARGS=(--device "$DEVICE" --height 800 --width 1333 --batch 4 --rounds 3 --iters 2 --warmup 1)
fi

run_step environment 120 "$PY" -c '
import platform, shutil, torch, torchvision
print("python", platform.python_version(), "| torch", torch.__version__, "| torchvision", torchvision.__version__)
print("cuda available:", torch.cuda.is_available(), "| devices:",
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print("nvcc:", shutil.which("nvcc"), "| ninja:", shutil.which("ninja"), "| c++:", shutil.which("c++"))
try:
    import pytest
    print("pytest", pytest.__version__)
except ImportError:
    print("pytest: not installed (tests/gpu cannot run)")
'
run_step build_op 300 "$PY" -m model.build "${BUILD_ARGS[@]}"
run_step tests_gpu 240 "$PY" -m pytest tests/gpu -q -p no:cacheprovider -rs
run_step roi_align_benchmark 180 "$PY" benchmarks/roi_align.py "${ROI_ARGS[@]}"
for amp in "${AMPS[@]}"; do
  run_step "model_benchmark_$amp" 240 "$PY" benchmarks/model.py "${MODEL_ARGS[@]}" --amp "$amp"
done
run_step predictor 180 "$PY" benchmarks/gpu_predictor.py "${PRED_ARGS[@]}"
run_step pretrained 300 "$PY" benchmarks/pretrained.py "${PRETRAINED_ARGS[@]}"
run_step keypoint_model 240 "$PY" benchmarks/keypoint_model.py "${KEYPOINT_ARGS[@]}"

DEVICE_NAME=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible")' 2>/dev/null || echo unknown)
MODE="--device $DEVICE$([ $QUICK -eq 1 ] && echo ' --quick')"
{
  echo
  echo "## GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'), benchmarks/gpu_check.sh $MODE)"
  echo
  echo "Device: $DEVICE_NAME; host $(hostname), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)."
  echo "Total $(( $(date +%s) - START )) s; $([ $FAILED -eq 0 ] && echo 'every step passed or was skipped' || echo 'SOME STEPS FAILED')."
  for name in "${STEPS[@]}"; do
    echo
    echo "### $name: $(cat "$WORK/$name.status")"
    echo
    echo '```text'
    tail -n 40 "$WORK/$name.out"
    echo '```'
  done
} >>"$RESULTS"
echo "gpu_check.sh: section written to $RESULTS ($([ $FAILED -eq 0 ] && echo ok || echo 'with failures'))" >&2
exit $FAILED

#!/usr/bin/env bash
# One prepared GPU session for the distillation benchmarks (issue 6): the speed table, then
# the CIFAR-10 case (host and stars; a deployable convnet and a spiking ResNet-20).
# Expects, in the repository root: .whl/ with norse, nir and nirtorch wheels (see README of
# benchmarks) and .data/cifar10/ with resnet20_teacher.th and test_jpeg_q75.npz. Everything
# it prints is also written under ${OUT:-/tmp/gpu_check}. Untested on a GPU so far: try it on
# the CPU first with BUDGET_S=10 SPEED_ROUNDS=1 DEVICE=cpu.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-100}; DEVICE=${DEVICE:-cuda}; SPEED_ROUNDS=${SPEED_ROUNDS:-3}
DATA=${DATA:-.data/cifar10}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
teacher=(--teacher-arch cifar_resnet20 --teacher-weights "$DATA/resnet20_teacher.th")
python3 benchmarks/distill_speed.py "${teacher[@]}" --student resnet --depth 20 --width 16 \
  --batch-sizes 256 1024 --rounds "$SPEED_ROUNDS" --device "$DEVICE" 2>&1 | tee "$OUT/speed.md"
for student in "convnet --depth 5 --width 32" "resnet --depth 20 --width 16"; do
  for objective in host stars; do
    # shellcheck disable=SC2086
    python3 benchmarks/cifar10.py "${teacher[@]}" --eval-data "$DATA/test_jpeg_q75.npz" --student $student \
      --objective "$objective" --budget-s "$BUDGET_S" --device "$DEVICE" --json 2>>"$OUT/cifar10.err" \
      | tee -a "$OUT/cifar10.jsonl"
  done
done

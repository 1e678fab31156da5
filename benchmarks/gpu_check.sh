#!/usr/bin/env bash
# One prepared GPU session for the distillation benchmarks (issue 6), sized for ~9 minutes:
#   1. the speed table alone on the GPU (each speed change side by side);
#   2. six CIFAR-10 distillations at once on the same GPU, each with BUDGET_S seconds:
#      deployable convnet x {pixel, generator} x {host, stars}, spiking ResNet-20 x pixel x
#      {host, stars}. They share the GPU (and its 16 cores, 2 threads each), so each run gets
#      a sixth of the machine at worst: their accuracies are lower bounds for a run alone.
# Expects, in the repository root: .whl/ with norse, nir and nirtorch wheels and
# .data/cifar10/ with resnet20_teacher.th, test_jpeg_q75.npz and test_lossless_200.npz.
# Everything goes to ${OUT:-/tmp/gpu_check}, file by file as it finishes.
# CPU dry run: DEVICE=cpu BUDGET_S=10 SPEED_ROUNDS=1 BATCHES=32 benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-270}; DEVICE=${DEVICE:-cuda}; SPEED_ROUNDS=${SPEED_ROUNDS:-3}
BATCHES=${BATCHES:-256}; SPEED_TIMEOUT_S=${SPEED_TIMEOUT_S:-100}
PIXEL_STEPS=${PIXEL_STEPS:-100}; KD_STEPS=${KD_STEPS:-50}
DATA=${DATA:-.data/cifar10}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # stars_deploy from the checkout (distillation needs no install)
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/device.txt" 2>/dev/null

teacher=(--teacher-arch cifar_resnet20 --teacher-weights "$DATA/resnet20_teacher.th")
speed() {  # one table; killed with what it has if it runs long
  timeout "$SPEED_TIMEOUT_S" python3 benchmarks/distill_speed.py "${teacher[@]}" --rounds "$SPEED_ROUNDS" \
    --device "$DEVICE" "$@"
}
begin=$(date +%s)
speed --student convnet --depth 5 --width 32 --batch-sizes $BATCHES $((4 * BATCHES)) \
  --variants "host, Norse LIF" "host, fused LIF" host "host + bf16 teacher" "host + bf16 + channels_last" \
  "stars (student every 10)" "stars (student every step)" "generator host" "generator stars" \
  > "$OUT/speed_convnet.md" 2> "$OUT/speed_convnet.err"
speed --student resnet --depth 20 --width 16 --batch-sizes $BATCHES \
  --variants "host, Norse LIF" "host, fused LIF" host "host + bf16 teacher" "generator host" \
  > "$OUT/speed_resnet.md" 2> "$OUT/speed_resnet.err"
echo "speed tables: $(( $(date +%s) - begin )) s" | tee -a "$OUT/device.txt"

begin=$(date +%s)
for student in "convnet --depth 5 --width 32" "resnet --depth 20 --width 16"; do
  synthesizers="pixel generator"; [ "${student%% *}" = resnet ] && synthesizers=pixel
  for synthesizer in $synthesizers; do
    steps=$([ "$synthesizer" = pixel ] && echo "$PIXEL_STEPS" || echo 5)
    for objective in host stars; do
      name="cifar10-${student%% *}-$synthesizer-$objective"
      # shellcheck disable=SC2086
      OMP_NUM_THREADS=${JOB_THREADS:-2} timeout $((BUDGET_S + 200)) python3 benchmarks/cifar10.py "${teacher[@]}" \
        --eval-data "$DATA/test_jpeg_q75.npz" --also-eval "$DATA/test_lossless_200.npz" \
        --student $student --synthesizer "$synthesizer" --synthesis-steps "$steps" --objective "$objective" \
        --batch-size "$BATCHES" --kd-steps "$KD_STEPS" --kd-batch-size "$BATCHES" --eval-every $([ "$synthesizer" = pixel ] && echo 10 || echo 40) \
        --budget-s "$BUDGET_S" --device "$DEVICE" --json > "$OUT/$name.json" 2> "$OUT/$name.err" &
    done
  done
done
wait
echo "cifar10 runs: $(( $(date +%s) - begin )) s" | tee -a "$OUT/device.txt"
cat "$OUT"/speed_*.md
for f in "$OUT"/cifar10-*.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); a=d.get('also_eval') or {}; print(sys.argv[1].split('/')[-1], 'student', d['student_accuracy'], 'teacher', d['teacher_accuracy'], 'agree', d['agreement'], 'imgs', d['synthetic_images'], 'rounds', d['rounds'], 'lossless', a.get('student_accuracy'))" "$f" \
    || tail -3 "${f%.json}.err"
done

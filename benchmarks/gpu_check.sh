#!/usr/bin/env bash
# One prepared GPU session for the distillation benchmarks (issue 6), sized for ~9 minutes:
#   1. the speed tables alone on the GPU (each speed change side by side; the compiled
#      synthesis objective with the host-device synchronisations of one round);
#   2. eight CIFAR-10 distillations at once on the same GPU, each with BUDGET_S seconds:
#      deployable convnet x {pixel, pixel with 4x the batch as 4 BN groups, generator} x
#      {host, stars}, spiking ResNet-20 x pixel x {host, stars}. They share the GPU (and its
#      16 cores, 2 threads each), so each run gets an eighth of the machine at worst: their
#      accuracies are lower bounds for a run alone.
# Expects, in the repository root: .whl/ with norse, nir and nirtorch wheels and
# .data/cifar10/ with resnet20_teacher.th, test_jpeg_q75.npz and test_lossless_200.npz.
# Everything goes to ${OUT:-/tmp/gpu_check}, file by file as it finishes.
# CPU dry run: DEVICE=cpu BUDGET_S=10 SPEED_ROUNDS=1 BATCHES=32 benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-240}; DEVICE=${DEVICE:-cuda}; SPEED_ROUNDS=${SPEED_ROUNDS:-3}
BATCHES=${BATCHES:-256}; SPEED_TIMEOUT_S=${SPEED_TIMEOUT_S:-100}; COMPILED_TIMEOUT_S=${COMPILED_TIMEOUT_S:-140}
PIXEL_STEPS=${PIXEL_STEPS:-100}; KD_STEPS=${KD_STEPS:-50}; COMPILE_SYNTHESIS=${COMPILE_SYNTHESIS:-none}
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
speed() {  # one table; killed with what it has after $limit_s seconds
  timeout "$limit_s" python3 benchmarks/distill_speed.py "${teacher[@]}" --rounds "$SPEED_ROUNDS" \
    --device "$DEVICE" "$@"
}
begin=$(date +%s)
limit_s=$SPEED_TIMEOUT_S speed --student convnet --depth 5 --width 32 --batch-sizes $BATCHES $((4 * BATCHES)) \
  --variants "host, Norse LIF" "host, fused LIF" host "host + bf16 teacher" "host + bf16 + channels_last" \
  "stars (student every 10)" "stars (student every step)" "generator host" "generator stars" \
  > "$OUT/speed_convnet.md" 2> "$OUT/speed_convnet.err"
limit_s=$COMPILED_TIMEOUT_S speed --student convnet --depth 5 --width 32 --batch-sizes $BATCHES --sync-report \
  --variants host "host + compiled synthesis" "host + compiled synthesis + CUDA graphs" "stars + compiled synthesis" \
  > "$OUT/speed_compiled.md" 2> "$OUT/speed_compiled.err"
echo "speed tables: $(( $(date +%s) - begin )) s" | tee -a "$OUT/device.txt"

begin=$(date +%s)
cifar() {  # name, then cifar10.py options; in the background, output to $OUT/name.json
  local name=$1; shift
  OMP_NUM_THREADS=${JOB_THREADS:-2} timeout $((BUDGET_S + 200)) python3 benchmarks/cifar10.py "${teacher[@]}" \
    --eval-data "$DATA/test_jpeg_q75.npz" --also-eval "$DATA/test_lossless_200.npz" \
    --kd-steps "$KD_STEPS" --kd-batch-size "$BATCHES" --budget-s "$BUDGET_S" --device "$DEVICE" \
    --compile-synthesis "$COMPILE_SYNTHESIS" "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.err" &
}
convnet=(--student convnet --depth 5 --width 32); resnet=(--student resnet --depth 20 --width 16)
pixel=(--synthesizer pixel --synthesis-steps "$PIXEL_STEPS" --batch-size "$BATCHES" --eval-every 10)
wide=(--synthesizer pixel --synthesis-steps "$PIXEL_STEPS" --batch-size $((4 * BATCHES)) --bn-groups 4 --eval-every 5)
generator=(--synthesizer generator --synthesis-steps 5 --batch-size "$BATCHES" --eval-every 40)
for objective in host stars; do
  cifar "cifar10-convnet-pixel-$objective" "${convnet[@]}" "${pixel[@]}" --objective $objective
  cifar "cifar10-convnet-pixel4x-$objective" "${convnet[@]}" "${wide[@]}" --objective $objective
  cifar "cifar10-convnet-generator-$objective" "${convnet[@]}" "${generator[@]}" --objective $objective
  cifar "cifar10-resnet-pixel-$objective" "${resnet[@]}" "${pixel[@]}" --objective $objective
done
wait
echo "cifar10 runs: $(( $(date +%s) - begin )) s" | tee -a "$OUT/device.txt"
cat "$OUT"/speed_*.md
for f in "$OUT"/cifar10-*.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); a=d.get('also_eval') or {}; print(sys.argv[1].split('/')[-1], 'student', d['student_accuracy'], 'teacher', d['teacher_accuracy'], 'agree', d['agreement'], 'imgs', d['synthetic_images'], 'rounds', d['rounds'], 'lossless', a.get('student_accuracy'))" "$f" \
    || tail -3 "${f%.json}.err"
done

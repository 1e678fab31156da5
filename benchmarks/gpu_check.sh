#!/usr/bin/env bash
# One prepared GPU session (issues 6, 7 and 14), one command, under TOTAL_S seconds in all:
#   0. setup: the norse/nir/nirtorch wheels into .site (h5py too if the machine lacks it);
#   1. the two speed tables, alone on the GPU (each speed change side by side; the compiled
#      synthesis objective with the host-device synchronisations of one round);
#   2. at once, each on a share of the GPU: the CIFAR-10 candidates (CANDIDATES below, one
#      cifar10.py run each), benchmarks/cuda_checks.py (CUDA against CPU: Loihi emulator, NIR
#      reference, compiled LIF, bf16 teacher), torchrun with 1 process against the plain
#      command (benchmarks/torchrun_compare.py) and `stars-deploy convert` of the teacher;
#   3. packing: everything into $OUT/results.tar.gz plus a short $OUT/summary.md, then a check
#      that $OUT comes back whole (8 files, 16 MiB each), then summary.md printed last, so it
#      also arrives in the last 12,000 characters of the output.
# The device hands back only 8 files from $OUT: results are written to a scratch folder and
# packed (after every stage, and from the EXIT trap), never file by file into $OUT.
# Every stage has its own `timeout`, shortened when the deadline (TOTAL_S from the start)
# is near; a CIFAR run's --budget-s is what its stage leaves after CIFAR_SLACK_S.
# Expects, in the repository root: .whl/ (norse, nir, nirtorch wheels; optionally
# .whl/cp312/h5py-*.whl) and $DATA (default .data/cifar10/) with resnet20_teacher.th,
# test_jpeg_q75.npz and test_lossless_200.npz. benchmarks/README.md has the device call and
# the CPU dry run.
set -uo pipefail

# ---- settings (environment variables; defaults sized for the H200 session) ----------------
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}                    # for distill_speed and cifar10.py; the checks use auto
DATA=${DATA:-.data/cifar10}
TOTAL_S=${TOTAL_S:-530}                   # the whole command; the device call's timeout_s is 570
PACK_RESERVE_S=${PACK_RESERVE_S:-20}      # kept free at the end for packing and the check
SETUP_TIMEOUT_S=${SETUP_TIMEOUT_S:-60}
SPEED_TIMEOUT_S=${SPEED_TIMEOUT_S:-100}; COMPILED_TIMEOUT_S=${COMPILED_TIMEOUT_S:-110}
CHECKS_TIMEOUT_S=${CHECKS_TIMEOUT_S:-240}; TORCHRUN_TIMEOUT_S=${TORCHRUN_TIMEOUT_S:-240}
CIFAR_SLACK_S=${CIFAR_SLACK_S:-100}       # start-up, evaluations, the round that ends past the budget
BUDGET_S=${BUDGET_S:-}                    # per CIFAR run; empty (or more): what phase 2 leaves after the slack
SPEED_ROUNDS=${SPEED_ROUNDS:-3}; BATCHES=${BATCHES:-256}; PIXEL_STEPS=${PIXEL_STEPS:-100}; KD_STEPS=${KD_STEPS:-50}
COMPILE_SYNTHESIS=${COMPILE_SYNTHESIS:-none}  # for the CIFAR runs; `default` once the compiled table shows it pays
JOB_THREADS=${JOB_THREADS:-2}             # CPU threads per process in phase 2 (16 cores shared)
TORCHRUN_ARGS=${TORCHRUN_ARGS:---rounds 20 --no-eval}
CHECKS_ARGS=${CHECKS_ARGS:-}              # extra cuda_checks.py options (the dry run makes it smaller)

# ---- CIFAR-10 candidates: one line each, "name  cifar10.py options" -------------------------
# Added after the common options (teacher, eval data, --kd-steps $KD_STEPS, --kd-batch-size
# $BATCHES, --budget-s, --device, --compile-synthesis), so a candidate's own --kd-steps etc.
# win (argparse keeps the last); do not set --budget-s here. Options split on whitespace.
# All candidates run at the same time: more candidates, smaller shares of the GPU.
CONVNET="--student convnet --depth 5 --width 32"; RESNET="--student resnet --depth 20 --width 16"
PIXEL="--synthesizer pixel --synthesis-steps $PIXEL_STEPS --batch-size $BATCHES --eval-every 10"
WIDE="--synthesizer pixel --synthesis-steps $PIXEL_STEPS --batch-size $((4 * BATCHES)) --bn-groups 4 --eval-every 5"
GENERATOR="--synthesizer generator --synthesis-steps 5 --batch-size $BATCHES --eval-every 40"
# (a convnet student of the 32 px teacher takes the twin route by default, --strategy auto;
# convnet-direct-host is the same student trained as a spiking network throughout)
CANDIDATES=(
  "convnet-pixel-host        $CONVNET $PIXEL --objective host"
  "convnet-direct-host       $CONVNET $PIXEL --objective host --strategy direct"
  "convnet-pixel4x-host      $CONVNET $WIDE --objective host"
  "convnet-generator-host    $CONVNET $GENERATOR --objective host"
  "resnet-pixel-host         $RESNET $PIXEL --objective host"
  "convnet-pixel-rca         $CONVNET $PIXEL --objective rca"
  "convnet-pixel-stars       $CONVNET $PIXEL --objective stars"
  "convnet-pixel4x-stars     $CONVNET $WIDE --objective stars"
  "convnet-generator-stars   $CONVNET $GENERATOR --objective stars"
  "resnet-pixel-stars        $RESNET $PIXEL --objective stars"
)

# ---- plumbing ------------------------------------------------------------------------------
START=$(date +%s); DEADLINE=$((START + TOTAL_S))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX"); RES=$WORK/results; PIDS=$WORK/pids
mkdir -p "$RES" "$OUT"
export PYTHONUNBUFFERED=1
# stars_deploy from the checkout, laid out as an install would (link_checkout.py: targets/ is
# stars_deploy.targets) since nothing is installed there; norse/nir/nirtorch (and h5py) from .site
export PYTHONPATH=$WORK/pkg:$PWD:$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1  # else `python -c` and `python -m stars_deploy` put the checkout itself first
printf 'TOTAL_S=%s\nSTART_EPOCH=%s\nDEVICE=%s\nSETTINGS=%s\n' "$TOTAL_S" "$START" "$DEVICE" \
  "DEVICE=$DEVICE BATCHES=$BATCHES PIXEL_STEPS=$PIXEL_STEPS KD_STEPS=$KD_STEPS SPEED_ROUNDS=$SPEED_ROUNDS COMPILE_SYNTHESIS=$COMPILE_SYNTHESIS JOB_THREADS=$JOB_THREADS" \
  > "$RES/run.env"

left() { echo $((DEADLINE - PACK_RESERVE_S - $(date +%s))); }  # seconds before packing must begin
limit() { local want=$1 room; room=$(left); echo $((want < room ? want : room)); }

stage() {  # name limit_s command...: stdout to $RES/name.md (.$STDOUT_EXT), stderr to name.err, a line in stages.tsv
  local name=$1 want=$2 seconds begin rc pid; shift 2
  seconds=$(limit "$want")
  if ((seconds < 5)); then
    printf '%s\t%s\t0\tskipped\n' "$name" "$want" >> "$RES/stages.tsv"; return 0
  fi
  echo "[$(( $(date +%s) - START )) s] $name: up to $seconds s" >&2
  begin=$(date +%s)
  # in the background and waited for, so a TERM to this script is handled at once (the trap)
  timeout -k 10 "$seconds" "$@" > "$RES/$name.${STDOUT_EXT:-md}" 2> "$RES/$name.err" &
  pid=$!; echo "$pid" >> "$PIDS"
  wait "$pid"; rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$seconds" $(( $(date +%s) - begin )) "$rc" >> "$RES/stages.tsv"
  echo "[$(( $(date +%s) - START )) s] $name: exit $rc" >&2
}

pack() {  # the summary and the archive of everything so far, into $OUT (atomic renames)
  python3 benchmarks/gpu_summary.py "$RES" --out "$OUT" \
    || tar czf "$OUT/results.tar.gz" -C "$(dirname "$RES")" results  # the archive at least
}

finish() {  # always: stop what still runs, pack, check $OUT, print the summary last
  local rc=$? pid checked stopped=0
  trap - EXIT TERM INT
  for pid in $(cat "$PIDS" 2>/dev/null); do  # the stages' timeouts, which pass TERM on to their commands
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null && stopped=1
  done
  ((stopped)) && sleep 2  # let them write what they have
  pack
  python3 benchmarks/gpu_summary.py --check-out "$OUT"; checked=$?
  echo "results folder on this machine: $RES; total $(( $(date +%s) - START )) s of $TOTAL_S"
  echo "=================================== summary.md ==================================="
  cat "$OUT/summary.md" 2>/dev/null || echo "(no summary.md)"
  exit $((checked ? checked : rc))
}
trap finish EXIT
trap 'exit 143' TERM INT  # the EXIT trap packs on the way out

# ---- 0. setup ------------------------------------------------------------------------------
# (.site is git-ignored and survives between device calls: --upgrade replaces what is there)
begin=$(date +%s)
{
  if [ -d .whl ]; then
    timeout "$SETUP_TIMEOUT_S" python3 -m pip install -q --upgrade --no-index --no-deps --no-compile \
      --target .site .whl/*.whl || {
      echo "setup: pip failed; unpacking the wheels instead (a wheel is a zip of the installed files)" >&2
      for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" .site; done
    }
  fi
  # nir and the netx files need h5py, which this machine may lack: a cp312 wheel is carried for that
  if ! python3 -c "import h5py" 2>/dev/null && ls .whl/cp312/h5py-*.whl >/dev/null 2>&1; then
    timeout "$SETUP_TIMEOUT_S" python3 -m pip install -q --no-index --no-deps --no-compile --target .site \
      .whl/cp312/h5py-*.whl || python3 -m zipfile -e .whl/cp312/h5py-*.whl .site
  fi
  python3 benchmarks/link_checkout.py "$WORK/pkg"
} > "$RES/setup.md" 2> "$RES/setup.err"
{
  python3 -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  python3 -c "import h5py, nir, norse, stars_deploy.cli, stars_deploy.targets.loihi; print('h5py', h5py.__version__, 'nir', nir.__version__, 'norse and stars_deploy (CLI, targets) import')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  echo "cores $(nproc), $(date -u '+%Y-%m-%d %H:%M UTC')"
} > "$RES/device.txt" 2>> "$RES/setup.err"
printf 'setup\t%s\t%s\t%s\n' "$SETUP_TIMEOUT_S" $(( $(date +%s) - begin )) \
  "$(python3 -c 'import h5py, nir, norse, stars_deploy.cli, stars_deploy.targets.loihi' 2>/dev/null && echo 0 || echo 1)" \
  >> "$RES/stages.tsv"
cat "$RES/device.txt" >&2
pack

# ---- 1. speed tables, alone on the GPU -----------------------------------------------------
teacher=(--teacher-arch cifar_resnet20 --teacher-weights "$DATA/resnet20_teacher.th")
speed=(python3 benchmarks/distill_speed.py "${teacher[@]}" --rounds "$SPEED_ROUNDS" --device "$DEVICE"
       --student convnet --depth 5 --width 32)
stage speed_convnet "$SPEED_TIMEOUT_S" "${speed[@]}" --batch-sizes "$BATCHES" $((4 * BATCHES)) \
  --variants "host, Norse LIF" "host, fused LIF" host "host + bf16 teacher" "host + bf16 + channels_last" \
  "stars (student every 10)" "stars (student every step)" "generator host" "generator stars"
stage speed_compiled "$COMPILED_TIMEOUT_S" "${speed[@]}" --batch-sizes "$BATCHES" --sync-report \
  --variants host "host + compiled synthesis" "host + compiled synthesis + CUDA graphs" "stars + compiled synthesis"
pack

# ---- 2. CIFAR-10 candidates, checks and torchrun, all at once ------------------------------
phase=$(limit 100000)  # every second left before packing
budget=$((phase - CIFAR_SLACK_S))
if [ -n "$BUDGET_S" ] && ((BUDGET_S < budget)); then budget=$BUDGET_S; fi  # never more than the phase allows
if ((budget < 1)); then budget=1; fi
echo "BUDGET_S=$budget" >> "$RES/run.env"
: > "$RES/candidates.tsv"
for line in "${CANDIDATES[@]}"; do
  read -ra words <<< "$line"
  name=${words[0]}; options=("${words[@]:1}")
  printf '%s\t%s\n' "$name" "${options[*]}" >> "$RES/candidates.tsv"
  OMP_NUM_THREADS=$JOB_THREADS STDOUT_EXT=json stage "cifar10-$name" "$phase" python3 benchmarks/cifar10.py "${teacher[@]}" \
    --eval-data "$DATA/test_jpeg_q75.npz" --also-eval "$DATA/test_lossless_200.npz" \
    --kd-steps "$KD_STEPS" --kd-batch-size "$BATCHES" --budget-s "$budget" --device "$DEVICE" \
    --compile-synthesis "$COMPILE_SYNTHESIS" "${options[@]}" --json &
done
# shellcheck disable=SC2086  # CHECKS_ARGS and TORCHRUN_ARGS are option lists
OMP_NUM_THREADS=$JOB_THREADS stage cuda_checks "$CHECKS_TIMEOUT_S" python3 benchmarks/cuda_checks.py --device auto \
  --teacher-weights "$DATA/resnet20_teacher.th" --cifar-data "$DATA/test_lossless_200.npz" \
  --json "$RES/cuda_checks.json" $CHECKS_ARGS &
# stars-deploy convert (the teacher itself as a spiking network, NIR): synthesis of the 512
# calibration images and the NIR reference on all 10,000 JPEG images at T 32, on the GPU
OMP_NUM_THREADS=$JOB_THREADS STDOUT_EXT=json stage convert "$phase" python3 -m stars_deploy convert \
  --teacher cifar_resnet20 --weights "$DATA/resnet20_teacher.th" --normalization imagenet \
  --data "$DATA/test_jpeg_q75.npz" --device "$DEVICE" --runs-dir "$RES/convert_runs" --json &
# The digits teacher is trained into the cache first: a distill that trains it itself does so
# after seeding, and the training reseeds torch, so the plain run (training it) and torchrun
# (finding it cached) would start from different random states and never give the same weights.
# shellcheck disable=SC2016,SC2086
OMP_NUM_THREADS=$JOB_THREADS stage torchrun "$TORCHRUN_TIMEOUT_S" bash -c \
  'python3 -m stars_deploy teacher train --quiet >&2 && exec python3 benchmarks/torchrun_compare.py "$@"' _ \
  --nproc 1 --device auto -- $TORCHRUN_ARGS &
last=$(date +%s)
while [ -n "$(jobs -pr)" ]; do  # pack once a minute meanwhile: a hard kill keeps what had finished
  sleep 5
  if (($(date +%s) - last >= 60)); then pack; last=$(date +%s); fi
done
exit 0  # the EXIT trap packs, checks $OUT and prints the summary

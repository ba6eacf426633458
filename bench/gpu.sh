#!/usr/bin/env bash
# Every measurement of issue 15 on a GPU machine, in one command (under 8 minutes on one H100/H200, 16 cores):
#
#   bench/gpu.sh [--out DIR] [--dry-run]          # REF_DINO=/path/to/facebookresearch-dino adds the paper's code
#
# 1. writes 8,192 photo-like JPEGs of 400-500 px (bench/make_jpegs.py, one process per core);
# 2. runs the CUDA tests (the decode race, the data path, no host sync in the step);
# 3. trains end to end, `dinokit train --preset paper` with 10 local crops, batch 256, 12 workers, 100 steps,
#    decoding on the device and in the workers; steady images/s and data wait from each run's metrics.jsonl;
# 4. `dinokit bench` eager and compiled (the step's parts, data wait, MFU against a measured matmul and the
#    data sheet); the fmnist-cpu preset's steps/s at batch 64 (Fashion-MNIST: DINOKIT_FASHION_MNIST);
# 5. with REF_DINO, the paper's main_dino.py on the same folder, batch, crops and workers (a copy made to start
#    offline, outside the repository: nothing of it enters dinokit);
# 6. the "workers" run again in fp32: does the bf16 loss track fp32's (STEPS=200 for the issue's 200 steps)?
# 7. prints dinokit and the paper's code side by side; writes DIR/gpu-report.json (and small logs in DIR).
#
# Runs from the source tree (PYTHONPATH=src, no install); PYTHON picks the interpreter. Big files (the JPEGs,
# checkpoints) go to WORK (default /tmp/dinokit-gpu-work), not DIR. --dry-run: the same parts at toy sizes
# on the CPU, in well under a minute (tests/test_gpu_script.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
OUT_DIR=${OUT:-/tmp/dinokit-gpu}
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUT_DIR=$2; shift ;;
    *) echo "usage: bench/gpu.sh [--out DIR] [--dry-run]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # the reference runs in its folder
WORK=${WORK:-/tmp/dinokit-gpu-work}
BUDGET=${BUDGET:-470}  # seconds: the compiled bench starts only if it can end within them
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT_DIR/status" "$OUT_DIR/logs" "$OUT_DIR/runs" "$WORK"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
START=$(date +%s)

if [ $DRY = 1 ]; then  # toy sizes, on the CPU
  IMAGES=24; SIDES="40 64"; BATCH=8; LOCAL=2; WORKERS=2; STEPS=6; LOG_EVERY=2; BENCH="--steps 2 --warmup 1"
  FMNIST_STEPS=6; FMNIST_LOG=2; REF_EPOCHS=2; CORES=2
  MODEL=(--set arch=vit --set patch_size=4 --set embed_dim=32 --set depth=1 --set num_heads=2 --set out_dim=64
         --set head_hidden_dim=48 --set bottleneck_dim=16 --set global_crop_size=16 --set local_crop_size=8
         --set device=cpu --set precision=fp32)
  TESTS=(tests/test_decode_stream.py -k "handoff or hands_over")
  COMPILE=0
else
  IMAGES=8192; SIDES="400 500"; BATCH=256; LOCAL=10; WORKERS=12; STEPS=${STEPS:-100}; LOG_EVERY=10
  BENCH="--steps 10 --warmup 3"; FMNIST_STEPS=600; FMNIST_LOG=100; REF_EPOCHS=2
  CORES=$(nproc)
  MODEL=()
  TESTS=(tests/test_gpu_pipeline.py tests/test_decode_stream.py tests/test_no_sync.py tests/test_data_loader.py)
  COMPILE=1
fi
JPEGS=$WORK/jpegs  # one class folder inside, as the paper's ImageFolder wants; dinokit reads it recursively
CONFIG=(--preset paper --set local_crops_number=$LOCAL --set batch_size=$BATCH --set num_workers=$WORKERS
        "${MODEL[@]}")

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to logs/NAME.log, record exit code and time
  local name=$1 limit=$2; shift 2
  local t0 code
  t0=$(date +%s%N)
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s in)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  code=$?
  echo "$code $(awk "BEGIN { print ($(date +%s%N) - $t0) / 1e9 }")" > "$OUT_DIR/status/$name"
  [ $code = 0 ] || { echo "   $name: exit $code"; tail -n 3 "$OUT_DIR/logs/$name.log" | sed 's/^/   | /'; }
  return 0
}

train_run() {  # train_run NAME STEPS ARGS...: dinokit train into WORK, its metrics and config copied to OUT_DIR/runs
  local name=$1 steps=$2; shift 2
  rm -rf "$WORK/run-$name"
  part "train-$name" 240 "$PY" -m dinokit train --out "$WORK/run-$name" --max-steps "$steps" --no-progress "$@"
  mkdir -p "$OUT_DIR/runs/$name"
  cp "$WORK/run-$name"/{metrics.jsonl,config.yaml} "$OUT_DIR/runs/$name/" 2>/dev/null || true
}

"$PY" - > "$OUT_DIR/machine.json" <<'EOF'
import json, os, platform, torch, torchvision
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(json.dumps({"gpu": gpu, "cpus": os.cpu_count(), "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "python": platform.python_version(),
                  "host": platform.node()}))
EOF

# 1. the JPEG folder (kept between runs of the script: image i is always the same)
if [ "$(ls "$JPEGS/all" 2>/dev/null | wc -l)" != "$IMAGES" ]; then
  rm -rf "$JPEGS"
  part jpegs 120 "$PY" bench/make_jpegs.py "$JPEGS/all" "$IMAGES" --sides $SIDES --workers "$CORES"
fi

# 2. the CUDA tests (and their CPU halves)
part tests 150 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml" "${TESTS[@]}"

# 3. end to end, both decoders
for decode in device workers; do
  train_run "$decode" "$STEPS" --data "$JPEGS" "${CONFIG[@]}" --set log_every=$LOG_EVERY --set decode=$decode
done

# 4. the step's parts, eager and compiled; the small preset's steps/s
part bench-eager 150 "$PY" -m dinokit bench --data "$JPEGS" "${CONFIG[@]}" $BENCH --json "$OUT_DIR/bench-eager.json"
train_run fmnist "$FMNIST_STEPS" --preset fmnist-cpu --data fashion-mnist:train --set batch_size=64 \
  --set log_every=$FMNIST_LOG $( [ $DRY = 1 ] && echo --set device=cpu )

# 5. the paper's code on the same folder, batch, crops and workers
if [ -n "${REF_DINO:-}" ]; then
  part ref-prepare 60 "$PY" bench/gpu_report.py prepare-ref "$REF_DINO" "$WORK/ref-dino"
  rm -rf "$WORK/ref-out"
  part ref 240 bash -c "cd '$WORK/ref-dino' && '$PY' main_dino.py --arch vit_small --patch_size 16 \
    --data_path '$JPEGS' --output_dir '$WORK/ref-out' --batch_size_per_gpu $BATCH --local_crops_number $LOCAL \
    --epochs $REF_EPOCHS --warmup_epochs 1 --num_workers $WORKERS --saveckp_freq 100"
  cp "$OUT_DIR/logs/ref.log" "$OUT_DIR/ref.log"
fi

# compiled last: its warm-up is the longest, and a cut-off costs the least here
if [ $COMPILE = 1 ] && [ $(( $(date +%s) - START )) -lt $(( BUDGET - 150 )) ]; then
  part bench-compile 150 "$PY" -m dinokit bench --data "$JPEGS" "${CONFIG[@]}" $BENCH --compile \
    --json "$OUT_DIR/bench-compile.json"
elif [ $COMPILE = 1 ]; then
  echo "== bench-compile skipped: $(( $(date +%s) - START ))s gone, it could end past ${BUDGET}s"
fi

# bf16 against fp32: the same run (same seed, same batches) in fp32, its loss beside the bf16 run's ("workers")
if [ $(( $(date +%s) - START )) -lt $(( BUDGET - 120 )) ]; then
  train_run fp32 "$STEPS" --data "$JPEGS" "${CONFIG[@]}" --set log_every=$LOG_EVERY --set decode=workers \
    --set precision=fp32
else
  echo "== train-fp32 skipped: $(( $(date +%s) - START ))s gone, it could end past ${BUDGET}s"
fi

# 6. one report
echo "== report ($(( $(date +%s) - START ))s in)"
"$PY" bench/gpu_report.py collect "$OUT_DIR" --json "$OUT_DIR/gpu-report.json"

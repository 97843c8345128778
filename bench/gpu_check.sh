#!/usr/bin/env bash
# The GPU checks of this project, in one run (device machine: torch preinstalled, no network).
#   bash bench/gpu_check.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import flash_attn" 2>/dev/null && echo "flash_attn present" | tee -a "$OUT/gpu.txt" || echo "flash_attn absent" | tee -a "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o log_level=WARNING -rfEs --tb=short tests/test_cuda.py 2>&1 \
    | grep -v DEBUG > "$OUT/test_cuda_full.txt"; grep -E "^(FAILED|ERROR|SKIPPED|E  +[A-Za-z_.]*(Error|Exception))|passed|failed" "$OUT/test_cuda_full.txt" | cut -c1-300 | tail -30
for R in ${ROWS:-1}; do
timeout ${MFU_TIMEOUT:-420} python3 bench/bench_gpu_mfu.py --preset gemma-3-1b --seq 4096 --docs 4 --steps 10 --rows "$R" \
    --configs "${CONFIGS:-sdpa,flash,flash+compile,flex+compile}" --timeout 200 --json "$OUT/mfu_rows$R.json" ${PROFILE:+--profile "$OUT/prof_rows$R"} 2>&1 | tail -40 | tee -a "$OUT/mfu.txt"
done

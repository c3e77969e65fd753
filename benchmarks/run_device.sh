#!/usr/bin/env bash
# One call on a GPU machine (the device tool): build the CUDA extension, run the GPU tests,
# run the benchmarks, and leave logs and JSON under $OUT (default ./device-out).
#   bash benchmarks/run_device.sh [op ...]      (ops: attention spectrogram fusion packing; default all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
python3 -c "import mmfuse, json; print(json.dumps(mmfuse.build_info()))" | tee "$OUT/build_info.json"
python3 -m pytest -q -m "cuda or triton" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
ops=("$@"); [ ${#ops[@]} -eq 0 ] && ops=(attention spectrogram fusion packing)
name=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
for op in "${ops[@]}"; do
  python3 -m mmfuse.bench.cli --op "$op" --json "$OUT/$name-$op.json" 2>"$OUT/bench-$op.log" | tee "$OUT/bench-$op.txt"
done

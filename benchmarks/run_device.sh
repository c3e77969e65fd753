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
# the emulator against the hardware (the same primitive and kernel harnesses built with nvcc), then
# compute-sanitizer on the small GPU cases of every CUDA kernel: memcheck, and racecheck for the
# shared-memory kernels (the emulator steps warps in lockstep between collectives, so a missing
# cross-warp barrier shows only here)
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_emulator.py tests/test_fusion_emulator.py \
  tests/test_cross_attention_emulator.py 2>&1 | tee "$OUT/emulator-vs-gpu.log" | tail -5
for tool in memcheck racecheck; do
  timeout 600 compute-sanitizer --tool "$tool" --error-exitcode 1 python3 -m pytest -q -x -m cuda -p no:cacheprovider \
    tests/test_cross_attention_emulator.py tests/test_pack_modalities.py tests/test_fusion.py \
    tests/test_spectrogram_kernels.py 2>&1 | tail -40 > "$OUT/sanitizer-$tool.log"
  echo "compute-sanitizer $tool: exit ${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer-$tool.log"
done
ops=("$@"); [ ${#ops[@]} -eq 0 ] && ops=(attention spectrogram fusion packing)
name=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
for op in "${ops[@]}"; do
  python3 -m mmfuse.bench.cli --op "$op" --json "$OUT/$name-$op.json" 2>"$OUT/bench-$op.log" | tee "$OUT/bench-$op.txt"
done

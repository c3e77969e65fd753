#!/usr/bin/env bash
# The staged GPU run (DESIGN.md, "The device run"): one call of at most 8 minutes on a lent GPU
# that builds, checks, sanitizes and benchmarks in stages, each with its own time limit, each
# writing its JSON and log under $OUT when it ends (mmfuse/bench/device_run.py says what each does).
#   OUT=... bash benchmarks/run_device.sh [--budget SECONDS] [--prebuilt DIR] [--only STAGE ...]
#   bash benchmarks/run_device.sh --dry-run      (the same logic on a CPU machine: make test runs it)
# Then, back here: python -m mmfuse.bench.device_results "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m mmfuse.bench.device_run --out "${OUT:-device-out}" "$@"

#!/usr/bin/env bash
# `make cpu-sanitize`: the C++ CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer,
# running the op tests and the fuzz suite's small cases, so an out-of-bounds access that happens to
# return garbage, a use-after-free or signed overflow fails a test instead of passing silently.
#
# The sanitized build lives in its own copy of the tree (build/asan), so the normal in-place
# extension is untouched; tests import it through PYTHONPATH. The interpreter is not instrumented,
# so libasan is preloaded (it must be the first library loaded) and leak detection is off (CPython
# and torch keep allocations alive at exit by design); a failed huge allocation returns null, so
# torch raises as it does without ASan. Any ASan/UBSan report aborts the process.
set -euo pipefail
PYTHON=${PYTHON:-python3}
# absolute (a venv's interpreter by its own path, not its symlink target): the build runs elsewhere
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; *) PYTHON=$(command -v "$PYTHON") ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TREE=$ROOT/build/asan
mkdir -p "$TREE"
# the sources and tests, without the normal build's shared objects
rm -rf "$TREE/mmfuse" "$TREE/csrc" "$TREE/tests"
cp -a "$ROOT/mmfuse" "$ROOT/csrc" "$ROOT/tests" "$TREE/"
find "$TREE/mmfuse" -name '*.so' -delete
cp "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$TREE/"
start=$(date +%s)
(cd "$TREE" && MMFUSE_SANITIZE=address,undefined MMFUSE_SKIP_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-2} \
  "$PYTHON" setup.py -q build_ext --inplace >"$TREE/build.log" 2>&1) || { tail -50 "$TREE/build.log"; exit 1; }
echo "cpu-sanitize: ASan/UBSan build in $(( $(date +%s) - start )) s"
# libstdc++ preloaded too: the C interpreter does not link it, and without it ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts at the first C++ exception (a TORCH_CHECK)
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
cd "$TREE"
# the op tests (no torch.compile: Inductor's own C++ compiles would run under the preload) and the
# fuzz suite at its CI budget, raw-op cases included (their child processes inherit the preload);
# -s, because a sanitizer report is printed by a process about to exit and pytest's capture would
# swallow it
LD_PRELOAD=$PRELOAD PYTHONPATH=$TREE \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:symbolize=1:allocator_may_return_null=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$PYTHON" -m pytest -q -s -p no:cacheprovider -m "not triton and not emulator and not slow and not cuda" \
  -k "not compile and not export" \
  tests/test_hardening.py tests/test_fuzz.py tests/test_attention.py tests/test_attention_dropout.py tests/test_attention_variants.py \
  tests/test_key_ranges.py \
  tests/test_pack_modalities.py tests/test_fusion.py tests/test_spectrogram.py tests/test_spectrogram_plain.py \
  tests/test_mfcc.py "$@"

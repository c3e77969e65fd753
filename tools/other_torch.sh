#!/usr/bin/env bash
# `make abi-check`, second half: the proof that one build serves several torch releases. The wheel
# is built once with $PYTHON's torch (2.13 in CI), installed into a second virtual environment
# with another torch release ($OTHER_TORCH, default torch==2.14.1: the newest release pip takes on
# this project's machines, from their disk; a CUDA build, which imports and runs on a CPU-only
# machine), and the op tests run there against the installed wheel, from a copy of tests/ so that
# the source tree's mmfuse is not the one imported.
set -euo pipefail
PYTHON=${PYTHON:-python3}
# absolute (a venv's interpreter by its own path): the tests run from another folder
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; *) PYTHON=$(command -v "$PYTHON") ;; esac
OTHER_TORCH=${OTHER_TORCH:-torch==2.14.1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK="$ROOT/build/other-torch"
rm -rf "$WORK/dist" "$WORK/run"
mkdir -p "$WORK/run"
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -q -w "$WORK/dist" "$ROOT"
BASE=$("$PYTHON" -c "import sys; print(sys._base_executable)")
test -x "$WORK/venv/bin/python" || "$BASE" -m venv "$WORK/venv"
OTHER="$WORK/venv/bin/python"
"$OTHER" -m pip install -q "$OTHER_TORCH" pytest pytest-xdist hypothesis librosa kaldi-native-fbank
"$OTHER" -m pip install -q --no-deps --force-reinstall "$WORK"/dist/mmfuse-*.whl
if [ -n "${PREBUILT:-}" ]; then
	# `make device-prebuilt`: the CUDA op library built against another (CUDA) torch replaces the
	# wheel's; on this machine without a GPU its CPU kernels run the tests, its CUDA ones register
	SITE=$("$OTHER" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
	# as on the lent GPU, which gets the op library and its record only: no _C (Python-specific), so
	# mmfuse's build information comes from that record
	rm -f "$SITE"/mmfuse/_ops*.so "$SITE"/mmfuse/_C*.so
	cp "$ROOT/$PREBUILT"/_ops*.so "$ROOT/$PREBUILT"/_build.json "$SITE/mmfuse/"
fi
cp -r "$ROOT/tests" "$ROOT/tools" "$WORK/run/"
cd "$WORK/run"
"$OTHER" - "$PYTHON" "${PREBUILT:-}" <<'PY'
import json, pathlib, subprocess, sys
import torch, mmfuse
info = mmfuse.build_info()
if sys.argv[2]:  # the prebuilt CUDA op library: the torch that built it is in its build record
    record = json.loads((pathlib.Path(mmfuse.__file__).parent / "_build.json").read_text())
    built = record["torch"]
    what = f"the CUDA op library (CUDA {record['cuda']}, {record['cuda_archs']})"
    assert info["cuda"], "the prebuilt library is a CUDA build"
else:
    built = subprocess.run([sys.argv[1], "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True, check=True).stdout.strip()
    what = "the wheel"
print(f"other-torch: {what} built with torch {built} ({info['torch_built_against']} headers, target "
      f"{info['torch_target']}) runs under torch {torch.__version__}; op library {info['ops_library']}")
assert info["extension_loaded"], info["load_error"]
if sys.argv[2]:  # the CUDA kernels registered with the dispatcher of this (other) torch
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmfuse::"))
    cuda = [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
    print(f"other-torch: {len(cuda)} of {len(names)} mmfuse ops have a CUDA kernel registered: {', '.join(cuda)}")
    assert cuda, "no CUDA kernel registered"
assert info["ops_library"].startswith(sys.prefix), "the installed wheel, not the source tree"
assert torch.__version__.split("+")[0] != built.split("+")[0], "the second torch must be another release"
PY
# shellcheck disable=SC2086  # XDIST: pytest-xdist's options from the Makefile, word-split on purpose
# (with the prebuilt library there is no _C, whose own symbol test is left out)
"$OTHER" -m pytest -q -p no:cacheprovider ${XDIST:-} ${PREBUILT:+-k "not test_build_info_module_links_no_torch"} -m "not triton and not sanitize and not slow" \
	tests/test_abi.py tests/test_pack_modalities.py tests/test_attention.py tests/test_key_ranges.py \
	tests/test_attention_variants.py tests/test_fusion.py tests/test_spectrogram.py tests/test_spectrogram_kernels.py

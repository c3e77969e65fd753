# `make test`: install what is missing, then run every test (Triton ones under the CPU interpreter
# in their own process when no GPU is present). `make bench`: run the benchmark suite.
# `make triton-check`: compile every Triton kernel, dtype and autotune config for sm_80 and sm_90
# (no GPU needed); fails on a compile error or shared memory over the device limit, reports spills.
# `make cuda-sanitize`: the emulator tests with the emulator's sanitizer (races, shared/global
# bounds, alignment, initcheck, cp.async groups) in seeded random warp orders.
PYTHON ?= python3
# the torch to install when none is present (a CPU wheel here; on a GPU machine install your CUDA torch first)
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?=
STAMP := build/.mmfuse-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
HAS_GPU := $(shell $(PYTHON) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
# the CPU test runs spread over the cores with pytest-xdist (a test extra): tests split between the
# workers, an idle worker takes from a busy one (worksteal: a file of long tests no longer runs
# alone at the end); the Triton interpreter's run a file per worker at a time (its per-process
# caches serve a file's tests). PYTEST_WORKERS=0 runs them in one process
PYTEST_WORKERS ?= auto
XDIST := -n $(PYTEST_WORKERS) --dist worksteal
XDIST_FILES := -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: install test abi-check triton-check cuda-check cpu-sanitize cuda-sanitize fuzz bench wheel cuda-venv wheel-cuda device-prebuilt clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --no-build-isolation -e ".[test,bench]"
	@mkdir -p build && touch $@

test: install
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m pytest -q -m "not sanitize"
else
	$(PYTHON) -m pytest -q $(XDIST) -m "not triton and not sanitize"
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q $(XDIST_FILES) -m triton
endif

# the op library on the LibTorch stable ABI: no C++ symbol of torch among its undefined symbols;
# then the wheel built once and its op tests run under a second torch release (tools/other_torch.sh)
abi-check: install
	$(PYTHON) tools/check_abi.py
	PYTHON=$(PYTHON) XDIST="$(XDIST)" tools/other_torch.sh

triton-check: install
	env -u TRITON_INTERPRET $(PYTHON) -m mmfuse.triton.aot_check

bench: install
	mkdir -p bench-out
	$(PYTHON) -m mmfuse.bench.cli --json bench-out/results.json --plot bench-out/results.png --markdown bench-out/results.md $(BENCH_ARGS)

# the C++ CPU kernels under ASan/UBSan, running the op tests and the fuzz suite's small cases
cpu-sanitize: install
	PYTHON=$(PYTHON) tools/cpu_sanitize.sh

# the fuzz suite at a longer budget, random seeds (CI runs 40 examples per property, derandomized)
fuzz: install
	MMFUSE_FUZZ_EXAMPLES=1000 MMFUSE_FUZZ_RANDOM=1 MMFUSE_FUZZ_RAW_CASES=12000 MMFUSE_FUZZ_SEED=$$RANDOM \
		$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# compile every CUDA launcher as the op library builds it (stable ABI, the installed torch's headers,
# no GPU and no CUDA torch needed) for every architecture of the wheel list; fails on an error or a
# spill beyond tools/cuda_check.py's KNOWN_SPILLS (none allowed on sm_80..sm_90a).
# CUDA_CHECK_ARCHS=sm_90a,sm_120 compiles for a few.
CUDA_CHECK_ARCHS ?= wheel
cuda-check: install
	$(PYTHON) tools/cuda_check.py --archs $(CUDA_CHECK_ARCHS)

# every emulator test under the sanitizer with one seed (the `sanitize`-marked mutation and
# counter tests too, which make test leaves to this target); then, with a second seed, the
# primitives and a few attention and mel cases (the counters do not depend on the order; the
# mutations prove the checks, which a second order does not change)
SANITIZE_QUICK := test_emulator or attention_forward_lengths or attention_backward_masks or whisper
cuda-sanitize: install
	MMFUSE_EMU_SANITIZE=1 MMFUSE_EMU_SEED=1 $(PYTHON) -m pytest -q $(XDIST) -m emulator
	for seed in 2; do \
		MMFUSE_EMU_SANITIZE=1 MMFUSE_EMU_SEED=$$seed $(PYTHON) -m pytest -q $(XDIST) -m emulator -k "($(SANITIZE_QUICK)) and not counters" || exit 1; \
	done

# a wheel built with the torch installed in $(PYTHON), for every torch from 2.11 on (0.1.0+cpu, +cu130);
# a CUDA torch and nvcc make it a CUDA wheel for pyproject.toml's cuda-archs (A100 to RTX 50, PTX
# for later GPUs) unless TORCH_CUDA_ARCH_LIST says otherwise
WHEEL_CUDA_ARCHS := $(shell sed -n 's/^cuda-archs *= *"\(.*\)"/\1/p' pyproject.toml)
wheel:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-$(WHEEL_CUDA_ARCHS)}" \
		$(PYTHON) -m pip wheel --no-build-isolation --no-deps -w dist .

# the CUDA wheel from a machine without one set up: a venv (.venv-cuda) with the CUDA build of
# $(CUDA_TORCH_SPEC) from PyPI (several GB with its NVIDIA libraries), then `make wheel` with it;
# needs nvcc of the CUDA major version that torch was built with
CUDA_TORCH_SPEC ?= $(TORCH_SPEC)
# the CUDA toolkit (torch guesses it from nvcc's folder: wrong when nvcc on PATH is a wrapper in
# /usr/local/bin, and the link then cannot find libcudart)
CUDA_HOME_GUESS := $(or $(wildcard /usr/local/cuda),$(shell dirname $$(dirname $$(command -v nvcc 2>/dev/null) 2>/dev/null) 2>/dev/null))
cuda-venv:
	@command -v nvcc >/dev/null || { echo "make $(MAKECMDGOALS): nvcc is not on PATH (install the CUDA toolkit)"; exit 1; }
	test -x .venv-cuda/bin/python || python3 -m venv .venv-cuda
	.venv-cuda/bin/python -c "import torch; assert torch.version.cuda" 2>/dev/null || \
		.venv-cuda/bin/python -m pip install --isolated "$(CUDA_TORCH_SPEC)" numpy setuptools wheel ninja pybind11
wheel-cuda: export CUDA_HOME ?= $(CUDA_HOME_GUESS)
wheel-cuda: cuda-venv
	$(MAKE) wheel PYTHON=.venv-cuda/bin/python

# the op library the staged device run carries to a lent GPU (bash benchmarks/run_device.sh
# --prebuilt build/device-prebuilt): the CUDA kernels for DEVICE_ARCH (the lent H100/H200),
# compiled here against .venv-cuda's CUDA torch; the GPU's own torch (2.11 there) loading it is the
# stable ABI's cross-release proof on real hardware. Then: its undefined symbols checked, and the
# library loaded by the second torch release of `make abi-check` (a CUDA build) to run the op tests
DEVICE_ARCH ?= 9.0a
PREBUILT := build/device-prebuilt
device-prebuilt: export CUDA_HOME ?= $(CUDA_HOME_GUESS)
device-prebuilt: cuda-venv
	rm -rf $(PREBUILT) && mkdir -p $(PREBUILT)
	TORCH_CUDA_ARCH_LIST="$(DEVICE_ARCH)" .venv-cuda/bin/python setup.py -q build_ext \
		--build-lib $(PREBUILT)/lib --build-temp $(PREBUILT)/temp
	cp $(PREBUILT)/lib/mmfuse/_ops*.so $(PREBUILT)/lib/mmfuse/_build.json $(PREBUILT)/
	.venv-cuda/bin/python tools/check_abi.py $(PREBUILT)/_ops.abi3.so
	PYTHON=$(PYTHON) PREBUILT=$(PREBUILT) tools/other_torch.sh

clean:
	rm -rf build dist *.egg-info mmfuse/_C*.so mmfuse/_ops*.so mmfuse/_build.json bench-out

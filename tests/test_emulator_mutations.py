"""Deliberate kernel mutations that the emulator's sanitizer must report, naming the right line.

Each mutation is a text substitution applied to a copy of the kernel bodies (csrc/cuda/*.cuh in a
temporary directory searched before csrc/), built with the sanitizer (csrc/emu/cuda_emu.h,
EMU_SANITIZE) and run on a small case that exercises it: a removed barrier, a dropped
cp_async_wait, a skipped zero-fill or a widened predicate on a ragged tail, a misaligned
cp.async, a read past a padded row. The unmutated kernels pass the same cases under the same
sanitizer (the emulator tests in ``make cuda-sanitize``), so a report here is the mutation's.
Substitutions keep the line count, so line numbers in the copy are the original's.
"""
import functools
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mmfuse
import test_mel_spectrogram_emulator as mel_tests
from emulator_build import CSRC, HARNESS_DIR, EmulatorError, load_harness, source_line
from mmfuse.ops import spectrogram_kernels as spec_ops
from test_cross_attention_emulator import backward, forward, padded_sizes

pytestmark = [pytest.mark.emulator, pytest.mark.sanitize]

ATTENTION = CSRC / "cuda" / "cross_attention_kernel.cuh"
MEL = CSRC / "cuda" / "mel_spectrogram_kernel.cuh"



@dataclass(frozen=True)
class Mutation:
    name: str
    file: Path
    old: str         # replaced at its `occurrence`-th match
    new: str
    report: str      # regex the error must match
    lines: tuple     # per named access: alternatives (text, occurrence) of the line it must name
    case: str = "forward"
    occurrence: int = 1

    def apply(self, directory: Path) -> Path:
        """``directory`` holding a copy of csrc/cuda/ with this mutation applied."""
        target = directory / "cuda"
        shutil.copytree(CSRC / "cuda", target)
        text = self.file.read_text()
        starts = [m.start() for m in re.finditer(re.escape(self.old), text)]
        assert len(starts) >= self.occurrence, f"{self.name}: {self.old!r} not found"
        at = starts[self.occurrence - 1]
        assert self.old.count("\n") == self.new.count("\n"), "a mutation keeps the line count"
        (target / self.file.name).write_text(text[:at] + self.new + text[at + len(self.old):])
        return directory

    def expected_lines(self):
        """Per named access, the file:line alternatives one of which the report must contain."""
        return [[f"{self.file.name}:{source_line(self.file, text, n)}" for text, n in group] for group in self.lines]


def attention_case(lib, case, len_q=77, len_k=200, causal=False):
    """By default (Lq, Lk) = (77, 200): a ragged query tile, four key tiles (both stages reused),
    the last ragged; one sample, so a row past the last is past the tensor (global redzone)."""
    head_dim = 64
    q = torch.randn(1, len_q, 2, head_dim).half()
    k, v = (torch.randn(1, len_k, 1, head_dim).half() for _ in range(2))
    args = padded_sizes(q, k, None, None, 1 / math.sqrt(head_dim), causal)
    out, lse = forward(q, k, v, (1, 2, len_q), args, lib)
    if case == "backward":
        backward(torch.randn_like(q), None, q, k, v, out, lse, args, lib)


def whisper_case(lib, monkeypatch):
    """whisper_log_mel (its tile maxima go through block_reduce) through the emulated op."""
    monkeypatch.setattr(mel_tests, "harness", lambda: lib)
    monkeypatch.setitem(spec_ops._WHISPER_LOG_MEL, "reference",
                        functools.partial(spec_ops._whisper_log_mel_kernel, mel_tests._emulated_op))
    mmfuse.whisper_log_mel(torch.randn(1, 800) * 0.1, backend="reference")


RACE = "race on shared memory in kernel {}"
INITCHECK = "initcheck: ldmatrix read of shared memory never written in this block, in kernel {}"
# the forward's reads of a K/V tile (S = Q K^T, then P V) and a stage refill's writes
FORWARD_READS = (("gemm_abt<kBlockN, kHeadDim, kS, kS>(sc, sq, 16 * warp, sk);", 1),
                 ("gemm_xb<kHeadDimV, kBlockN, kSv>(o, sc, sv);", 1))
REFILL = (("MMFUSE_SHARED_DEAD(dst, 16);", 1), ("cp_async_16(dst, src", 1))
CP_ASYNC = (("cp_async_16(dst, src", 1),)
LDMATRIX_HELPERS = (("ldmatrix_x4(a, tile", 1), ("ldmatrix_x4(x, tile", 1), ("ldmatrix_x4_trans(x, tile", 1))

MUTATIONS = [
    Mutation("attention forward: barrier after the last read of a K/V tile", ATTENTION,
             "    __syncthreads();  // this stage's buffers are refilled by the next iteration's prefetch",
             "    ;  // this stage's buffers are refilled by the next iteration's prefetch",
             RACE.format("attention_forward_kernel"), (REFILL, FORWARD_READS)),
    Mutation("attention dK/dV: barrier after the last read of a Q/dO tile", ATTENTION,
             "      gemm_xb<kHeadDim, kBlockMBwd, kS>(dk, dst, sq);  // dK += dS_rawᵀ Q (scaled at the end)\n"
             "      __syncthreads();",
             "      gemm_xb<kHeadDim, kBlockMBwd, kS>(dk, dst, sq);  // dK += dS_rawᵀ Q (scaled at the end)\n      ;",
             RACE.format("attention_backward_dkdv_kernel"),
             (REFILL + (("slse[stage * kBlockMBwd + threadIdx.x] =", 1), ("sdelta[stage * kBlockMBwd + threadIdx.x] =", 1)),
              (("gemm_abt<kBlockMBwd, kHeadDim, kS, kS>(pt, sk, 16 * warp, sq);", 1),
                       ("lse2[col]);", 1), ("dst[j][i] = pt[j][i] * (dp - delta[col]);", 1),
                       ("gemm_xb<kHeadDimV, kBlockMBwd, kSv>(dv, pd, sdo);", 1),
                       ("gemm_xb<kHeadDimV, kBlockMBwd, kSv>(dv, pt, sdo);", 1),
                       ("gemm_abt<kBlockMBwd, kHeadDimV, kSv, kSv>(dst, sv, 16 * warp, sdo);", 1),
                       ("gemm_xb<kHeadDim, kBlockMBwd, kS>(dk, dst, sq);", 1))), case="backward"),
    Mutation("attention dQ: barrier after the last read of a K/V tile", ATTENTION,
             "      gemm_xb<kHeadDim, kBlockN, kS>(dq, ds, sk);  // dQ += dS_raw K (scaled at the end)\n"
             "      __syncthreads();",
             "      gemm_xb<kHeadDim, kBlockN, kS>(dq, ds, sk);  // dQ += dS_raw K (scaled at the end)\n      ;",
             RACE.format("attention_backward_dq_kernel"),
             (REFILL, (("gemm_abt<kBlockN, kHeadDim, kS, kS>(pr, sq, 16 * warp, sk);", 1),
                       ("gemm_abt<kBlockN, kHeadDimV, kSv, kSv>(ds, sdo, 16 * warp, sv);", 1),
                       ("gemm_xb<kHeadDim, kBlockN, kS>(dq, ds, sk);", 1))), case="backward"),
    Mutation("pipeline step: barrier after cp_async_wait", ATTENTION,
             "  __syncthreads();\n}\n\n// K/V tile", "  ;\n}\n\n// K/V tile",
             # the reader finds the tile's bytes still unwritten (its writer's warp has not run yet:
             # initcheck) or written by an unordered copy (race)
             r"(race on shared memory in kernel attention_forward_kernel.*conflicts with the cp.async write"
             r"|initcheck: ldmatrix read of shared memory never written in this block, in kernel attention_forward)",
             (FORWARD_READS,)),
    Mutation("pipeline step: cp_async_wait dropped", ATTENTION,
             "    cp_async_wait<1>();", "    ;",
             RACE.format("attention_forward_kernel") + r".*conflicts with the cp.async write still in flight",
             (FORWARD_READS, CP_ASYNC)),
    Mutation("load_rows: zero-fill of rows past a ragged tail skipped", ATTENTION,
             "      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);", "      ;",
             INITCHECK.format("attention_forward_kernel"), (LDMATRIX_HELPERS,)),
    Mutation("load_rows: ragged-tail predicate one row too wide", ATTENTION,
             "    if (r < valid) {", "    if (r <= valid) {",
             "out-of-bounds global read of 16 bytes in kernel attention_forward_kernel.*inside the redzone",
             (CP_ASYNC,)),
    Mutation("load_rows: cp.async source 4 bytes off", ATTENTION,
             "cp_async_16(dst, src + (first_row + r) * stride + col);",
             "cp_async_16(dst, reinterpret_cast<const char*>(src + (first_row + r) * stride + col) + 4);",
             r"cp.async: global address 0x[0-9a-f]+ is not 16-byte aligned, in kernel attention_forward_kernel",
             ((("cp_async_16(dst, ", 1),),)),
    Mutation("load_b_nk: one past a padded shared row", ATTENTION,
             "ldmatrix_x4(x, tile + (n0 + r + (m >> 1) * 8) * kStride + k0 + (m & 1) * 8);",
             "ldmatrix_x4(x, tile + (n0 + r + (m >> 1) * 8) * kStride + k0 + (m & 1) * 8 + 8);",
             INITCHECK.format("attention_forward_kernel"), ((("ldmatrix_x4(x, tile", 1),),)),
    Mutation("mel block_reduce: barrier in the reduction loop", MEL,
             "    }\n    __syncthreads();\n  }\n  const T result", "    }\n    ;\n  }\n  const T result",
             RACE.format("mel_forward_kernel"),
             ((("const T other = scratch[threadIdx.x + half];", 1),
               ("scratch[threadIdx.x] = kMax ? (other > scratch[threadIdx.x]", 1)),), case="mel"),
]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_mutation_is_reported(mutation, tmp_path, monkeypatch):
    source = HARNESS_DIR / ("mel_spectrogram.cpp" if mutation.case == "mel" else "cross_attention.cpp")
    lib = load_harness(f"{source.stem}-mutated", source, sanitize=True, include_first=mutation.apply(tmp_path))
    with pytest.raises(EmulatorError) as error:
        if mutation.case == "mel":
            whisper_case(lib, monkeypatch)
        else:
            attention_case(lib, mutation.case)
    message = str(error.value)
    assert re.search(mutation.report, message), message
    for alternatives in mutation.expected_lines():
        assert any(line in message for line in alternatives), f"none of {alternatives} named in: {message}"


# the shapes at which removing a forward barrier used to leave the output bit-identical
@pytest.mark.parametrize("len_q, len_k, causal", [(77, 200, False), (130, 300, False), (77, 130, True)], ids=str)
@pytest.mark.parametrize("mutation", [m for m in MUTATIONS if "barrier" in m.name and m.case == "forward"],
                         ids=lambda m: m.name)
def test_forward_barrier_mutations_are_reported_at_every_shape(mutation, len_q, len_k, causal, tmp_path):
    source = HARNESS_DIR / "cross_attention.cpp"
    lib = load_harness(f"{source.stem}-mutated", source, sanitize=True, include_first=mutation.apply(tmp_path))
    with pytest.raises(EmulatorError) as error:
        attention_case(lib, "forward", len_q, len_k, causal)
    assert re.search(mutation.report, str(error.value)), str(error.value)

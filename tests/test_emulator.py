"""The host emulator (csrc/emu/cuda_emu.h) and the mma.cuh wrappers, primitive by primitive.

Every primitive runs in a small kernel of tests/emulator/primitives.cu against plain torch on
fresh random data; negative tests prove that the emulator catches a missing barrier, a wrong
fragment index, a read before cp.async's wait and a deadlock; the ``sanitizer`` tests prove each
check of the sanitizer build (an exit before a barrier, two inlined calls of one barrier, exact
dynamic shared bounds, ldmatrix alignment, an uncommitted cp.async at a wait, __syncwarp and
not a shuffle ordering lanes, a global read past a tensor). Under ``MMFUSE_EMU_SANITIZE=1`` the
kernels' deliberately racy reads are expected as reports instead. The ``cuda`` test runs the
same kernels on a GPU and compares with the emulator, so the first GPU run checks the emulator.
"""
import shutil

import pytest
import torch

from emulator_build import HARNESS_DIR, EmulatorError, load_gpu_harness, load_harness, source_line

pytestmark = pytest.mark.emulator

SOURCE = HARNESS_DIR / "primitives.cu"
POISON32 = 0xFFFFFFFF
SHUFFLE_VARIANTS = 12
COPY_THREADS = 48


def primitives(*flags):
    return load_harness("primitives", SOURCE, flags)


def block_sum(prims, x, block):
    sums = torch.full(((x.numel() + block - 1) // block,), float("nan"))
    prims.block_sum(x, sums, x.numel(), block)
    return sums


@pytest.mark.parametrize("n, block", [(1000, 97), (389, 33), (2053, 255), (31, 1)])
def test_block_reduction_over_shared_memory(n, block):
    x = torch.randn(n)
    sums = block_sum(primitives(), x, block)
    expected = torch.nn.functional.pad(x, (0, sums.numel() * block - n)).view(-1, block).sum(1)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)


def test_missing_barrier_gives_a_wrong_sum():
    x = torch.randn(389)
    prims = primitives("-DEMU_TEST_DROP_BARRIER")
    if prims.sanitized:  # thread 0 reads partial[1]: before thread 1 writes it, or unordered after
        line = source_line(SOURCE, "partial[tid] += partial[tid + stride]")
        with pytest.raises(EmulatorError, match=rf"(race on shared memory|initcheck: read of shared memory never "
                                                rf"written).* in kernel block_sum_kernel.*primitives[^ ]*:{line} "):
            block_sum(prims, x, 33)
        return
    sums = block_sum(prims, x, 33)
    assert sums.isnan().all()  # thread 0 adds partial[1] before thread 1 has written it: poison


def expected_collectives(v):
    """Per-lane results of warp_collectives_kernel, from the CUDA Programming Guide's definitions."""
    warps = v.view(-1, 32).tolist()
    out = [[] for _ in range(SHUFFLE_VARIANTS)]

    def shuffle(values, lane, src, width, below_allowed=True):
        base = lane & ~(width - 1)
        inside = base <= src < base + width or (below_allowed and 0 <= src < base)
        return values[src] if inside else values[lane]

    for values in warps:
        ballot = sum(1 << lane for lane in range(32) if values[lane] > 0)
        for lane in range(32):
            out[0].append(values[(lane * 7 + 3) % 32])
            out[1].append(values[(lane & ~7) + (lane * 5 + 1) % 8])
            out[2].append(shuffle(values, lane, lane - 3, 16, below_allowed=False))
            out[3].append(shuffle(values, lane, lane + 5, 32))
            out[4].append(shuffle(values, lane, lane + 2, 8, below_allowed=False))
            out[5].append(values[lane ^ 6])
            out[6].append(shuffle(values, lane, lane ^ 13, 8))
            out[7].append(ballot - (1 << 32) if ballot >= 1 << 31 else ballot)
            out[8].append(int(any(x > 950 for x in values)))
            out[9].append(int(all(x > -950 for x in values)))
            below = values[lane + 1] if lane % 32 != 31 else values[lane]
            out[10].append(below)
            out[11].append(values[lane ^ 1] if lane < 16 else values[lane ^ 2])
    return torch.tensor(out, dtype=torch.int32)


def test_warp_shuffles_ballot_any_all():
    n = 3 * 64
    v = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    v[64:128] = torch.randint(-900, 900, (64,), dtype=torch.int32)  # a block where any() is false
    out = torch.full((SHUFFLE_VARIANTS, n), -7, dtype=torch.int32)
    warp_sums = torch.full((n,), float("nan"))
    primitives().warp_collectives(v, out, warp_sums, n)
    assert torch.equal(out, expected_collectives(v))
    expected_sums = (v.float() / 7).view(-1, 32).sum(1).repeat_interleave(32)
    torch.testing.assert_close(warp_sums, expected_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n, block", [(500, 61), (64, 64), (11, 16)])
def test_dynamic_shared_memory(n, block):
    x = torch.randn(n)
    y = torch.full((n,), float("nan"))
    primitives().reverse_chunks(x, y, n, block)
    # position base + j comes from thread block - 1 - j, which loaded x[base + block - 1 - j] or 0
    i = torch.arange(n)
    base = i // block * block
    src = base + block - 1 - (i - base)
    expected = torch.where(src < n, x[src.clamp(max=n - 1)], torch.zeros(()))
    assert torch.equal(y, expected)


def test_every_block_starts_with_poisoned_shared_memory():
    blocks = 3
    static_seen = torch.zeros(blocks * 64, dtype=torch.int32)
    dynamic_seen = torch.zeros(blocks * 64, dtype=torch.int32)
    prims = primitives()
    if prims.sanitized:  # the read of never-written shared memory is itself the finding
        with pytest.raises(EmulatorError, match=r"initcheck: read of shared memory never written in this block, in "
                                                r"kernel shared_poison_kernel, block \(0,0,0\), by thread \d+ .*"
                                                rf"primitives[^ ]*:{source_line(SOURCE, 'static_seen[i] = words')} \(shared_poison_kernel\)"):
            prims.shared_poison(static_seen, dynamic_seen, blocks)
        return
    prims.shared_poison(static_seen, dynamic_seen, blocks)
    assert (static_seen == -1).all() and (dynamic_seen == -1).all()


def random_tiles(dtype, tiles):
    a = torch.randn(tiles, 16, 16).to(dtype)
    b = torch.randn(tiles, 16, 8).to(dtype)
    c = torch.randn(tiles, 16, 8)
    return a, b, c


def run_mma(prims, dtype, a, b, c):
    d = torch.full_like(c, float("nan"))
    entry = prims.mma_tiles_f16 if dtype == torch.float16 else prims.mma_tiles_bf16
    entry(a.view(torch.int16), b.view(torch.int16), c, d, a.shape[0])
    return d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16_matches_matmul(dtype):
    a, b, c = random_tiles(dtype, 5)
    d = run_mma(primitives(), dtype, a, b, c)
    torch.testing.assert_close(d, a.float() @ b.float() + c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wrong_fragment_index_is_caught(dtype):
    a, b, c = random_tiles(dtype, 3)
    d = run_mma(primitives("-DEMU_TEST_WRONG_FRAGMENT"), dtype, a, b, c)
    assert not torch.allclose(d, a.float() @ b.float() + c, rtol=1e-2, atol=1e-2)


def expected_ldmatrix(m):
    """(6, 32, 4) registers by the PTX ISA's ldmatrix layout; unwritten registers stay -1."""
    m = m.to(torch.int64) & 0xFFFF
    out = torch.full((6, 32, 4), -1, dtype=torch.int64)
    lane = torch.arange(32)
    g, t2 = lane // 4, 2 * (lane % 4)
    for variant, (count, trans) in enumerate([(1, False), (2, False), (4, False), (1, True), (2, True), (4, True)]):
        for j in range(count):
            lo, hi = (m[j, t2, g], m[j, t2 + 1, g]) if trans else (m[j, g, t2], m[j, g, t2 + 1])
            out[variant, :, j] = lo | hi << 16
    return out


def test_ldmatrix_x1_x2_x4_and_trans():
    matrices = torch.randint(-(2**15), 2**15, (4, 8, 8), dtype=torch.int16)
    out = torch.full((6, 32, 4), -1, dtype=torch.int32)
    primitives().ldmatrix_all(matrices, out)
    assert torch.equal(out.to(torch.int64) & POISON32, expected_ldmatrix(matrices) & POISON32)


def run_cp_async(prims):
    src = torch.randint(0, 2**31 - 1, (2 * COPY_THREADS, 4), dtype=torch.int32)
    early = torch.zeros(COPY_THREADS, 4, dtype=torch.int32)
    mid = torch.zeros(2 * COPY_THREADS, 4, dtype=torch.int32)
    last = torch.zeros(2 * COPY_THREADS, 4, dtype=torch.int32)
    prims.cp_async_tile(src, early, mid, last)
    return src, early, mid, last


def test_cp_async_moves_a_tile_by_commit_group():
    if primitives().sanitized:  # the kernel's early read races with its own copy: see the next test
        src, early, mid, last = run_cp_async(primitives("-DEMU_TEST_NO_EARLY_READ"))
        assert torch.equal(last, src)
        assert torch.equal(mid[:COPY_THREADS], src[:COPY_THREADS])
        return
    src, early, mid, last = run_cp_async(primitives())
    assert torch.equal(last, src)
    assert torch.equal(mid[:COPY_THREADS], src[:COPY_THREADS])  # wait<1> retired the first group
    assert (mid[COPY_THREADS:] == -1).all()  # the second group is still in flight


def test_reading_before_cp_async_wait_reads_poison():
    prims = primitives()
    if prims.sanitized:
        with pytest.raises(EmulatorError, match=r"race on shared memory in kernel cp_async_kernel, block \(0,0,0\): "
                                                rf"read by thread (\d+) .* at primitives[^ ]*:{source_line(SOURCE, 'early[tid] = tile')} .* "
                                                rf"conflicts with the cp.async write still in flight by thread \1 .*"
                                                rf"primitives[^ ]*:{source_line(SOURCE, 'cp_async_16(&tile[tid]')} .*"
                                                r"not been retired by cp_async_wait"):
            run_cp_async(prims)
        return
    _, early, _, _ = run_cp_async(prims)
    assert (early == -1).all()


def test_deadlocked_barrier_raises():
    with pytest.raises(EmulatorError, match=r"deadlock in block \(0,0,0\): threads 0-15 wait at __syncthreads; "
                                            r"threads 16-31 wait at __syncwarp"):
        primitives().warp_waits_for_barrier()


def test_divergent_barrier_raises():
    with pytest.raises(EmulatorError, match="divergent barrier"):
        primitives().divergent_barrier()


def test_shuffle_from_a_missing_lane_raises():
    out = torch.zeros(40, dtype=torch.int32)
    with pytest.raises(EmulatorError, match=r"lane [0-7] of warp 1 reads lane (1[6-9]|2[0-3]), which is not in the mask or has exited"):
        primitives().shuffle_past_block(out)


def test_the_emulator_recovers_after_a_fault():
    with pytest.raises(EmulatorError):
        primitives().divergent_barrier()
    test_block_reduction_over_shared_memory(100, 33)


def sanitizer_check(variant):
    src = torch.randint(0, 2**31 - 1, (16, 4), dtype=torch.int32)
    out = torch.zeros(64, dtype=torch.int32)
    load_harness("primitives", SOURCE, sanitize=True).sanitizer_check(variant, src, out)
    return out


def test_sanitizer_reports_an_exit_before_a_barrier():
    with pytest.raises(EmulatorError, match=r"kernel sanitizer_kernel, block \(0,0,0\): threads 32-63 exited while "
                                            rf"the others wait at __syncthreads primitives[^ ]*:{source_line(SOURCE, 'if (tid >= 32) return;') + 1}"):
        sanitizer_check(0)


def test_sanitizer_tells_apart_two_inlined_calls_of_one_barrier():
    line = source_line(SOURCE, "void barrier_in_helper() { __syncthreads(); }")
    with pytest.raises(EmulatorError, match=rf"waits at __syncthreads primitives[^ ]*:{line} .* while thread 32 waits at "
                                            rf"__syncthreads primitives[^ ]*:{line} .*\(divergent barrier\)"):
        sanitizer_check(1)


def test_sanitizer_bounds_dynamic_shared_memory_exactly():
    line = source_line(SOURCE, "chunk[tid + 1] = tid;")
    with pytest.raises(EmulatorError, match=rf"out-of-bounds write of 4 bytes in kernel sanitizer_kernel, block \(0,0,0\) "
                                            rf"by thread 63 .* primitives[^ ]*:{line} .*dynamic shared byte 256 \(of 256\)"):
        sanitizer_check(2)


def test_sanitizer_asserts_ldmatrix_alignment():
    with pytest.raises(EmulatorError, match=r"ldmatrix: shared address 0x[0-9a-f]+ is not 16-byte aligned, in kernel "
                                            rf"sanitizer_kernel.*primitives[^ ]*:{source_line(SOURCE, 'ldmatrix_x1(r, &rows')}"):
        sanitizer_check(3)


def test_sanitizer_reports_a_wait_on_an_uncommitted_copy():
    with pytest.raises(EmulatorError, match=r"cp_async_wait<0> with 1 cp.async not committed to any group, in kernel "
                                            rf"sanitizer_kernel.*primitives[^ ]*:{source_line(SOURCE, 'cp_async_wait<0>();', 2)}"):
        sanitizer_check(4)


def test_sanitizer_orders_lanes_by_syncwarp_but_not_by_a_shuffle():
    out = sanitizer_check(5)
    assert out[1::32].tolist() == [0, 32]  # lane 1 of each warp read lane 0's word
    write, read = source_line(SOURCE, "if (lane == 0) words[tid / 32] = tid;"), source_line(SOURCE, "if (lane == 1) out[tid] = words")
    with pytest.raises(EmulatorError, match=rf"race on shared memory in kernel sanitizer_kernel, block \(0,0,0\): read by "
                                            rf"thread \d+ \(warp \d, lane 1\) at primitives[^ ]*:{read} .* conflicts with "
                                            rf"the write by thread \d+ \(warp \d, lane 0\) at primitives[^ ]*:{write} "):
        sanitizer_check(6)


def test_sanitizer_reports_a_global_read_past_a_tensor():
    with pytest.raises(EmulatorError, match=r"out-of-bounds global read of 4 bytes in kernel sanitizer_kernel.* thread 0 "
                                            rf".*primitives[^ ]*:{source_line(SOURCE, 'out[0] = out[blockDim.x]')} .*redzone"):
        sanitizer_check(7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or shutil.which("nvcc") is None, reason="needs a CUDA GPU and nvcc")
def test_gpu_agrees_with_the_emulator():
    emulated, gpu = primitives(), load_gpu_harness("primitives", SOURCE)
    cuda = torch.device("cuda")

    x = torch.randn(1000)
    sums_gpu = torch.full((11,), float("nan"), device=cuda)
    gpu.block_sum(x.to(cuda), sums_gpu, 1000, 97)
    torch.testing.assert_close(sums_gpu.cpu(), block_sum(emulated, x, 97), rtol=1e-5, atol=1e-5)

    n = 3 * 64
    v = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    out = {dev: torch.full((SHUFFLE_VARIANTS, n), -7, dtype=torch.int32, device=dev) for dev in ("cpu", cuda)}
    sums = {dev: torch.full((n,), float("nan"), device=dev) for dev in ("cpu", cuda)}
    emulated.warp_collectives(v, out["cpu"], sums["cpu"], n)
    gpu.warp_collectives(v.to(cuda), out[cuda], sums[cuda], n)
    for variant in range(SHUFFLE_VARIANTS):
        assert torch.equal(out[cuda][variant].cpu(), out["cpu"][variant]), f"warp collective variant {variant}"
    torch.testing.assert_close(sums[cuda].cpu(), sums["cpu"], rtol=1e-5, atol=1e-5)

    for dtype in (torch.float16, torch.bfloat16):
        a, b, c = random_tiles(dtype, 5)
        d_gpu = run_mma(gpu, dtype, a.to(cuda), b.to(cuda), c.to(cuda)).cpu()
        # the tensor core's summation order and rounding differ from a sequential fp32 sum
        torch.testing.assert_close(d_gpu, run_mma(emulated, dtype, a, b, c), rtol=1e-4, atol=1e-4)

    matrices = torch.randint(-(2**15), 2**15, (4, 8, 8), dtype=torch.int16)
    regs = {dev: torch.full((6, 32, 4), -1, dtype=torch.int32, device=dev) for dev in ("cpu", cuda)}
    emulated.ldmatrix_all(matrices, regs["cpu"])
    gpu.ldmatrix_all(matrices.to(cuda), regs[cuda])
    for variant, name in enumerate(["x1", "x2", "x4", "x1.trans", "x2.trans", "x4.trans"]):
        assert torch.equal(regs[cuda][variant].cpu(), regs["cpu"][variant]), f"ldmatrix {name}"

    src, _, mid, last = run_cp_async(emulated)
    gpu_out = [torch.zeros_like(t, device=cuda) for t in (src[:COPY_THREADS], mid, last)]
    gpu.cp_async_tile(src.to(cuda), *gpu_out)
    # what a read before the wait sees is timing on the GPU; what the waits guarantee must agree
    assert torch.equal(gpu_out[1][:COPY_THREADS].cpu(), mid[:COPY_THREADS])
    assert torch.equal(gpu_out[2].cpu(), last)

"""The CUDA packing kernel (csrc/cuda/pack_modalities_kernel.cuh) on the host emulator.

Launched as launch_move_rows launches it (same grid/block/path helper), compared bit for bit with
mmfuse.reference.packing on odd sizes: B = 1 and 3, zero lengths and an empty sample, D = 20
(16-byte vectors for fp32/fp64, scalar for fp16/bf16) and D = 37 (scalar), a misaligned feature
tensor (scalar fallback), every dtype, with and without the type embedding, packed and padded.
"""
import pytest
import torch

from emulator_build import HARNESS_DIR, load_harness
from mmfuse.reference import packing as reference

pytestmark = pytest.mark.emulator

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ID_POISON = 12345


def harness():
    return load_harness("pack_modalities", HARNESS_DIR / "pack_modalities.cpp")


def make_case(batch, dim, dtype, misaligned):
    sizes = [7, 1, 5]
    lengths = torch.stack([torch.randint(0, size + 1, (batch,), dtype=torch.int32) for size in sizes])
    lengths[1, 0] = 0  # a modality absent from a sample
    if batch > 2:
        lengths[:, 1] = 0  # an empty sample
    features = [torch.randn(batch, size, dim).to(dtype) for size in sizes]
    features[0] = placed(features[0], misaligned)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.sum(0).cumsum(0)
    return features, lengths, cu_seqlens


def placed(tensor, misaligned):
    """``tensor``, or a contiguous copy one element past a 16-byte boundary (the scalar path)."""
    if not misaligned:
        return tensor
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    return storage[1:].view(tensor.shape).copy_(tensor)


def move_rows(pack, features, lengths, cu_seqlens, embedding, tokens, ids, padded_len):
    dtype = features[0].dtype
    entry = getattr(harness(), f"move_rows_{str(dtype).removeprefix('torch.')}")
    pointers = torch.tensor([f.data_ptr() for f in features], dtype=torch.int64)
    feature_len = torch.tensor([f.shape[1] for f in features], dtype=torch.int64)
    entry(int(pack), pointers, feature_len, embedding, lengths, cu_seqlens, tokens, ids, tokens.shape[0], padded_len,
          tokens.shape[1], len(features), lengths.shape[1])


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("with_embedding", [False, True], ids=["plain", "embedding"])
@pytest.mark.parametrize("dim, misaligned", [(20, False), (37, False), (24, True)], ids=["d20", "d37", "misaligned"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_matches_reference(dtype, batch, dim, misaligned, with_embedding, padded):
    features, lengths, cu_seqlens = make_case(batch, dim, dtype, misaligned)
    embedding = torch.randn(len(features), dim).to(dtype) if with_embedding else None
    out_len = int(lengths.sum(0).max()) + 2 if padded else None
    ref_tokens, ref_ids = reference.pack_modalities(features, lengths, embedding, padded, out_len)

    rows = batch * out_len if padded else int(cu_seqlens[-1])
    tokens = torch.full((rows, dim), float("nan"), dtype=dtype)
    ids = torch.full((rows,), ID_POISON, dtype=torch.int64)
    move_rows(True, features, lengths, cu_seqlens, embedding, tokens, ids, out_len or 0)
    assert torch.equal(tokens.view(ref_tokens.shape), ref_tokens)
    assert torch.equal(ids.view(ref_ids.shape), ref_ids)


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("dim, misaligned", [(20, False), (37, False), (24, True)], ids=["d20", "d37", "misaligned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpack_matches_reference(dtype, dim, misaligned, padded):
    batch = 3
    sources, lengths, cu_seqlens = make_case(batch, dim, dtype, misaligned=False)
    out_len = int(lengths.sum(0).max()) + 1 if padded else None
    tokens, _ = reference.pack_modalities(sources, lengths, None, padded, out_len)
    expected = reference.unpack_modalities(tokens, lengths, [s.shape[1] for s in sources])

    # the launcher zero-fills the outputs, then the kernel writes the valid rows
    outputs = [placed(torch.zeros_like(s), misaligned) for s in sources]
    flat = tokens.reshape(-1, dim)
    move_rows(False, outputs, lengths, cu_seqlens, None, flat, torch.empty(0, dtype=torch.int64), out_len or 0)
    for out, ref in zip(outputs, expected):
        assert torch.equal(out, ref)


def test_no_rows_launches_nothing():
    features, lengths, cu_seqlens = make_case(1, 20, torch.float32, misaligned=False)
    lengths.zero_()
    cu_seqlens.zero_()
    tokens = torch.empty(0, 20)
    move_rows(True, features, lengths, cu_seqlens, None, tokens, torch.empty(0, dtype=torch.int64), 0)

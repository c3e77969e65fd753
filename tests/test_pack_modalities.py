"""pack_modalities / unpack_modalities on every backend against the per-sample torch.cat loop."""
import pytest
import torch

import mmfuse
from backend_params import backend_params, device_for

BACKENDS = backend_params("reference", "cpu", "triton", "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def cat_loop(features, lengths, type_embedding=None):
    """What pack_modalities replaces: per sample, torch.cat of each modality's valid tokens."""
    samples, ids = [], []
    for b in range(features[0].shape[0]):
        pieces = []
        for m, x in enumerate(features):
            piece = x[b, : int(lengths[m][b])]
            pieces.append(piece if type_embedding is None else piece + type_embedding[m])
            ids += [m] * piece.shape[0]
        samples.append(torch.cat(pieces))
    return samples, torch.tensor(ids, dtype=torch.long)


def random_case(batch, sizes, dim, dtype, device, zero_some=True):
    features = [torch.randn(batch, size, dim, dtype=dtype, device=device) for size in sizes]
    lengths = [torch.randint(0, size + 1, (batch,), device=device) for size in sizes]
    if zero_some and batch > 1:
        lengths[0][0] = 0  # an empty modality in one sample
    return features, lengths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_embedding", [False, True])
def test_packed_matches_cat_loop_bit_for_bit(backend, dtype, with_embedding):
    device = device_for(backend)
    features, lengths = random_case(3, (7, 1, 13), 40, dtype, device)
    emb = torch.randn(3, 40, dtype=dtype, device=device) if with_embedding else None
    out = mmfuse.pack_modalities(features, lengths, type_embedding=emb, backend=backend)
    samples, ids = cat_loop(features, lengths, emb)
    assert torch.equal(out.tokens, torch.cat(samples))
    assert torch.equal(out.modality_ids.cpu(), ids)
    seqlens = torch.tensor([s.shape[0] for s in samples])
    assert out.cu_seqlens.dtype == torch.int32
    assert out.cu_seqlens.tolist() == [0] + torch.cumsum(seqlens, 0).tolist()
    assert out.max_seqlen == int(seqlens.max()) and out.key_padding_mask is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_matches_cat_loop_bit_for_bit(backend, dtype):
    device = device_for(backend)
    features, lengths = random_case(5, (11, 3, 17), 3, dtype, device)
    emb = torch.randn(3, 3, dtype=dtype, device=device)
    out = mmfuse.pack_modalities(features, lengths, type_embedding=emb, padded=True, backend=backend)
    samples, _ = cat_loop(features, lengths, emb)
    longest = max(s.shape[0] for s in samples)
    assert out.tokens.shape == (5, longest, 3) and out.max_seqlen == longest
    for b, s in enumerate(samples):
        n = s.shape[0]
        assert torch.equal(out.tokens[b, :n], s)
        assert torch.equal(out.tokens[b, n:], torch.zeros_like(out.tokens[b, n:]))
        assert out.key_padding_mask[b].tolist() == [False] * n + [True] * (longest - n)
        assert (out.modality_ids[b, n:] == -1).all() and (out.modality_ids[b, :n] >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_to_a_given_length(backend):
    device = device_for(backend)
    features, lengths = random_case(2, (5, 4), 8, torch.float32, device)
    out = mmfuse.pack_modalities(features, lengths, padded=True, max_seqlen=12, backend=backend)
    assert out.tokens.shape == (2, 12, 8) and out.max_seqlen == 12
    assert out.key_padding_mask[:, 9:].all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_valid_when_lengths_is_none(backend):
    device = device_for(backend)
    features = [torch.randn(2, n, 5, device=device) for n in (3, 6)]
    out = mmfuse.pack_modalities(features, backend=backend)
    expected = torch.cat([torch.cat([f[b] for f in features]) for b in range(2)])
    assert torch.equal(out.tokens, expected) and out.max_seqlen == 9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True])
def test_unpack_inverts_pack(backend, padded):
    device = device_for(backend)
    features, lengths = random_case(4, (9, 2, 5), 24, torch.float32, device)
    out = mmfuse.pack_modalities(features, lengths, padded=padded, backend=backend)
    back = mmfuse.unpack_modalities(out.tokens, lengths, [9, 2, 5], backend=backend)
    for x, y, n in zip(features, back, lengths):
        valid = torch.arange(x.shape[1], device=device)[None, :] < n[:, None]
        assert torch.equal(y, torch.where(valid[..., None], x, torch.zeros_like(x)))


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
@pytest.mark.parametrize("padded", [False, True])
def test_gradcheck(backend, padded):
    device = device_for(backend)
    dtype = torch.float64
    features, lengths = random_case(3, (4, 3), 5, dtype, device)
    features = [x.requires_grad_() for x in features]
    emb = torch.randn(2, 5, dtype=dtype, device=device, requires_grad=True)

    def pack(a, b, e):
        return mmfuse.pack_modalities([a, b], lengths, type_embedding=e, padded=padded, backend=backend).tokens

    def unpack(tokens):
        return mmfuse.unpack_modalities(tokens, lengths, [4, 3], backend=backend)

    assert torch.autograd.gradcheck(pack, (*features, emb))
    tokens = pack(*features, emb).detach().requires_grad_()
    assert torch.autograd.gradcheck(unpack, (tokens,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference(backend):
    device = device_for(backend)
    features, lengths = random_case(3, (6, 7), 16, torch.float32, device)
    emb = torch.randn(2, 16, device=device)
    grads = {}
    for name in ("reference", backend):
        xs = [x.clone().requires_grad_() for x in features]
        e = emb.clone().requires_grad_()
        out = mmfuse.pack_modalities(xs, lengths, type_embedding=e, backend=name).tokens
        out.backward(torch.arange(out.numel(), dtype=out.dtype, device=device).reshape(out.shape))
        grads[name] = [x.grad for x in xs] + [e.grad]
    for got, want in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(got, want)


def test_opcheck_cpu_ops():
    features = [torch.randn(3, n, 6, requires_grad=True) for n in (5, 2)]
    lengths = torch.tensor([[5, 0, 3], [1, 2, 0]], dtype=torch.int32)
    cu = torch.tensor([0, 6, 8, 11], dtype=torch.int32)
    emb = torch.randn(2, 6, requires_grad=True)
    for padded, out_len in ((False, 11), (False, None), (True, 6), (True, None)):
        torch.library.opcheck(torch.ops.mmfuse.pack_modalities.default, (features, lengths, cu, emb, padded, out_len))
    torch.library.opcheck(
        torch.ops.mmfuse.unpack_modalities.default, (torch.randn(11, 6, requires_grad=True), lengths, cu, [5, 2])
    )


@pytest.mark.parametrize("padded", [False, True])
def test_compile_fullgraph_with_data_dependent_lengths(padded):
    torch._dynamo.reset()
    packer = mmfuse.nn.ModalityPacker(2, 8, backend="cpu")
    features = [torch.randn(3, n, 8, requires_grad=True) for n in (5, 4)]
    lengths = [torch.tensor([5, 0, 2]), torch.tensor([1, 4, 0])]

    def step(a, b, la, lb):
        packed = packer([a, b], [la, lb], padded=padded)
        return packed.tokens.sin().sum() * packed.max_seqlen

    compiled = torch.compile(step, fullgraph=True)
    got = compiled(*features, *lengths)
    got.backward()
    compiled_grads = [x.grad.clone() for x in features]
    for x in features:
        x.grad = None
    want = step(*features, *lengths)
    want.backward()
    torch.testing.assert_close(got, want)
    for g, x in zip(compiled_grads, features):
        torch.testing.assert_close(g, x.grad)


def test_packer_layer_learns_its_type_embedding():
    packer = mmfuse.nn.ModalityPacker(3, 4)
    features = [torch.randn(2, n, 4) for n in (3, 1, 2)]
    out = packer(features)
    out.tokens.sum().backward()
    # every token of modality m adds one to d(sum)/d(emb[m])
    assert torch.equal(packer.type_embedding.grad, torch.tensor([[6.0] * 4, [2.0] * 4, [4.0] * 4]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f, l: mmfuse.pack_modalities([], None), "features must be a non-empty list"),
        (lambda f, l: mmfuse.pack_modalities([f[0].int(), f[1]], l), "features\\[0\\] must have dtype"),
        (lambda f, l: mmfuse.pack_modalities([f[0], f[1].double()], l), "features\\[1\\] must have dtype"),
        (lambda f, l: mmfuse.pack_modalities([f[0], f[1][:1]], l), "features\\[1\\] must have shape"),
        (lambda f, l: mmfuse.pack_modalities([f[0], f[1][..., :2]], l), "features\\[1\\] must have shape"),
        (lambda f, l: mmfuse.pack_modalities([f[0][0], f[1]], l), "features\\[0\\] must have 3 dimensions"),
        (lambda f, l: mmfuse.pack_modalities(f, l[:1]), "lengths must be None or a list of 2"),
        (lambda f, l: mmfuse.pack_modalities(f, [l[0], torch.tensor([1, -1])]), "lengths\\[1\\] must lie in"),
        (lambda f, l: mmfuse.pack_modalities(f, [l[0], torch.tensor([1, 5])]), "lengths\\[1\\] must lie in \\[0, 4\\]"),
        (lambda f, l: mmfuse.pack_modalities(f, [l[0], torch.tensor([1.0, 2.0])]), "lengths\\[1\\] must have dtype"),
        (lambda f, l: mmfuse.pack_modalities(f, [l[0], torch.tensor([1, 2, 3])]), "lengths\\[1\\] must have shape"),
        (lambda f, l: mmfuse.pack_modalities(f, l, type_embedding=torch.randn(3, 6)), "type_embedding must have shape"),
        (lambda f, l: mmfuse.pack_modalities(f, l, type_embedding=torch.randn(2, 6).double()), "type_embedding must have dtype"),
        (lambda f, l: mmfuse.pack_modalities(f, l, total=-3), "total must be a non-negative int"),
        (lambda f, l: mmfuse.pack_modalities(f, l, backend="tpu"), "backend must be one of"),
        (lambda f, l: mmfuse.pack_modalities(f, l, backend="cuda"), "backend 'cuda' cannot run this case: the 'cuda' backend takes CUDA tensors"),
        (lambda f, l: mmfuse.unpack_modalities(torch.randn(5, 6), l, [3]), "lengths must be a list of 1"),
        (lambda f, l: mmfuse.unpack_modalities(torch.randn(5, 6), l, [3, -4]), "sizes must be a list of non-negative"),
        (lambda f, l: mmfuse.unpack_modalities(torch.randn(3, 5, 6), l, [3, 4]), "padded tokens must have batch size 2"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, match):
    features = [torch.randn(2, 3, 6), torch.randn(2, 4, 6)]
    lengths = [torch.tensor([3, 1]), torch.tensor([0, 4])]
    with pytest.raises((ValueError, TypeError, NotImplementedError), match=match):
        call(features, lengths)


def test_wrong_total_is_caught_by_the_kernel():
    features = [torch.randn(2, 3, 6)]
    with pytest.raises(RuntimeError, match=r"total when packed\) must be the total token count, 5"):
        mmfuse.pack_modalities(features, [torch.tensor([3, 2])], total=4, backend="cpu")


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        mmfuse.pack_modalities([torch.randn(2, 3, 4)], backend="triton")


def test_env_override_selects_the_backend(monkeypatch):
    monkeypatch.setenv("MMFUSE_BACKEND", "reference")
    features = [torch.randn(2, 3, 4)]
    assert torch.equal(mmfuse.pack_modalities(features).tokens, features[0].reshape(6, 4))
    monkeypatch.setenv("MMFUSE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MMFUSE_BACKEND"):
        mmfuse.pack_modalities(features)

"""MultimodalClassifier: every subset of modalities, per-sample lengths, torch.compile, and the
training example's accuracies."""
import importlib.util
import itertools
import pathlib

import pytest
import torch

from mmfuse.models import ClassifierConfig, MultimodalClassifier

# odd sizes throughout (DESIGN.md): batch 3, 5 classes, 1601-sample clips, 13-token texts
CONFIG = ClassifierConfig(
    dim=24, num_heads=3, num_layers=1, ffn_dim=40, image_channels=2, image_size=20, patch_size=4, vocab_size=37,
    max_text_len=13, max_audio_samples=1601, n_mels=17, audio_strides=(2, 3), num_classes=5,
)
BATCH = 3
MODALITIES = ("images", "text", "audio")
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_multimodal.py"


def make_model() -> MultimodalClassifier:
    return MultimodalClassifier(CONFIG)


def make_inputs(present=MODALITIES, token_lengths=(13, 4, 1), audio_lengths=(1601, 977, 400)) -> dict:
    """forward() keyword arguments for the modalities in ``present``, zero-padded past the lengths."""
    token_lengths = torch.tensor(token_lengths)
    audio_lengths = torch.tensor(audio_lengths)
    tokens = torch.randint(1, CONFIG.vocab_size, (BATCH, CONFIG.max_text_len))
    tokens[torch.arange(CONFIG.max_text_len) >= token_lengths.unsqueeze(1)] = 0
    audio = torch.randn(BATCH, CONFIG.max_audio_samples) * (torch.arange(CONFIG.max_audio_samples) < audio_lengths.unsqueeze(1))
    inputs = {}
    if "images" in present:
        inputs["images"] = torch.randn(BATCH, CONFIG.image_channels, CONFIG.image_size, CONFIG.image_size)
    if "text" in present:
        inputs.update(tokens=tokens, token_lengths=token_lengths)
    if "audio" in present:
        inputs.update(audio=audio, audio_lengths=audio_lengths)
    return inputs


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(MODALITIES, r)]


@pytest.mark.parametrize("present", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_forward_backward_with_any_subset_of_modalities(present):
    model = make_model()
    logits = model(**make_inputs(present))
    assert logits.shape == (BATCH, CONFIG.num_classes)
    assert logits.isfinite().all()
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or p.grad.isfinite().all(), name
    # the encoders of the given modalities learn
    encoders = {"images": "image_encoder.", "text": "text_encoder.token_embedding", "audio": "audio_encoder.convs"}
    for modality in present:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(encoders[modality])]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), modality


def test_no_modality_raises():
    with pytest.raises(ValueError, match="at least one of images, tokens, audio"):
        make_model()()


def test_zero_length_text_and_audio_equal_absent_modalities():
    # sample 0 has empty text and audio: with images absent it attends to nothing
    model = make_model().eval()
    inputs = make_inputs(("text", "audio"), token_lengths=(0, 6, 13), audio_lengths=(0, 1, 1601))
    attended = []
    model.cross_attention.register_forward_hook(lambda module, args, out: attended.append(out[0]))
    logits = model(**inputs)
    assert logits.isfinite().all()
    # no key: the attention is 0 before out_proj, so its output is out_proj's bias
    torch.testing.assert_close(attended[0][0], model.cross_attention.out_proj.bias.expand(CONFIG.max_text_len + 1, -1))
    alone = model(tokens=inputs["tokens"][:1, :0], token_lengths=torch.tensor([0]))
    torch.testing.assert_close(logits[0], alone[0], atol=1e-5, rtol=1e-5)
    logits.sum().backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())


def test_samples_do_not_depend_on_their_batch_padding():
    model = make_model().eval()
    inputs = make_inputs()
    batched = model(**inputs)
    for i in range(BATCH):
        n_tok, n_audio = int(inputs["token_lengths"][i]), int(inputs["audio_lengths"][i])
        alone = model(
            images=inputs["images"][i : i + 1], tokens=inputs["tokens"][i : i + 1, :n_tok],
            token_lengths=inputs["token_lengths"][i : i + 1], audio=inputs["audio"][i : i + 1, :n_audio],
            audio_lengths=inputs["audio_lengths"][i : i + 1],
        )
        torch.testing.assert_close(batched[i], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("present", [MODALITIES, ("images", "audio")], ids=["all", "no-text"])
def test_compile_fullgraph_matches_eager(present):
    torch._dynamo.reset()
    model = make_model()
    inputs = make_inputs(present, token_lengths=(13, 0, 5), audio_lengths=(1601, 0, 808))
    eager = model(**inputs)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()), allow_unused=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_example_quick_mode_needs_every_modality():
    spec = importlib.util.spec_from_file_location("train_multimodal", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    accuracy = example.main(["--quick", "--seed", "0"])
    # measured (seed 0, attention dropout 0.1 on the fused kernel): full 0.998; image, text, audio
    # alone 0.771, 0.732, 0.746 (a majority of three cues caps one modality at 0.75 in expectation)
    assert accuracy["full"] >= 0.95
    for modality in ("image", "text", "audio"):
        assert accuracy[modality] <= 0.85, modality


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_matches_cpu():
    model = make_model()
    inputs = make_inputs(token_lengths=(13, 0, 5), audio_lengths=(1601, 0, 808))
    want = model(**inputs)
    # cuDNN convolutions default to TF32 on Ampere and later; compare at full fp32
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        got = model.cuda()(**{k: v.cuda() for k, v in inputs.items()})
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_trains_with_attention_dropout_on_the_fused_kernel(monkeypatch):
    """attention_dropout runs in the fused kernel (the reference is never called), is
    reproducible under torch.manual_seed, changes with the seed and is off in eval."""
    import dataclasses

    import mmfuse.reference.attention as reference_attention

    def no_reference(*args, **kwargs):
        raise AssertionError("the cross-attention ran on the reference")

    monkeypatch.setattr(reference_attention, "cross_attention", no_reference)
    config = dataclasses.replace(CONFIG, attention_dropout=0.3)
    inputs = make_inputs(token_lengths=(13, 0, 5), audio_lengths=(1601, 0, 808))

    def run(seed, train=True):
        torch.manual_seed(0)
        model = MultimodalClassifier(config).train(train)
        torch.manual_seed(seed)
        logits = model(**inputs)
        grads = torch.autograd.grad(logits.square().sum(), model.cross_attention.in_proj_weight)
        return logits.detach(), grads[0]

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.allclose(first[0], other[0])
    assert torch.equal(run(1, train=False)[0], run(2, train=False)[0])

"""mmfuse.mel_spectrogram, amplitude_to_db, whisper_log_mel, kaldi_fbank and their nn layers.

Oracles, all independent of mmfuse: ``mel64``, a float64 NumPy STFT (explicit padding,
framing, rfft) with ``librosa.filters.mel`` filters; ``librosa.feature.melspectrogram`` and
``librosa.power_to_db``; ``whisper64``, Whisper's ``log_mel_spectrogram`` formula in NumPy;
``kaldi_native_fbank`` for Kaldi fbank. These tests run the reference and the C++ ("cpu")
backend; test_spectrogram_kernels.py adds the Triton and CUDA backends, gradients of the
kernels, opcheck and compile.

Tolerances. float64 results match the float64 oracles to 1e-9 of the spectrum's peak. The
float32 default path meets DESIGN.md's mel power bound, atol 5e-4 and rtol 1e-5, with atol
taken relative to the spectrum's peak: unit-scale audio gives mel powers in the hundreds, where
float32 rounding alone is ~1e-5 absolute, so a fixed 5e-4 would test the audio's scale rather
than the code.
"""
import warnings

import librosa
import numpy as np
import pytest
import torch

import kaldi_native_fbank as knf
import mmfuse
import mmfuse.nn
from backend_params import backend_params

BACKENDS = backend_params("reference", "cpu")

# The defaults (n_fft=400, n_mels=128, HTK) leave empty mel filters, and mmfuse warns as
# torchaudio does (test_mel_spectrogram_warns_on_empty_filters); elsewhere that is noise.
pytestmark = pytest.mark.filterwarnings("ignore:mmfuse. at least one mel filter is all zero")


def assert_close_to_peak(out, ref, *, atol, rtol):
    """|out - ref| <= atol * max|ref| + rtol * |ref| everywhere, and the same shape."""
    out = torch.as_tensor(out, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    bound = atol * ref.abs().max() + rtol * ref.abs()
    err = (out - ref).abs()
    assert (err <= bound).all(), f"max error {err.max():.3e}, max error/peak {(err.max() / ref.abs().max()):.3e}"


def check_mel_tolerance(out, ref, dtype):
    if dtype == torch.float64:
        assert_close_to_peak(out, ref, atol=1e-9, rtol=1e-9)
    else:
        assert_close_to_peak(out, ref, atol=5e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Oracles


NP_PAD_MODES = {"reflect": "reflect", "constant": "constant", "replicate": "edge"}


def mel64(x, *, sample_rate=16000, n_fft=400, win_length=None, hop_length=None, f_min=0.0, f_max=None,
          pad=0, n_mels=128, window_fn=torch.hann_window, power=2.0, normalized=False, center=True,
          pad_mode="reflect", norm=None, mel_scale="htk"):
    """torchaudio MelSpectrogram's definition in float64 NumPy on a 1-D signal: (n_mels, frames)."""
    x = np.asarray(x, dtype=np.float64)
    win_length = win_length or n_fft
    hop_length = hop_length or win_length // 2
    window = window_fn(win_length, dtype=torch.float64).numpy()
    left = (n_fft - win_length) // 2
    window = np.pad(window, (left, n_fft - win_length - left))
    x = np.pad(x, pad)
    if center:
        x = np.pad(x, n_fft // 2, mode=NP_PAD_MODES[pad_mode])
    n_frames = 1 + (len(x) - n_fft) // hop_length
    frames = np.stack([x[i * hop_length : i * hop_length + n_fft] for i in range(n_frames)])
    spec = np.fft.rfft(frames * window, axis=-1)
    if normalized in (True, "window"):
        spec /= np.sqrt((window**2).sum())
    elif normalized == "frame_length":
        spec /= np.sqrt(n_fft)
    magnitude = np.abs(spec) ** power
    f_max = f_max if f_max is not None else sample_rate // 2
    fb = mel_filters64(sample_rate, n_fft, n_mels, f_min, f_max, htk=mel_scale == "htk", norm=norm)
    return fb @ magnitude.T


def mel_filters64(sample_rate, n_fft, n_mels, f_min, f_max, *, htk, norm):
    """librosa.filters.mel's triangles in float64, on torchaudio's frequency grid
    ``linspace(0, sample_rate // 2, n_fft // 2 + 1)``. For even ``n_fft`` that grid is the FFT's
    and this is librosa.filters.mel (test_mel_filters64_is_librosa); for odd ``n_fft``
    torchaudio's grid stretches the bins slightly and mmfuse follows torchaudio."""
    freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mel_f = librosa.mel_frequencies(n_mels + 2, fmin=f_min, fmax=f_max, htk=htk)
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - freqs[None, :]
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    if norm == "slaney":
        weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights


@pytest.mark.filterwarnings("ignore:Empty filters detected")
@pytest.mark.parametrize("htk", [True, False])
@pytest.mark.parametrize("norm", [None, "slaney"])
def test_mel_filters64_is_librosa(htk, norm):
    lib = librosa.filters.mel(sr=22000, n_fft=512, n_mels=61, fmin=31.0, fmax=9000.0, htk=htk, norm=norm,
                              dtype=np.float64)
    np.testing.assert_allclose(mel_filters64(22000, 512, 61, 31.0, 9000.0, htk=htk, norm=norm), lib,
                               rtol=1e-12, atol=1e-15)


def whisper64(audio, n_mels):
    """whisper.audio.log_mel_spectrogram in float64 NumPy on a 1-D clip: (n_mels, T // 160)."""
    audio = np.asarray(audio, dtype=np.float64)
    n = np.arange(400)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 400)  # periodic Hann
    x = np.pad(audio, 200, mode="reflect")
    n_frames = 1 + (len(x) - 400) // 160
    frames = np.stack([x[i * 160 : i * 160 + 400] for i in range(n_frames)])
    magnitudes = np.abs(np.fft.rfft(frames * window, axis=-1)[:-1]) ** 2
    # Whisper ships these filters rounded to float32 (mel_filters.npz); the float64 oracle keeps them exact
    filters = librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels, dtype=np.float64)
    log_spec = np.log10(np.maximum(filters @ magnitudes.T, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def knf_fbank(x, *, frame_length=25.0, frame_shift=10.0, num_mel_bins=23, low_freq=20.0, high_freq=0.0,
              snip_edges=True, window_type="povey", preemphasis_coefficient=0.97, remove_dc_offset=True,
              round_to_power_of_two=True, blackman_coeff=0.42, use_energy=False, energy_floor=1.0,
              raw_energy=True, htk_compat=False, use_log_fbank=True, use_power=True):
    """kaldi-native-fbank's features of a 1-D int16-scale clip: (frames, bins) float32 NumPy."""
    frame_opts = knf.FrameExtractionOptions(
        samp_freq=16000.0, frame_shift_ms=frame_shift, frame_length_ms=frame_length, dither=0.0,
        preemph_coeff=preemphasis_coefficient, remove_dc_offset=remove_dc_offset, window_type=window_type,
        round_to_power_of_two=round_to_power_of_two, blackman_coeff=blackman_coeff, snip_edges=snip_edges,
    )
    mel_opts = knf.MelBanksOptions(num_bins=num_mel_bins, low_freq=low_freq, high_freq=high_freq)
    opts = knf.FbankOptions(frame_opts=frame_opts, mel_opts=mel_opts, use_energy=use_energy,
                            energy_floor=energy_floor, raw_energy=raw_energy, htk_compat=htk_compat,
                            use_log_fbank=use_log_fbank, use_power=use_power)
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000.0, np.asarray(x, dtype=np.float32).tolist())
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


def int16_audio(*shape, dtype=torch.float64):
    """Kaldi's input scale: integer samples in the int16 range."""
    return torch.randint(-20000, 20000, shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# mel_spectrogram


MEL_CASES = [
    dict(mel_scale="htk", norm=None, power=2.0),
    dict(mel_scale="htk", norm="slaney", power=1.0),
    dict(mel_scale="slaney", norm=None, power=1.0),
    dict(mel_scale="slaney", norm="slaney", power=2.0),
    dict(normalized=True),
    dict(normalized="frame_length", power=1.0),
    dict(center=False),
    dict(pad_mode="constant"),
    dict(pad_mode="replicate"),
    dict(f_min=55.0, f_max=7001.0, n_mels=61),
    dict(win_length=301, hop_length=97),
    dict(pad=37),
    dict(pad=37, center=False, power=1.5),
    dict(sample_rate=22050 - 50, n_fft=512, n_mels=40, window_fn=torch.hamming_window),
    dict(n_fft=255, n_mels=31),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", MEL_CASES, ids=lambda c: ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in c.items()))
def test_mel_spectrogram_matches_float64_stft(case, dtype, backend):
    x = torch.randn(3, 4001, dtype=torch.float64)
    out = mmfuse.mel_spectrogram(x.to(dtype), backend=backend, **case)
    assert out.dtype == dtype
    for b in range(3):
        check_mel_tolerance(out[b], mel64(x[b].numpy(), **case), dtype)


def test_mel_spectrogram_warns_on_empty_filters():
    with pytest.warns(UserWarning, match="mel filter is all zero"):
        mmfuse.mel_spectrogram(torch.randn(800))  # torchaudio's defaults: 128 mels on 201 bins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmfuse.mel_spectrogram(torch.randn(800), n_mels=64)


def test_mel_spectrogram_frame_counts():
    for n_samples, hop, center, expected in [(4001, 200, True, 1 + 4001 // 200), (4001, 200, False, 1 + (4001 - 400) // 200)]:
        out = mmfuse.mel_spectrogram(torch.randn(n_samples), hop_length=hop, center=center, n_mels=40)
        assert out.shape == (40, expected)


def test_mel_spectrogram_matches_librosa():
    y = np.random.default_rng(7).uniform(-1, 1, 7919).astype(np.float64)
    kw = dict(n_fft=512, hop_length=128, n_mels=64)
    lib = librosa.feature.melspectrogram(y=y, sr=16000, power=2.0, center=True, pad_mode="constant",
                                         htk=False, norm="slaney", window="hann", **kw)
    out = mmfuse.mel_spectrogram(torch.from_numpy(y).float(), sample_rate=16000, pad_mode="constant",
                                 mel_scale="slaney", norm="slaney", **kw)
    assert_close_to_peak(out, lib, atol=5e-4, rtol=1e-5)
    db = mmfuse.amplitude_to_db(out, "power", top_db=80.0)
    lib_db = librosa.power_to_db(lib, ref=1.0, amin=1e-10, top_db=80.0)
    torch.testing.assert_close(db.double(), torch.from_numpy(lib_db), atol=1e-3, rtol=0)


def test_mel_spectrogram_batch_equals_single_items():
    x = torch.randn(2, 3, 2003)
    out = mmfuse.mel_spectrogram(x, n_mels=40)
    assert out.shape == (2, 3, 40, 1 + 2003 // 200)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], mmfuse.mel_spectrogram(x[i, j], n_mels=40), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant", "replicate"])
@pytest.mark.parametrize("center", [True, False])
def test_mel_spectrogram_lengths_equal_items_alone(pad_mode, center):
    x = torch.randn(3, 3001, dtype=torch.float64)
    lengths = torch.tensor([3001, 1237, 389])
    x_padded = x.clone()
    for b, n in enumerate(lengths.tolist()):
        x_padded[b, n:] = 0.0
    kw = dict(n_fft=256, hop_length=101, n_mels=32, pad_mode=pad_mode, center=center, pad=13)
    mel, frame_lengths = mmfuse.mel_spectrogram(x_padded, lengths=lengths, **kw)
    full = mmfuse.mel_spectrogram(x_padded, **kw)
    assert mel.shape == full.shape
    assert frame_lengths.dtype == torch.int64
    for b, n in enumerate(lengths.tolist()):
        alone = mmfuse.mel_spectrogram(x[b, :n], **kw)
        n_frames = alone.shape[-1]
        assert frame_lengths[b] == n_frames
        torch.testing.assert_close(mel[b, :, :n_frames], alone, rtol=1e-12, atol=1e-12)
        check_mel_tolerance(alone, mel64(x[b, :n].numpy(), **kw), torch.float64)
        assert (mel[b, :, n_frames:] == 0).all()


def test_mel_spectrogram_lengths_short_items_get_no_frames_without_center():
    x = torch.randn(2, 999)
    mel, frame_lengths = mmfuse.mel_spectrogram(x, n_fft=400, center=False, n_mels=20, lengths=torch.tensor([999, 399]))
    assert frame_lengths.tolist() == [1 + (999 - 400) // 200, 0]
    assert (mel[1] == 0).all()


def test_mel_spectrogram_one_sample():
    out = mmfuse.mel_spectrogram(torch.randn(1), pad_mode="constant", n_mels=16)
    assert out.shape == (16, 1)
    with pytest.raises(ValueError, match="waveform"):
        mmfuse.mel_spectrogram(torch.randn(1))  # reflect padding needs n_fft // 2 + 1 samples
    with pytest.raises(ValueError, match="n_fft"):
        mmfuse.mel_spectrogram(torch.randn(399), n_fft=400, center=False)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_mel_spectrogram_gradcheck(power):
    x = torch.randn(2, 67, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([67, 40])
    kw = dict(n_fft=32, hop_length=11, n_mels=5, sample_rate=8000, power=power)
    assert torch.autograd.gradcheck(lambda w: mmfuse.mel_spectrogram(w, **kw), (x,))
    assert torch.autograd.gradcheck(lambda w: mmfuse.mel_spectrogram(w, lengths=lengths, **kw)[0], (x,),
                                    fast_mode=True)


# ---------------------------------------------------------------------------------------------
# amplitude_to_db


@pytest.mark.parametrize("stype,multiplier", [("power", 10.0), ("magnitude", 20.0)])
def test_amplitude_to_db_formula(stype, multiplier):
    x = torch.rand(3, 2, 17, 29, dtype=torch.float64) ** 4
    x[0, 0, 0, 0] = 0.0  # clamped at amin = 1e-10
    expected = multiplier * torch.log10(torch.clamp(x, min=1e-10))
    torch.testing.assert_close(mmfuse.amplitude_to_db(x, stype), expected)
    assert mmfuse.amplitude_to_db(x, stype)[0, 0, 0, 0] == multiplier * -10.0


def test_amplitude_to_db_top_db_max_as_torchaudio():
    x = torch.rand(3, 2, 17, 29, dtype=torch.float64) ** 8
    x[1] *= 1e-3  # items with different peaks
    db = 10.0 * torch.log10(torch.clamp(x, min=1e-10))
    # 4-D: one max per leading index, over (channel, freq, time)
    out = mmfuse.amplitude_to_db(x, top_db=20.0)
    for b in range(3):
        torch.testing.assert_close(out[b], torch.maximum(db[b], db[b].max() - 20.0))
    assert (out[1] < db[0].max() - 20.0).any()
    # 3-D and 2-D: one max over the whole tensor
    for t, d in [(x[:, 0], db[:, 0]), (x[1, 0], db[1, 0])]:
        torch.testing.assert_close(mmfuse.amplitude_to_db(t, top_db=20.0), torch.maximum(d, d.max() - 20.0))


# ---------------------------------------------------------------------------------------------
# whisper_log_mel


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whisper_log_mel_matches_formula(n_mels, dtype, backend):
    audio = torch.randn(2, 16001, dtype=torch.float64) * 0.1
    audio[1, 8000:] *= 1e-4  # a quiet half, so the max - 8 clamp bites
    out = mmfuse.whisper_log_mel(audio.to(dtype), n_mels, backend=backend)
    assert out.shape == (2, n_mels, 16001 // 160) and out.dtype == dtype
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    for b in range(2):
        torch.testing.assert_close(out[b].double(), torch.from_numpy(whisper64(audio[b].numpy(), n_mels)),
                                   atol=atol, rtol=0)


def test_whisper_log_mel_lengths_equal_items_alone():
    audio = torch.randn(3, 4801, dtype=torch.float64)
    lengths = torch.tensor([4801, 2222, 201])
    for b, n in enumerate(lengths.tolist()):
        audio[b, n:] = 0.0
    out, frame_lengths = mmfuse.whisper_log_mel(audio, lengths=lengths)
    assert out.shape == (3, 80, 4801 // 160)
    assert frame_lengths.tolist() == [n // 160 for n in lengths.tolist()]
    for b, n in enumerate(lengths.tolist()):
        alone = torch.from_numpy(whisper64(audio[b, :n].numpy(), 80))
        torch.testing.assert_close(out[b, :, : n // 160], alone, atol=1e-10, rtol=0)
        assert (out[b, :, n // 160 :] == 0).all()
    with pytest.raises(ValueError, match="lengths"):
        mmfuse.whisper_log_mel(audio, lengths=torch.tensor([4801, 2222, 200]))


def test_whisper_log_mel_gradcheck():
    audio = torch.randn(2, 523, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([523, 400])
    # fast mode (random projections): the full Jacobian is 1046 inputs x 480 outputs
    assert torch.autograd.gradcheck(lambda a: mmfuse.whisper_log_mel(a, lengths=lengths)[0], (audio,),
                                    fast_mode=True)


# ---------------------------------------------------------------------------------------------
# kaldi_fbank


KALDI_CASES = [
    dict(),
    dict(snip_edges=False),
    dict(use_energy=True),
    dict(use_energy=True, raw_energy=False, htk_compat=True, energy_floor=0.0),
    dict(window_type="hamming", num_mel_bins=40),
    dict(window_type="hanning", low_freq=100.0, high_freq=-400.0),
    dict(window_type="rectangular", preemphasis_coefficient=0.0, remove_dc_offset=False),
    dict(window_type="blackman", blackman_coeff=0.4, high_freq=7000.0),
    dict(round_to_power_of_two=False, frame_length=20.0, frame_shift=7.0),
    dict(use_power=False),
    dict(use_log_fbank=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", KALDI_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_kaldi_fbank_matches_kaldi_native_fbank(case, dtype, backend):
    x = int16_audio(3, 5003)
    out = mmfuse.kaldi_fbank(x.to(dtype), backend=backend, **case)
    assert out.dtype == dtype
    for b in range(3):
        ref = knf_fbank(x[b].numpy(), **case)
        # kaldi-native-fbank computes in float32: log features (~10-25) agree to ~2e-5 absolute,
        # linear ones to float32 rounding of a sum over a few hundred bins (~1e-6 of the peak).
        if case.get("use_log_fbank", True):
            torch.testing.assert_close(out[b].double(), torch.from_numpy(ref).double(), atol=1e-4, rtol=0)
        else:
            assert_close_to_peak(out[b], ref, atol=1e-5, rtol=1e-4)


def test_kaldi_fbank_shapes_and_batch():
    x = int16_audio(3, 4001)
    batched = mmfuse.kaldi_fbank(x, num_mel_bins=31)
    assert batched.shape == (3, 1 + (4001 - 400) // 160, 31)
    for b in range(3):
        torch.testing.assert_close(batched[b], mmfuse.kaldi_fbank(x[b], num_mel_bins=31))
        torch.testing.assert_close(batched[b], mmfuse.kaldi_fbank(x[b : b + 1], num_mel_bins=31))
    assert mmfuse.kaldi_fbank(x[0], min_duration=1.0).shape == (0, 23)


def test_kaldi_fbank_subtract_mean():
    x = int16_audio(1, 3001)
    plain = mmfuse.kaldi_fbank(x)
    torch.testing.assert_close(mmfuse.kaldi_fbank(x, subtract_mean=True), plain - plain.mean(dim=0))


@pytest.mark.parametrize("snip_edges", [True, False])
def test_kaldi_fbank_lengths_equal_items_alone(snip_edges):
    x = int16_audio(4, 4001)
    lengths = torch.tensor([4001, 2345, 399, 123])
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = 0.0
    kw = dict(snip_edges=snip_edges, use_energy=True, subtract_mean=True)
    feats, frame_lengths = mmfuse.kaldi_fbank(x, lengths=lengths, **kw)
    assert feats.shape == mmfuse.kaldi_fbank(x, **kw).shape
    for b, n in enumerate(lengths.tolist()):
        n_frames = knf_fbank(x[b, :n].numpy(), snip_edges=snip_edges, use_energy=True).shape[0] if n >= 400 or not snip_edges else 0
        assert frame_lengths[b] == n_frames
        if n_frames:
            alone = knf_fbank(x[b, :n].numpy(), snip_edges=snip_edges, use_energy=True)
            alone = alone - alone.mean(axis=0)
            torch.testing.assert_close(feats[b, :n_frames], torch.from_numpy(alone).double(), atol=1e-4, rtol=0)
        assert (feats[b, n_frames:] == 0).all()


def test_kaldi_fbank_reflects_short_clips_like_kaldi():
    # frames reach 120 samples before the start and 280 past it: several reflections of 97 samples
    x = int16_audio(2, 251)
    feats, frame_lengths = mmfuse.kaldi_fbank(x, snip_edges=False, lengths=torch.tensor([251, 97]))
    for b, n in enumerate([251, 97]):
        ref = knf_fbank(x[b, :n].numpy(), snip_edges=False)
        assert frame_lengths[b] == ref.shape[0] == (n + 80) // 160
        torch.testing.assert_close(feats[b, : ref.shape[0]], torch.from_numpy(ref).double(), atol=1e-4, rtol=0)


def test_kaldi_fbank_gradcheck():
    x = (torch.randn(2, 461, dtype=torch.float64) * 1000).requires_grad_()
    lengths = torch.tensor([461, 430])
    kw = dict(num_mel_bins=5, use_energy=True, frame_length=10.0, frame_shift=5.0)
    assert torch.autograd.gradcheck(lambda w: mmfuse.kaldi_fbank(w, lengths=lengths, **kw)[0], (x,), rtol=1e-4,
                                    fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Bad input


BAD_INPUTS = [
    (lambda: mmfuse.mel_spectrogram(torch.randn(800, dtype=torch.float16)), TypeError, "waveform"),
    (lambda: mmfuse.mel_spectrogram(torch.randint(0, 9, (800,))), TypeError, "waveform"),
    (lambda: mmfuse.mel_spectrogram([0.0] * 800), TypeError, "waveform"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(())), ValueError, "waveform"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(0, 800)), ValueError, "waveform"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(2, 3, 800), lengths=torch.tensor([800, 800])), ValueError, "waveform"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(2, 800), lengths=torch.tensor([800, -1])), ValueError, "lengths"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(2, 800), lengths=torch.tensor([801, 800])), ValueError, "lengths"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(2, 800), lengths=torch.tensor([800])), ValueError, "lengths"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(2, 800), lengths=torch.tensor([800.0, 9.0])), TypeError, "lengths"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(2, 800), lengths=torch.tensor([800, 100])), ValueError, "lengths"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), n_fft=0), ValueError, "n_fft"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), n_fft=400.0), TypeError, "n_fft"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), hop_length=0), ValueError, "hop_length"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), hop_length=-3), ValueError, "hop_length"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), win_length=401), ValueError, "win_length"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), pad=-1), ValueError, "pad"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), n_mels=0), ValueError, "n_mels"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), pad_mode="circular"), ValueError, "pad_mode"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), mel_scale="bark"), ValueError, "mel_scale"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), norm="l2"), ValueError, "norm"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), normalized="yes"), ValueError, "normalized"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), power=0.0), ValueError, "power"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), f_min=9000.0), ValueError, "f_min"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), sample_rate=0), ValueError, "sample_rate"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), backend="gpu"), ValueError, "backend"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), backend="cuda"), ValueError, "'cuda' backend takes CUDA tensors"),
    (lambda: mmfuse.mel_spectrogram(torch.randn(800), window_fn=None), TypeError, "window_fn"),
    (lambda: mmfuse.amplitude_to_db(torch.rand(4, 4), stype="energy"), ValueError, "stype"),
    (lambda: mmfuse.amplitude_to_db(torch.rand(4, 4), top_db=-1.0), ValueError, "top_db"),
    (lambda: mmfuse.amplitude_to_db(torch.randint(0, 3, (4, 4))), TypeError, "x"),
    (lambda: mmfuse.whisper_log_mel(torch.randn(200)), ValueError, "audio"),
    (lambda: mmfuse.whisper_log_mel(torch.randn(800), n_mels=0), ValueError, "n_mels"),
    (lambda: mmfuse.whisper_log_mel(torch.randn(800).half()), TypeError, "audio"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), dither=1.0), ValueError, "dither"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), vtln_warp=0.9), ValueError, "vtln_warp"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(2, 800), channel=1), ValueError, "channel"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(2, 800), channel=0), ValueError, "channel"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(2, 2, 800)), ValueError, "waveform"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 399)), ValueError, "waveform"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), window_type="kaiser"), ValueError, "window_type"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), num_mel_bins=3), ValueError, "num_mel_bins"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), frame_shift=0.0), ValueError, "frame_shift"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), frame_length=0.05), ValueError, "frame_length"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), round_to_power_of_two=False, frame_length=25.0625),
     ValueError, "frame_length"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), low_freq=8000.0), ValueError, "low_freq"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), high_freq=9000.0), ValueError, "high_freq"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), preemphasis_coefficient=1.5), ValueError, "preemphasis"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(1, 800), energy_floor=-1.0), ValueError, "energy_floor"),
    (lambda: mmfuse.kaldi_fbank(int16_audio(2, 800), lengths=torch.tensor([900, 5])), ValueError, "lengths"),
    (lambda: mmfuse.nn.MelSpectrogram(hop_length=0), ValueError, "hop_length"),
    (lambda: mmfuse.nn.AmplitudeToDB(stype="db"), ValueError, "stype"),
    (lambda: mmfuse.nn.LogMelSpectrogram(log="log2"), ValueError, "log"),
    (lambda: mmfuse.nn.LogMelSpectrogram(power=1.5), ValueError, "power"),
    (lambda: mmfuse.nn.WhisperLogMel(n_mels=-1), ValueError, "n_mels"),
    (lambda: mmfuse.nn.KaldiFbank(dither=0.1), ValueError, "dither"),
    (lambda: mmfuse.nn.KaldiFbank(num_mel=40), TypeError, "num_mel"),
]


@pytest.mark.parametrize("call,exc,name", BAD_INPUTS, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


# ---------------------------------------------------------------------------------------------
# nn layers


def test_nn_mel_spectrogram_equals_function_and_has_buffers():
    kw = dict(sample_rate=16000, n_fft=512, win_length=401, hop_length=131, n_mels=48, f_min=30.0,
              norm="slaney", mel_scale="slaney", normalized=True, power=1.0)
    layer = mmfuse.nn.MelSpectrogram(**kw)
    assert dict(layer.named_buffers()).keys() == {"window", "mel_fb"}
    assert layer.window.shape == (401,) and layer.mel_fb.shape == (257, 48)
    assert set(layer.state_dict()) == {"window", "mel_fb"}
    x = torch.randn(2, 3001)
    torch.testing.assert_close(layer(x), mmfuse.mel_spectrogram(x, **kw), rtol=0, atol=0)
    lengths = torch.tensor([3001, 1700])
    for got, want in zip(layer(x, lengths), mmfuse.mel_spectrogram(x, lengths=lengths, **kw)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # float64 input through the float32 layer, and the layer moved to float64
    x64 = x.double()
    check_mel_tolerance(layer(x64), mmfuse.mel_spectrogram(x64, **kw), torch.float32)
    torch.testing.assert_close(layer.double()(x64), mmfuse.mel_spectrogram(x64, **kw), rtol=1e-6, atol=1e-6)


def test_nn_mel_spectrogram_wkwargs():
    layer = mmfuse.nn.MelSpectrogram(n_fft=256, n_mels=20, window_fn=torch.kaiser_window,
                                     wkwargs={"periodic": True, "beta": 8.0})
    torch.testing.assert_close(layer.window, torch.kaiser_window(256, periodic=True, beta=8.0))


def test_nn_amplitude_to_db_equals_function():
    x = torch.rand(2, 3, 20, 31)
    layer = mmfuse.nn.AmplitudeToDB("magnitude", top_db=40.0)
    torch.testing.assert_close(layer(x), mmfuse.amplitude_to_db(x, "magnitude", top_db=40.0), rtol=0, atol=0)


@pytest.mark.parametrize("log", ["db", "natural"])
def test_nn_log_mel_spectrogram(log):
    kw = dict(n_fft=400, hop_length=160, n_mels=64)
    top_db = 50.0 if log == "db" else None
    layer = mmfuse.nn.LogMelSpectrogram(log=log, top_db=top_db, **kw)
    x = torch.randn(3, 3203)
    x[1] *= 1e-3
    mel = mmfuse.mel_spectrogram(x, **kw)
    if log == "db":
        expected = torch.stack([mmfuse.amplitude_to_db(m, top_db=50.0) for m in mel])  # per clip
    else:
        expected = torch.clamp(mel, min=1e-10).log()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    lengths = torch.tensor([3203, 1000, 321])
    out, frame_lengths = layer(x, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = layer(x[b, :n])
        torch.testing.assert_close(out[b, :, : frame_lengths[b]], alone, rtol=1e-5, atol=1e-4)
        assert (out[b, :, frame_lengths[b] :] == 0).all()


def test_nn_whisper_log_mel_equals_function():
    layer = mmfuse.nn.WhisperLogMel(128)
    assert layer.window.shape == (400,) and layer.mel_fb.shape == (201, 128)
    np.testing.assert_allclose(layer.mel_fb.T.numpy(), librosa.filters.mel(sr=16000, n_fft=400, n_mels=128),
                               rtol=1e-5, atol=1e-7)
    audio = torch.randn(2, 4000)
    torch.testing.assert_close(layer(audio), mmfuse.whisper_log_mel(audio, 128), rtol=0, atol=0)
    lengths = torch.tensor([4000, 2500])
    for got, want in zip(layer(audio, lengths), mmfuse.whisper_log_mel(audio, 128, lengths=lengths)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_nn_kaldi_fbank_equals_function():
    kw = dict(num_mel_bins=40, use_energy=True, snip_edges=False, window_type="hamming")
    layer = mmfuse.nn.KaldiFbank(**kw)
    assert layer.window.shape == (400,) and layer.mel_fb.shape == (257, 40)
    x = int16_audio(3, 2401, dtype=torch.float32)
    torch.testing.assert_close(layer(x), mmfuse.kaldi_fbank(x, **kw), rtol=0, atol=0)
    torch.testing.assert_close(layer(x[0]), mmfuse.kaldi_fbank(x[0], **kw), rtol=0, atol=0)
    lengths = torch.tensor([2401, 1111, 500])
    for got, want in zip(layer(x, lengths), mmfuse.kaldi_fbank(x, lengths=lengths, **kw)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

"""Benchmark cases: the log-mel, spectrogram and MFCC front ends against torch.stft, librosa,
kaldi-native-fbank, torchaudio and transformers' WhisperFeatureExtractor. Every row has at
least the plain-torch peer (the torch.stft path), so no row is without one on any machine
(torchaudio may be missing: no build of it matches every torch)."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import torch

import mmfuse
from mmfuse.bench.case import Case

SAMPLE_RATE = 16000


def _whisper_stft_path(audio, filters, window):
    """OpenAI Whisper's log_mel_spectrogram, as its code computes it with torch.stft."""
    stft = torch.stft(audio, 400, 160, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def _stft_spectrogram(audio, window, power):
    """torchaudio.functional.spectrogram's definition in plain torch (defaults: n_fft 400, hop 200)."""
    spec = torch.stft(audio, 400, 200, window=window, center=True, pad_mode="reflect", return_complex=True)
    return spec if power is None else spec.abs().pow(power)


def _stft_mfcc(audio, window, fb, dct):
    """torchaudio.transforms.MFCC's definition in plain torch: the power mel spectrogram,
    AmplitudeToDB("power", top_db=80) with the max over the whole (C, n_mels, frames) tensor,
    then the DCT matrix."""
    mel = (fb.t() @ _stft_spectrogram(audio, window, 2.0))
    db = 10.0 * torch.clamp(mel, min=1e-10).log10()
    db = torch.maximum(db, db.amax() - 80.0)
    return (db.transpose(-1, -2) @ dct).transpose(-1, -2)


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# torchaudio's MelSpectrogram/MFCC defaults (n_fft 400, 128 HTK mels) leave some mel filters all
# zero: mmfuse warns about it, as torchaudio and librosa do. These rows benchmark exactly those
# defaults on purpose, so the warning says nothing to whoever runs the benchmark.
_EMPTY_FILTER_WARNINGS = ("mmfuse: at least one mel filter is all zero", "Empty filters detected",
                          "At least one mel filterbank has all zero values")


def _quiet(fn):
    """fn with the known empty-filter warnings of torchaudio's defaults silenced."""
    def call():
        with warnings.catch_warnings():
            for message in _EMPTY_FILTER_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            return fn()

    return call


def cases(device: torch.device, quick: bool, backends: list[str]):
    batch = 2 if quick else (8 if device.type == "cpu" else 16)
    audio = torch.randn(batch, 30 * SAMPLE_RATE, device=device) * 0.1
    window = torch.hann_window(400, device=device)
    from mmfuse.audio.filterbanks import create_dct, melscale_fbanks

    # Whisper's filters: librosa.filters.mel(sr=16000, n_fft=400, n_mels=80) (Slaney scale and norm)
    filters = melscale_fbanks(201, 0.0, SAMPLE_RATE / 2, 80, SAMPLE_RATE, "slaney", "slaney").t().float().to(device)
    peers = {"torch.stft path": lambda: _whisper_stft_path(audio, filters, window)}
    audio_np = audio.cpu().numpy()
    if _installed("transformers"):
        # what most Whisper users call: numpy audio in, log-mel out (its torch.stft path on `device`)
        from transformers import WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, n_fft=400)
        peers["transformers WhisperFeatureExtractor"] = lambda: extractor(
            audio_np, sampling_rate=SAMPLE_RATE, return_tensors="pt", device=str(device))["input_features"]
    if _installed("librosa") and device.type == "cpu":
        import librosa

        peers["librosa"] = lambda: librosa.power_to_db(librosa.feature.melspectrogram(
            y=audio_np, sr=SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=80, htk=False, norm="slaney"))
    if _installed("torchaudio"):
        import torchaudio

        mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=80,
                                                   norm="slaney", mel_scale="slaney").to(device)
        to_db = torchaudio.transforms.AmplitudeToDB(top_db=80.0).to(device)
        peers["torchaudio MelSpectrogram+AmplitudeToDB"] = lambda: to_db(mel(audio))
    ours = {b: (lambda b=b: mmfuse.whisper_log_mel(audio, backend=b)) for b in backends}
    moved = audio.numel() * 4 + batch * 80 * 3000 * 4
    yield Case("whisper_log_mel", f"B={batch} x 30 s", "float32", ours, peers, moved, "GB/s")

    # torchaudio's MelSpectrogram, Spectrogram and MFCC defaults (n_fft 400, hop 200, 128 HTK mels
    # without norm, 40 coefficients); the CUDA kernel has neither MFCC nor the complex spectrum, so
    # they are not asked of it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EMPTY_FILTER_WARNINGS[0])
        fb = melscale_fbanks(201, 0.0, SAMPLE_RATE / 2, 128, SAMPLE_RATE, None, "htk").float().to(device)
    dct = create_dct(40, 128, "ortho").float().to(device)
    frames = 1 + audio.shape[-1] // 200
    defaults = {b: _quiet(lambda b=b: mmfuse.mel_spectrogram(audio, backend=b)) for b in backends}
    mel_peers = {"torch.stft path": lambda: fb.t() @ _stft_spectrogram(audio, window, 2.0)}
    if _installed("librosa") and device.type == "cpu":
        import librosa

        mel_peers["librosa"] = _quiet(lambda: librosa.feature.melspectrogram(
            y=audio_np, sr=SAMPLE_RATE, n_fft=400, hop_length=200, n_mels=128, htk=True, norm=None, pad_mode="reflect"))
    if _installed("torchaudio"):
        import torchaudio

        ta_mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE).to(device)
        mel_peers["torchaudio MelSpectrogram"] = _quiet(lambda: ta_mel(audio))
    yield Case("mel_spectrogram", f"torchaudio defaults B={batch} x 30 s", "float32", defaults, mel_peers,
               audio.numel() * 4 + batch * 128 * frames * 4, "GB/s")

    spec_peers = {"torch.stft path": lambda: _stft_spectrogram(audio, window, 2.0)}
    spec = {b: (lambda b=b: mmfuse.spectrogram(audio, backend=b)) for b in backends}
    yield Case("spectrogram", f"power=2 B={batch} x 30 s", "float32", spec, spec_peers,
               audio.numel() * 4 + batch * 201 * frames * 4, "GB/s")
    complex_peers = {"torch.stft path": lambda: _stft_spectrogram(audio, window, None)}
    complex_spec = {b: (lambda b=b: mmfuse.spectrogram(audio, power=None, backend=b)) for b in backends if b != "cuda"}
    yield Case("spectrogram", f"power=None (complex) B={batch} x 30 s", "float32", complex_spec, complex_peers,
               audio.numel() * 4 + batch * 201 * frames * 8, "GB/s")
    mfcc_peers = {"torch.stft path": lambda: _stft_mfcc(audio, window, fb, dct)}
    if _installed("torchaudio"):
        import torchaudio

        ta_mfcc = torchaudio.transforms.MFCC(SAMPLE_RATE).to(device)
        mfcc_peers["torchaudio MFCC"] = _quiet(lambda: ta_mfcc(audio))
    mfcc_ours = {b: _quiet(lambda b=b: mmfuse.mfcc(audio, backend=b)) for b in backends if b != "cuda"}
    yield Case("mfcc", f"torchaudio defaults B={batch} x 30 s", "float32", mfcc_ours, mfcc_peers,
               audio.numel() * 4 + batch * 40 * frames * 4, "GB/s")

    clip = (torch.randn(30 * SAMPLE_RATE, device=device) * 3000).round()
    kaldi_peers = {}
    if _installed("kaldi_native_fbank"):  # a CPU library: on a GPU machine too, what users would call
        samples = clip.tolist()  # knf takes a list of floats; converting is not its cost
        kaldi_peers["kaldi-native-fbank"] = lambda: _knf_fbank(samples)
    if _installed("torchaudio"):
        import torchaudio

        kaldi_peers["torchaudio.compliance.kaldi.fbank"] = lambda: torchaudio.compliance.kaldi.fbank(clip[None])
    ours = {b: (lambda b=b: mmfuse.kaldi_fbank(clip, backend=b)) for b in backends}
    yield Case("kaldi_fbank", "1 x 30 s", "float32", ours, kaldi_peers, clip.numel() * 4, "GB/s")


def _knf_fbank(samples: list[float]) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SAMPLE_RATE, samples)
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])

"""Benchmark cases: the log-mel, spectrogram and MFCC front ends against torch.stft, librosa,
kaldi-native-fbank, torchaudio."""
from __future__ import annotations

import importlib.util

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


def cases(device: torch.device, quick: bool, backends: list[str]):
    batch = 2 if quick else (8 if device.type == "cpu" else 16)
    audio = torch.randn(batch, 30 * SAMPLE_RATE, device=device) * 0.1
    window = torch.hann_window(400, device=device)
    peers = {}
    if _installed("librosa"):
        import librosa

        filters = torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=400, n_mels=80)).to(device)
        peers["torch.stft path"] = lambda: _whisper_stft_path(audio, filters, window)
        if device.type == "cpu":
            audio_np = audio.numpy()
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

    defaults = {b: (lambda b=b: mmfuse.mel_spectrogram(audio, backend=b)) for b in backends}
    yield Case("mel_spectrogram", f"torchaudio defaults B={batch} x 30 s", "float32", defaults, {}, moved, "GB/s")

    # torchaudio's Spectrogram and MFCC defaults (n_fft 400, hop 200, 128 mels, 40 coefficients);
    # the CUDA kernel has neither MFCC nor the complex spectrum, so they are not asked of it
    from mmfuse.audio.filterbanks import create_dct, melscale_fbanks

    fb = melscale_fbanks(201, 0.0, SAMPLE_RATE / 2, 128, SAMPLE_RATE, None, "htk").float().to(device)
    dct = create_dct(40, 128, "ortho").float().to(device)
    frames = 1 + audio.shape[-1] // 200
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
        mfcc_peers["torchaudio MFCC"] = lambda: ta_mfcc(audio)
    mfcc_ours = {b: (lambda b=b: mmfuse.mfcc(audio, backend=b)) for b in backends if b != "cuda"}
    yield Case("mfcc", f"torchaudio defaults B={batch} x 30 s", "float32", mfcc_ours, mfcc_peers,
               audio.numel() * 4 + batch * 40 * frames * 4, "GB/s")

    clip = (torch.randn(30 * SAMPLE_RATE, device=device) * 3000).round()
    kaldi_peers = {}
    if device.type == "cpu" and _installed("kaldi_native_fbank"):
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

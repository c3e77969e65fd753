"""Triton kernel for ``mmfuse::mel_spectrogram`` (forward, float32).

One program per (item, block of BLOCK_F frames). Frames are gathered straight from the
waveform with the C++ kernel's padding index arithmetic (reflect, constant, replicate, Kaldi's
repeated reflection; no padded copy), Kaldi's DC removal and pre-emphasis applied on the fly,
and multiplied by the window. The DFT is a matrix product against a precomputed basis
``cos / sin(2 pi n k / n_fft)`` (built once per size in float64, cached, stored in float32),
chained in the kernel with ``|X|^power``, the mel product and the log; nothing but the output
reaches memory. Whisper's clamp at the item's max - 8 is a light second pass in PyTorch.

MFCC: the dB (10 log10) or offset (ln(x + 1e-6)) log, then the DCT as one more tl.dot of the
(frames, mels) tile against the (mels, n_mfcc) matrix in the same program (HAS_DCT). With
torchaudio's top_db clamp, whose max spans whole items, it is two phases: this kernel writes the
dB mel values, a PyTorch amax over each group's valid frames gives the floor, and
``_clamp_dct_kernel`` clamps and applies the DCT. The complex spectrum (COMPLEX_OUT) stores each
bin tile's real and imaginary parts and skips the mel product.

Precision: ``tl.dot(..., input_precision="ieee")``, exact float32 products (the default and
the only mode tested; an opt-in tf32 mode is not offered until its error is measured on a GPU).
The argument codes are those of ``mmfuse/contract/spectrogram.py``.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from mmfuse.contract.spectrogram import LOG_DB, LOG_OFFSET, LOG_WHISPER, TRITON_MAX_N_MELS, fake_mel_spectrogram
from mmfuse.triton._launch import launch, triton_custom_op

BLOCK_F = 16  # frames per program: tl.dot needs >= 16 rows
BLOCK_K = 32  # frame samples per step of the DFT product
BLOCK_N = 32  # frequency bins per step of the mel product
# DCT coefficients per step of the MFCC product: with 32, the (BLOCK_M, BLOCK_C) DCT tile next
# to the (BLOCK_F, BLOCK_M) mel tile spilled registers past 128 mel bins (make triton-check)
BLOCK_C = 16



@triton.jit
def _samples(x_ptr, j, length, pad, PAD_MODE: tl.constexpr, mask):
    """Samples at positions ``j`` of an item's signal zero-padded by ``pad`` each side, with
    ``PAD_MODE`` (0 constant, 1 reflect, 2 replicate, 3 Kaldi) outside it."""
    padded = length + 2 * pad
    if PAD_MODE == 1:
        j = tl.where(j < 0, -j, j)
        j = tl.where(j >= padded, 2 * (padded - 1) - j, j)
    elif PAD_MODE == 2:
        j = tl.minimum(tl.maximum(j, 0), padded - 1)
    elif PAD_MODE == 3:
        period = tl.maximum(2 * padded, 1)
        j = j % period
        j = tl.where(j < 0, j + period, j)
        j = tl.where(j >= padded, period - 1 - j, j)
    src = j - pad
    ok = mask & (j >= 0) & (j < padded) & (src >= 0) & (src < length)
    return tl.load(x_ptr + src, mask=ok, other=0.0)


@triton.jit
def _frame_tile(x_ptr, window_ptr, start, k, win, length, pad, mean, preemph, frame_ok,
                PAD_MODE: tl.constexpr, PREEMPH: tl.constexpr):
    """(BLOCK_F, BLOCK_K) samples ``k`` of each frame: ``raw`` after DC removal, ``y`` after
    pre-emphasis and the window; 0 past ``win``."""
    in_win = k < win
    mask = frame_ok[:, None] & in_win[None, :]
    raw = _samples(x_ptr, start[:, None] + k[None, :], length, pad, PAD_MODE, mask) - mean[:, None]
    raw = tl.where(mask, raw, 0.0)
    y = raw
    if PREEMPH:
        # Kaldi's Preemphasize: x[k] -= c * x[k - 1], and x[0] -= c * x[0]
        prev_k = tl.maximum(k - 1, 0)
        prev = _samples(x_ptr, start[:, None] + prev_k[None, :], length, pad, PAD_MODE, mask) - mean[:, None]
        y = raw - preemph * tl.where(mask, prev, 0.0)
    w = tl.load(window_ptr + k, mask=in_win, other=0.0)
    return raw, y * w[None, :]


@triton.jit
def _mel_spectrogram_kernel(
    x_ptr,  # (B, T) float32, contiguous
    window_ptr,  # (win,)
    cos_ptr,  # (win, n_bins): cos(2 pi n k / n_fft)
    sin_ptr,  # (win, n_bins): sin(2 pi n k / n_fft)
    fb_ptr,  # (n_bins, n_mels)
    dct_ptr,  # (n_mels, n_mfcc); read when HAS_DCT
    lengths_ptr,  # (B,) int64 samples per item; read when HAS_LENGTHS
    frame_lengths_ptr,  # (B,) int64 valid frames per item; read when HAS_LENGTHS
    out_ptr,  # (B, frames, n_feats) if FRAMES_MAJOR else (B, n_feats, frames)
    T, num_frames, win, n_bins, n_mels, n_mfcc, n_feats, hop, frame_offset, pad,
    preemph, power, log_floor, log_energy_floor,
    PAD_MODE: tl.constexpr, HAS_LENGTHS: tl.constexpr, REMOVE_DC: tl.constexpr, PREEMPH: tl.constexpr,
    POWER_MODE: tl.constexpr,  # 0: |X|^2, 1: |X|, 2: |X|^power
    LOG_MODE: tl.constexpr, ENERGY_MODE: tl.constexpr, ENERGY_LAST: tl.constexpr, FLOOR_ENERGY: tl.constexpr,
    FRAMES_MAJOR: tl.constexpr, HAS_DCT: tl.constexpr, COMPLEX_OUT: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + b)
        item_frames = tl.load(frame_lengths_ptr + b)
    else:
        length = T
        item_frames = num_frames
    frame_ok = f < item_frames
    start = f.to(tl.int64) * hop + frame_offset
    x_ptr += b.to(tl.int64) * T
    kk = tl.arange(0, BLOCK_K)
    zero_f = tl.zeros([BLOCK_F], dtype=tl.float32)

    mean = zero_f
    if REMOVE_DC:
        total = zero_f
        for k0 in range(0, win, BLOCK_K):
            raw, _ = _frame_tile(x_ptr, window_ptr, start, k0 + kk, win, length, pad, zero_f, preemph, frame_ok,
                                 PAD_MODE, False)
            total += tl.sum(raw, axis=1)
        mean = total / win
    energy = zero_f
    if ENERGY_MODE != 0:
        for k0 in range(0, win, BLOCK_K):
            raw, y = _frame_tile(x_ptr, window_ptr, start, k0 + kk, win, length, pad, mean, preemph, frame_ok,
                                 PAD_MODE, PREEMPH)
            if ENERGY_MODE == 1:
                energy += tl.sum(raw * raw, axis=1)
            else:
                energy += tl.sum(y * y, axis=1)

    nn = tl.arange(0, BLOCK_N)
    mm = tl.arange(0, BLOCK_M)
    mel = tl.zeros([BLOCK_F, BLOCK_M], dtype=tl.float32)
    for n0 in range(0, n_bins, BLOCK_N):
        re = tl.zeros([BLOCK_F, BLOCK_N], dtype=tl.float32)
        im = tl.zeros([BLOCK_F, BLOCK_N], dtype=tl.float32)
        bins_ok = (n0 + nn) < n_bins
        for k0 in range(0, win, BLOCK_K):
            k = k0 + kk
            _, y = _frame_tile(x_ptr, window_ptr, start, k, win, length, pad, mean, preemph, frame_ok,
                               PAD_MODE, PREEMPH)
            basis_mask = (k < win)[:, None] & bins_ok[None, :]
            basis = k[:, None] * n_bins + n0 + nn[None, :]
            c = tl.load(cos_ptr + basis, mask=basis_mask, other=0.0)
            s = tl.load(sin_ptr + basis, mask=basis_mask, other=0.0)
            re += tl.dot(y, c, input_precision="ieee")
            im += tl.dot(y, s, input_precision="ieee")
        if COMPLEX_OUT:
            # (B, n_bins, frames, 2): X = sum y e^(-2 pi i n k / n_fft) = re - i im
            c_offs = ((b.to(tl.int64) * n_bins + n0 + nn[None, :]) * num_frames + f[:, None]) * 2
            c_mask = (f < num_frames)[:, None] & bins_ok[None, :]
            tl.store(out_ptr + c_offs, tl.where(frame_ok[:, None], re, 0.0), mask=c_mask)
            tl.store(out_ptr + c_offs + 1, tl.where(frame_ok[:, None], -im, 0.0), mask=c_mask)
        else:
            mag = re * re + im * im
            if POWER_MODE == 1:
                mag = tl.sqrt(mag)
            elif POWER_MODE == 2:
                mag = tl.where(mag > 0.0, tl.exp2(0.5 * power * tl.log2(tl.maximum(mag, 1e-38))), 0.0)
            fb_mask = bins_ok[:, None] & (mm < n_mels)[None, :]
            fb = tl.load(fb_ptr + (n0 + nn[:, None]) * n_mels + mm[None, :], mask=fb_mask, other=0.0)
            mel += tl.dot(mag, fb, input_precision="ieee")

    if COMPLEX_OUT:
        return
    if LOG_MODE == 1:
        mel = tl.log(tl.maximum(mel, log_floor))
    elif LOG_MODE == 2:
        mel = tl.log(tl.maximum(mel, log_floor)) * 0.4342944819032518  # log10
    elif LOG_MODE == 3:
        mel = tl.log(tl.maximum(mel, log_floor)) * 4.342944819032518  # 10 log10: dB of a power
    elif LOG_MODE == 4:
        mel = tl.log(mel + log_floor)
    if HAS_DCT:
        # (frames, mels) @ (mels, n_mfcc); padded mel columns meet zero DCT rows
        cc = tl.arange(0, BLOCK_C)
        for c0 in range(0, n_mfcc, BLOCK_C):
            d_mask = (mm < n_mels)[:, None] & ((c0 + cc) < n_mfcc)[None, :]
            d = tl.load(dct_ptr + mm[:, None] * n_mfcc + c0 + cc[None, :], mask=d_mask, other=0.0)
            coef = tl.where(frame_ok[:, None], tl.dot(mel, d, input_precision="ieee"), 0.0)
            c_col = c0 + cc
            if FRAMES_MAJOR:
                d_offs = (b.to(tl.int64) * num_frames + f[:, None]) * n_feats + c_col[None, :]
            else:
                d_offs = (b.to(tl.int64) * n_feats + c_col[None, :]) * num_frames + f[:, None]
            tl.store(out_ptr + d_offs, coef, mask=(f < num_frames)[:, None] & (c_col < n_mfcc)[None, :])
        return
    shift = 1 if (ENERGY_MODE != 0 and not ENERGY_LAST) else 0
    col = mm + shift
    out_mask = (f < num_frames)[:, None] & (mm < n_mels)[None, :]
    mel = tl.where(frame_ok[:, None], mel, 0.0)
    if FRAMES_MAJOR:
        offs = (b.to(tl.int64) * num_frames + f[:, None]) * n_feats + col[None, :]
    else:
        offs = (b.to(tl.int64) * n_feats + col[None, :]) * num_frames + f[:, None]
    tl.store(out_ptr + offs, mel, mask=out_mask)
    if ENERGY_MODE != 0:
        log_e = tl.log(tl.maximum(energy, log_floor))
        if FLOOR_ENERGY:
            log_e = tl.maximum(log_e, log_energy_floor)
        log_e = tl.where(frame_ok, log_e, 0.0)
        e_col = n_mels if ENERGY_LAST else 0
        if FRAMES_MAJOR:
            e_offs = (b.to(tl.int64) * num_frames + f) * n_feats + e_col
        else:
            e_offs = (b.to(tl.int64) * n_feats + e_col) * num_frames + f
        tl.store(out_ptr + e_offs, log_e, mask=f < num_frames)


@triton.jit
def _clamp_dct_kernel(
    logs_ptr,  # (B, n_mels, frames) dB values
    floor_ptr,  # (B,) each item's clamp: its group's max - top_db
    dct_ptr,  # (n_mels, n_mfcc)
    frame_lengths_ptr,  # (B,) int64; read when HAS_LENGTHS
    out_ptr,  # (B, n_mfcc, frames)
    num_frames, n_mels, n_mfcc,
    HAS_LENGTHS: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """MFCC's second phase: max(l, floor[b]) then the DCT, 0 past an item's frames."""
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    if HAS_LENGTHS:
        item_frames = tl.load(frame_lengths_ptr + b)
    else:
        item_frames = num_frames
    frame_ok = f < item_frames
    mm = tl.arange(0, BLOCK_M)
    cc = tl.arange(0, BLOCK_C)
    l_mask = frame_ok[:, None] & (mm < n_mels)[None, :]
    logs = tl.load(logs_ptr + (b.to(tl.int64) * n_mels + mm[None, :]) * num_frames + f[:, None], mask=l_mask,
                   other=0.0)
    logs = tl.maximum(logs, tl.load(floor_ptr + b))
    for c0 in range(0, n_mfcc, BLOCK_C):
        d_mask = (mm < n_mels)[:, None] & ((c0 + cc) < n_mfcc)[None, :]
        d = tl.load(dct_ptr + mm[:, None] * n_mfcc + c0 + cc[None, :], mask=d_mask, other=0.0)
        coef = tl.where(frame_ok[:, None], tl.dot(logs, d, input_precision="ieee"), 0.0)
        offs = (b.to(tl.int64) * n_mfcc + c0 + cc[None, :]) * num_frames + f[:, None]
        tl.store(out_ptr + offs, coef, mask=(f < num_frames)[:, None] & ((c0 + cc) < n_mfcc)[None, :])


@functools.lru_cache(maxsize=16)
def dft_basis(n_fft: int, win: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(win, n_fft // 2 + 1)`` cos and sin of ``2 pi n k / n_fft``, built in float64
    (``n k`` reduced mod ``n_fft`` first, so the angles are exact). Cached: do not modify."""
    n = torch.arange(win, dtype=torch.int64)[:, None]
    k = torch.arange(n_fft // 2 + 1, dtype=torch.int64)[None, :]
    angle = (n * k % n_fft).to(torch.float64) * (2.0 * math.pi / n_fft)
    return angle.cos().float().to(device), angle.sin().float().to(device)


@triton_custom_op("mmfuse::mel_spectrogram_triton", fake=fake_mel_spectrogram)
def mel_spectrogram_triton(
    waveform: torch.Tensor,
    window: torch.Tensor,
    mel_fb: torch.Tensor,
    lengths: torch.Tensor | None,
    frame_lengths: torch.Tensor | None,
    num_frames: int,
    n_fft: int,
    hop: int,
    frame_offset: int,
    pad: int,
    pad_mode: int,
    remove_dc: bool,
    preemphasis: float,
    power: float,
    log_mode: int,
    log_floor: float,
    energy_mode: int,
    energy_floor: float,
    energy_last: bool,
    frames_major: bool,
    dct: torch.Tensor | None = None,
    top_db: float = -1.0,
    top_db_group: int = 1,
    complex_out: bool = False,
) -> torch.Tensor:
    """Triton twin of ``torch.ops.mmfuse.mel_spectrogram`` (float32)."""
    batch, num_samples = waveform.shape
    win, n_bins, n_mels = window.shape[0], mel_fb.shape[0], mel_fb.shape[1]
    two_phase = dct is not None and top_db >= 0.0  # the clamp's max spans whole items
    fused_dct = dct is not None and not two_phase
    n_mfcc = dct.shape[1] if dct is not None else 0
    if complex_out:
        shape = (batch, n_bins, num_frames, 2)
        n_feats = n_bins
    else:
        n_feats = n_mfcc if fused_dct else n_mels + int(energy_mode != 0)
        frames_major_here = frames_major and not two_phase
        shape = (batch, num_frames, n_feats) if frames_major_here else (batch, n_feats, num_frames)
    out = waveform.new_empty(shape)
    cos, sin = dft_basis(n_fft, win, waveform.device)
    grid = (batch, triton.cdiv(num_frames, BLOCK_F))
    has_lengths = lengths is not None
    if batch > 0 and num_frames > 0:
        launch(_mel_spectrogram_kernel)[grid](
            waveform, window, cos, sin, mel_fb, dct if fused_dct else waveform,
            lengths if has_lengths else waveform, frame_lengths if has_lengths else waveform, out,
            num_samples, num_frames, win, n_bins, n_mels, n_mfcc, n_feats, hop, frame_offset, pad,
            preemphasis, power, log_floor, math.log(energy_floor) if energy_floor > 0.0 else 0.0,
            PAD_MODE=pad_mode, HAS_LENGTHS=has_lengths, REMOVE_DC=remove_dc, PREEMPH=preemphasis != 0.0,
            POWER_MODE=0 if power == 2.0 else 1 if power == 1.0 else 2, LOG_MODE=log_mode, ENERGY_MODE=energy_mode,
            ENERGY_LAST=energy_last, FLOOR_ENERGY=energy_floor > 0.0,
            FRAMES_MAJOR=frames_major and not two_phase and not complex_out, HAS_DCT=fused_dct,
            COMPLEX_OUT=complex_out, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_M=_block_m(n_mels),
            BLOCK_C=BLOCK_C,
        )
    if log_mode == LOG_WHISPER:
        out = _whisper_clamp(out, frame_lengths, frames_major)
    if log_mode == LOG_DB and top_db >= 0.0 and dct is None:
        out = _db_clamp(out, frame_lengths, frames_major, top_db, top_db_group)
    if two_phase:
        out = _clamp_dct(out, dct, frame_lengths, top_db, top_db_group, frames_major)
    return out


def _group_floor(logs: torch.Tensor, frame_lengths, top_db: float, group: int, frames_major: bool = False):
    """(B,) floors: the max over each group of ``group`` items' valid frames, minus ``top_db``."""
    if frame_lengths is not None:
        frame_axis = 1 if frames_major else 2
        valid = torch.arange(logs.shape[frame_axis], device=logs.device) < frame_lengths.unsqueeze(-1)
        valid = valid.unsqueeze(2) if frames_major else valid.unsqueeze(1)
        logs = torch.where(valid, logs, float("-inf"))
    item_max = logs.amax(dim=(1, 2))
    return item_max.reshape(-1, group).amax(dim=1).repeat_interleave(group) - top_db


def _db_clamp(out, frame_lengths, frames_major, top_db, group):
    """top_db without a DCT: max(l, floor) on valid frames (0 past them stays 0)."""
    floor = _group_floor(out, frame_lengths, top_db, group, frames_major)[:, None, None]
    clamped = torch.maximum(out, floor)
    if frame_lengths is None:
        return clamped
    frame_axis = 1 if frames_major else 2
    valid = torch.arange(out.shape[frame_axis], device=out.device) < frame_lengths.unsqueeze(-1)
    valid = valid.unsqueeze(2) if frames_major else valid.unsqueeze(1)
    return torch.where(valid, clamped, 0.0)


def _clamp_dct(logs, dct, frame_lengths, top_db, group, frames_major):
    """MFCC's second phase on the (B, n_mels, frames) dB values of the first."""
    batch, n_mels, num_frames = logs.shape
    floor = _group_floor(logs, frame_lengths, top_db, group).contiguous()
    out = logs.new_empty(batch, dct.shape[1], num_frames)
    if batch > 0 and num_frames > 0:
        has_lengths = frame_lengths is not None
        launch(_clamp_dct_kernel)[(batch, triton.cdiv(num_frames, BLOCK_F))](
            logs, floor, dct, frame_lengths if has_lengths else logs, out, num_frames, n_mels, dct.shape[1],
            HAS_LENGTHS=has_lengths, BLOCK_F=BLOCK_F, BLOCK_M=_block_m(n_mels), BLOCK_C=BLOCK_C,
        )
    return out.transpose(1, 2).contiguous() if frames_major else out


def _block_m(n_mels: int) -> int:
    """Mel bins per program: all of them, rounded up to a power of two, tl.dot's minimum 16."""
    return max(16, triton.next_power_of_2(n_mels))


def aot_cases() -> list:
    """What the launcher above launches on a GPU, for ``mmfuse.triton.aot_check``: float32, with
    every optional step on (Kaldi padding, lengths, DC removal, pre-emphasis, |X|^power, log,
    windowed energy first and floored, frames-major) at every BLOCK_M up to TRITON_MAX_N_MELS
    bins; then each other value of each flag (the dB and offset logs and the complex spectrum
    among them), one at a time, at 128 bins; MFCC with the fused DCT at every BLOCK_M; then
    MFCC's clamp + DCT kernel at every BLOCK_M. The flags change elementwise code only, the
    tiles are fixed but for BLOCK_M."""
    from mmfuse.triton._aot import kernel_case

    full = dict(PAD_MODE=3, HAS_LENGTHS=True, REMOVE_DC=True, PREEMPH=True, POWER_MODE=2, LOG_MODE=1,
                ENERGY_MODE=2, ENERGY_LAST=False, FLOOR_ENERGY=True, FRAMES_MAJOR=True, HAS_DCT=False,
                COMPLEX_OUT=False)
    others = dict(PAD_MODE=(0, 1, 2), HAS_LENGTHS=(False,), REMOVE_DC=(False,), PREEMPH=(False,), POWER_MODE=(0, 1),
                  LOG_MODE=(0, LOG_WHISPER, LOG_DB, LOG_OFFSET), ENERGY_MODE=(0, 1), ENERGY_LAST=(True,),
                  FLOOR_ENERGY=(False,), FRAMES_MAJOR=(False,), COMPLEX_OUT=(True,))
    # MFCC as mfcc() launches it: reflect padding, lengths, |X|^2, the dB log and the fused DCT
    mfcc = dict(PAD_MODE=1, HAS_LENGTHS=True, REMOVE_DC=False, PREEMPH=False, POWER_MODE=0, LOG_MODE=LOG_DB,
                ENERGY_MODE=0, ENERGY_LAST=False, FLOOR_ENERGY=False, FRAMES_MAJOR=False, HAS_DCT=True,
                COMPLEX_OUT=False)
    variants = [(full, block_m) for block_m in sorted({_block_m(n) for n in range(1, TRITON_MAX_N_MELS + 1)})]
    variants += [(dict(full, **{flag: value}), 128) for flag, values in others.items() for value in values]
    variants += [(mfcc, block_m) for block_m in sorted({_block_m(n) for n in range(1, TRITON_MAX_N_MELS + 1)})]
    variants += [(dict(mfcc, LOG_MODE=LOG_OFFSET), 128)]
    cases = []
    for flags, block_m in variants:
        # without lengths the waveform stands in for the two int64 length vectors
        lengths = torch.int64 if flags["HAS_LENGTHS"] else torch.float32
        pointers = dict(x_ptr=torch.float32, window_ptr=torch.float32, cos_ptr=torch.float32, sin_ptr=torch.float32,
                        fb_ptr=torch.float32, dct_ptr=torch.float32, lengths_ptr=lengths, frame_lengths_ptr=lengths,
                        out_ptr=torch.float32)
        cases.append(kernel_case(_mel_spectrogram_kernel, "float32", pointers,
                                 dict(flags, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_M=block_m,
                                      BLOCK_C=BLOCK_C),
                                 floats=("preemph", "power", "log_floor", "log_energy_floor")))
    for has_lengths in (True, False):
        for block_m in sorted({_block_m(n) for n in range(1, TRITON_MAX_N_MELS + 1)}):
            lengths = torch.int64 if has_lengths else torch.float32
            pointers = dict(logs_ptr=torch.float32, floor_ptr=torch.float32, dct_ptr=torch.float32,
                            frame_lengths_ptr=lengths, out_ptr=torch.float32)
            cases.append(kernel_case(_clamp_dct_kernel, "float32", pointers,
                                     dict(HAS_LENGTHS=has_lengths, BLOCK_F=BLOCK_F, BLOCK_M=block_m,
                                          BLOCK_C=BLOCK_C)))
    return cases


def _whisper_clamp(out: torch.Tensor, frame_lengths: torch.Tensor | None, frames_major: bool) -> torch.Tensor:
    """Whisper's second pass: ``(max(l, item max - 8) + 4) / 4`` on valid frames, 0 past them."""
    frame_axis = 1 if frames_major else 2
    if frame_lengths is None:
        item_max = out.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(out, item_max - 8.0) + 4.0) / 4.0
    valid = torch.arange(out.shape[frame_axis], device=out.device) < frame_lengths.unsqueeze(-1)
    valid = valid.unsqueeze(2) if frames_major else valid.unsqueeze(1)
    item_max = torch.where(valid, out, float("-inf")).amax(dim=(1, 2), keepdim=True)
    return torch.where(valid, (torch.maximum(out, item_max - 8.0) + 4.0) / 4.0, 0.0)

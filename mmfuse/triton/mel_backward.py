"""Triton backward of ``mmfuse::mel_spectrogram`` w.r.t. the waveform (float32): the gradient
of the Triton forward op ``mmfuse::mel_spectrogram_triton``, with the C++ backward's semantics
(csrc/cpu/mel_spectrogram.cpp, ``backward``).

Steps, each the adjoint of a forward one, from the output's gradient back to the samples:

1. PyTorch glue on ``(B, n_mels, frames)`` tensors (light, as the forward's clamps are): the
   DCT's transpose (MFCC), then the gradient of the top_db / Whisper clamp at the group's max
   minus the depth, ties split as autograd splits them (``torch.maximum``: half each; ``amax``:
   evenly among the maxima). The log values it needs come from one forward launch without the
   log (the mel values), logged in PyTorch.
2. ``_spectral_grad_kernel``, one program per (item, block of frames, block of bins):
   recomputes the frame's DFT tile (as the forward does, Kaldi's DC removal and pre-emphasis
   included), takes the log's derivative at the mel
   values (0 below the floor, as torch.clamp's gradient), ``dmag = dmel @ mel_fb^T`` and
   ``d|X|^p/dX = p |X|^(p-2) X`` (0 where ``|X| = 0`` for ``p != 2``), and writes
   ``A = dmag p |X|^(p-2) Re``, ``Bq = dmag p |X|^(p-2) Im'`` per bin (``Im'`` the sine sum,
   ``X = Re - i Im'``). The complex spectrum (``complex_out``) needs no recomputation: ``A`` and
   ``Bq`` are the gradient's real part and its negated imaginary part.
3. ``_frame_grad_kernel``, one program per (item, block of frames, block of samples):
   ``dy = A @ cos^T + Bq @ sin^T`` over all bins, times the window: each frame's sample
   gradients.
4. PyTorch glue: Kaldi's per-frame adjoints where asked for (the log energy's gradient, windowed
   or raw, then pre-emphasis's and DC removal's transposes, on the frames' samples gathered
   again), then the overlap-add of the frame gradients into the waveform's through the forward's
   padding index arithmetic (``index_put_`` accumulating), valid frames only.

Frames-major (Kaldi) gradients are transposed to ``(B, feats, frames)`` first. Gradients w.r.t.
the window, filterbank or DCT are not computed (``mmfuse.ops.spectrogram`` sends those cases to
the reference).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfuse.contract.spectrogram import (
    ENERGY_NONE,
    ENERGY_RAW,
    ENERGY_WINDOWED,
    LOG_DB,
    LOG_NONE,
    LOG_WHISPER,
    fake_mel_spectrogram_backward,
    register_mel_autograd,
)
from mmfuse.triton import mel_spectrogram as fwd
from mmfuse.triton._launch import launch, triton_custom_op

BLOCK_F = fwd.BLOCK_F  # frames per program (tl.dot's 16 rows)
BLOCK_K = fwd.BLOCK_K  # frame samples per step of the DFT recomputation
BLOCK_N = fwd.BLOCK_N  # bins per program (spectral) and per step (frame gradient)
BLOCK_M = 32  # mel bins per step of the filterbank's transpose
BLOCK_S = 64  # frame samples per program of the frame gradient


@triton.jit
def _spectral_grad_kernel(
    x_ptr,  # (B, T) float32
    window_ptr,  # (win,)
    cos_ptr,  # (win, n_bins)
    sin_ptr,  # (win, n_bins)
    fb_ptr,  # (n_bins, n_mels)
    mel_ptr,  # (B, n_mels, frames): the forward's mel values before the log; read when LOG_MODE != 0
    dlog_ptr,  # (B, n_mels, frames): the gradient w.r.t. the log values (or the mel values: LOG_MODE 0)
    lengths_ptr,  # (B,) int64; read when HAS_LENGTHS
    frame_lengths_ptr,  # (B,) int64; read when HAS_LENGTHS
    a_ptr,  # (B, frames, n_bins): dL/dRe' x p |X|^(p-2) Re
    b_ptr,  # (B, frames, n_bins): the same with the sine sum
    T, num_frames, win, n_bins, n_mels, hop, frame_offset, pad, preemph, power, log_floor,
    PAD_MODE: tl.constexpr, HAS_LENGTHS: tl.constexpr, REMOVE_DC: tl.constexpr, PREEMPH: tl.constexpr,
    POWER_MODE: tl.constexpr, LOG_MODE: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    n0 = tl.program_id(2) * BLOCK_N
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
    nn = tl.arange(0, BLOCK_N)
    mm = tl.arange(0, BLOCK_M)
    zero_f = tl.zeros([BLOCK_F], dtype=tl.float32)
    mean = zero_f
    if REMOVE_DC:
        total = zero_f
        for k0 in range(0, win, BLOCK_K):
            raw, _ = fwd._frame_tile(x_ptr, window_ptr, start, k0 + kk, win, length, pad, zero_f, preemph, frame_ok,
                                     PAD_MODE, False)
            total += tl.sum(raw, axis=1)
        mean = total / win

    # this bin block's spectrum, recomputed
    bins_ok = (n0 + nn) < n_bins
    re = tl.zeros([BLOCK_F, BLOCK_N], dtype=tl.float32)
    im = tl.zeros([BLOCK_F, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, win, BLOCK_K):
        k = k0 + kk
        _, y = fwd._frame_tile(x_ptr, window_ptr, start, k, win, length, pad, mean, preemph, frame_ok, PAD_MODE,
                               PREEMPH)
        basis_mask = (k < win)[:, None] & bins_ok[None, :]
        basis = k[:, None] * n_bins + n0 + nn[None, :]
        c = tl.load(cos_ptr + basis, mask=basis_mask, other=0.0)
        s = tl.load(sin_ptr + basis, mask=basis_mask, other=0.0)
        re += tl.dot(y, c, input_precision="ieee")
        im += tl.dot(y, s, input_precision="ieee")

    # dmag = dmel @ mel_fb^T on this bin block, BLOCK_M mel bins at a time, dmel = dL/dlog times
    # the log's derivative at the forward's mel values (after the DFT loop and in chunks: the whole
    # (BLOCK_F, n_mels) tile live in the loop spilled on sm_80)
    dmag = tl.zeros([BLOCK_F, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, n_mels, BLOCK_M):
        m = m0 + mm
        m_mask = frame_ok[:, None] & (m < n_mels)[None, :]
        m_offs = (b.to(tl.int64) * n_mels + m[None, :]) * num_frames + f[:, None]
        g = tl.load(dlog_ptr + m_offs, mask=m_mask, other=0.0)
        if LOG_MODE != 0:
            mel = tl.load(mel_ptr + m_offs, mask=m_mask, other=1.0)
            if LOG_MODE == 4:
                g = g / (mel + log_floor)
            else:
                if LOG_MODE == 2:
                    scale = 0.4342944819032518  # log10
                elif LOG_MODE == 3:
                    scale = 4.342944819032518  # 10 log10
                else:
                    scale = 1.0
                above = mel >= log_floor
                g = tl.where(above, g * scale / tl.where(above, mel, 1.0), 0.0)
        fbt_mask = (m < n_mels)[:, None] & bins_ok[None, :]
        fbt = tl.load(fb_ptr + (n0 + nn[None, :]) * n_mels + m[:, None], mask=fbt_mask, other=0.0)
        dmag += tl.dot(g, fbt, input_precision="ieee")
    mag = re * re + im * im
    if POWER_MODE == 0:
        scale_p = tl.full([BLOCK_F, BLOCK_N], 2.0, tl.float32)
    elif POWER_MODE == 1:
        scale_p = tl.where(mag > 0.0, 1.0 / tl.sqrt(tl.where(mag > 0.0, mag, 1.0)), 0.0)
    else:
        safe = tl.where(mag > 0.0, mag, 1.0)
        scale_p = tl.where(mag > 0.0, power * tl.exp2((0.5 * power - 1.0) * tl.log2(safe)), 0.0)
    d = tl.where(frame_ok[:, None], dmag * scale_p, 0.0)
    offs = (b.to(tl.int64) * num_frames + f[:, None]) * n_bins + n0 + nn[None, :]
    o_mask = (f < num_frames)[:, None] & bins_ok[None, :]
    tl.store(a_ptr + offs, d * re, mask=o_mask)
    tl.store(b_ptr + offs, d * im, mask=o_mask)


@triton.jit
def _frame_grad_kernel(
    a_ptr,  # (B, frames, n_bins)
    b_ptr,  # (B, frames, n_bins)
    cos_ptr,  # (win, n_bins)
    sin_ptr,  # (win, n_bins)
    window_ptr,  # (win,)
    frame_lengths_ptr,  # (B,) int64; read when HAS_LENGTHS
    out_ptr,  # (B, frames, win): dL/d(frame sample), 0 on invalid frames
    num_frames, win, n_bins,
    HAS_LENGTHS: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    k = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    if HAS_LENGTHS:
        item_frames = tl.load(frame_lengths_ptr + b)
    else:
        item_frames = num_frames
    frame_ok = f < item_frames
    k_ok = k < win
    nn = tl.arange(0, BLOCK_N)
    dy = tl.zeros([BLOCK_F, BLOCK_S], dtype=tl.float32)
    row = (b.to(tl.int64) * num_frames + f[:, None]) * n_bins
    for n0 in range(0, n_bins, BLOCK_N):
        n = n0 + nn
        g_mask = frame_ok[:, None] & (n < n_bins)[None, :]
        ga = tl.load(a_ptr + row + n[None, :], mask=g_mask, other=0.0)
        gb = tl.load(b_ptr + row + n[None, :], mask=g_mask, other=0.0)
        basis_mask = (n < n_bins)[:, None] & k_ok[None, :]
        basis = k[None, :] * n_bins + n[:, None]  # (BLOCK_N, BLOCK_S): basis^T
        c = tl.load(cos_ptr + basis, mask=basis_mask, other=0.0)
        s = tl.load(sin_ptr + basis, mask=basis_mask, other=0.0)
        dy += tl.dot(ga, c, input_precision="ieee")
        dy += tl.dot(gb, s, input_precision="ieee")
    w = tl.load(window_ptr + k, mask=k_ok, other=0.0)
    dy = tl.where(frame_ok[:, None], dy * w[None, :], 0.0)
    offs = (b.to(tl.int64) * num_frames + f[:, None]) * win + k[None, :]
    tl.store(out_ptr + offs, dy, mask=(f < num_frames)[:, None] & k_ok[None, :])


def _source_index(j: torch.Tensor, length: torch.Tensor, pad: int, pad_mode: int) -> torch.Tensor:
    """The forward's ``_samples`` index map in PyTorch: the sample position ``j`` of the padded
    signal reads, or -1 (a zero)."""
    padded = length + 2 * pad
    if pad_mode == 1:
        j = torch.where(j < 0, -j, j)
        j = torch.where(j >= padded, 2 * (padded - 1) - j, j)
    elif pad_mode == 2:
        j = torch.minimum(torch.maximum(j, torch.zeros_like(j)), padded - 1)
    elif pad_mode == 3:
        period = torch.clamp(2 * padded, min=1)
        j = torch.remainder(j, period)
        j = torch.where(j >= padded, period - 1 - j, j)
    src = j - pad
    ok = (j >= 0) & (j < padded) & (src >= 0) & (src < length)
    return torch.where(ok, src, -1)


def _clamp_grad(logs, grad, frame_lengths, depth: float, group: int, scale: float):
    """dL/dl for ``torch.maximum(l, amax(l over the group's valid frames) - depth) * scale`` on
    ``(B, n_mels, frames)``, as autograd gives it (the C++ ``clamp_grad``)."""
    batch = logs.shape[0]
    g = grad * scale
    if frame_lengths is not None:
        valid = (torch.arange(logs.shape[2], device=logs.device) < frame_lengths.unsqueeze(-1)).unsqueeze(1)
        logs = torch.where(valid, logs, float("-inf"))
        g = torch.where(valid, g, 0.0)
    ref = logs.amax(dim=(1, 2)).reshape(-1, group).amax(dim=1)  # (groups,)
    ref_b = ref.repeat_interleave(group)[:, None, None]
    floor = ref_b - depth
    tie = logs == floor
    half = torch.where(tie, g * 0.5, 0.0)
    dl = torch.where(logs > floor, g, half)
    to_max = torch.where(logs < floor, g, half).reshape(-1, group * logs.shape[1] * logs.shape[2]).sum(1)
    is_max = logs == ref_b
    ties = is_max.reshape(-1, group * logs.shape[1] * logs.shape[2]).sum(1).clamp(min=1).to(g.dtype)
    share = (to_max / ties).repeat_interleave(group)[:, None, None]
    dl = dl + torch.where(is_max, share, 0.0)
    return dl.reshape(batch, *dl.shape[1:])


def _log_values(mel, log_mode: int, log_floor: float):
    if log_mode == LOG_WHISPER:
        return torch.clamp(mel, min=log_floor).log10()
    if log_mode == LOG_DB:
        return 10.0 * torch.clamp(mel, min=log_floor).log10()
    return torch.clamp(mel, min=log_floor).log()


@triton_custom_op("mmfuse::mel_spectrogram_backward_triton", fake=fake_mel_spectrogram_backward)
def mel_spectrogram_backward_triton(
    grad: torch.Tensor,
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
    """Triton twin of ``torch.ops.mmfuse.mel_spectrogram_backward`` (float32): dL/dwaveform."""
    batch, num_samples = waveform.shape
    win, n_bins, n_mels = window.shape[0], mel_fb.shape[0], mel_fb.shape[1]
    if complex_out:
        want = (batch, n_bins, num_frames, 2)
    else:
        n_feats = dct.shape[1] if dct is not None else n_mels + int(energy_mode != ENERGY_NONE)
        want = (batch, num_frames, n_feats) if frames_major else (batch, n_feats, num_frames)
    if tuple(grad.shape) != want or grad.dtype != torch.float32 or waveform.dtype != torch.float32:
        raise ValueError(f"mel_spectrogram_backward_triton: grad must be float32 {want} and the waveform float32, "
                         f"got {grad.dtype} {tuple(grad.shape)} and {waveform.dtype}")
    grad_wave = torch.zeros_like(waveform)
    if batch == 0 or num_frames == 0:
        return grad_wave
    has_lengths = lengths is not None
    cos, sin = fwd.dft_basis(n_fft, win, waveform.device)
    grad = grad.contiguous()
    frames_grid = triton.cdiv(num_frames, BLOCK_F)
    grad_energy = None
    if complex_out:
        # (B, n_bins, frames, 2) -> A = dL/dRe X, Bq = -dL/dIm X, (B, frames, n_bins)
        ga = grad[..., 0].transpose(1, 2).contiguous()
        gb = (-grad[..., 1]).transpose(1, 2).contiguous()
    else:
        dlog = grad.transpose(1, 2) if frames_major else grad  # (B, feats, frames)
        if energy_mode != ENERGY_NONE:
            e_col = n_mels if energy_last else 0
            grad_energy = dlog[:, e_col]
            dlog = dlog[:, :n_mels] if energy_last else dlog[:, 1:]
        if dct is not None:
            dlog = torch.einsum("mc,bcf->bmf", dct, dlog)
        mel = None
        if log_mode != LOG_NONE:
            mel = fwd.mel_spectrogram_triton(
                waveform, window, mel_fb, lengths, frame_lengths, num_frames, n_fft, hop, frame_offset, pad,
                pad_mode, remove_dc, preemphasis, power, LOG_NONE, log_floor, ENERGY_NONE, 0.0, False, False)
        if log_mode == LOG_WHISPER or (log_mode == LOG_DB and top_db >= 0.0):
            whisper = log_mode == LOG_WHISPER
            dlog = _clamp_grad(_log_values(mel, log_mode, log_floor), dlog, frame_lengths,
                               8.0 if whisper else top_db, 1 if whisper else top_db_group, 0.25 if whisper else 1.0)
        dlog = dlog.contiguous()
        ga = waveform.new_empty(batch, num_frames, n_bins)
        gb = waveform.new_empty(batch, num_frames, n_bins)
        launch(_spectral_grad_kernel)[(batch, frames_grid, triton.cdiv(n_bins, BLOCK_N))](
            waveform, window, cos, sin, mel_fb, mel if mel is not None else dlog, dlog,
            lengths if has_lengths else waveform, frame_lengths if has_lengths else waveform, ga, gb,
            num_samples, num_frames, win, n_bins, n_mels, hop, frame_offset, pad, preemphasis, power, log_floor,
            PAD_MODE=pad_mode, HAS_LENGTHS=has_lengths, REMOVE_DC=remove_dc, PREEMPH=preemphasis != 0.0,
            POWER_MODE=_power_mode(power), LOG_MODE=log_mode,
            BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M,
        )
    frame_grad = waveform.new_empty(batch, num_frames, win)
    launch(_frame_grad_kernel)[(batch, frames_grid, triton.cdiv(win, BLOCK_S))](
        ga, gb, cos, sin, window, frame_lengths if has_lengths else ga, frame_grad, num_frames, win, n_bins,
        HAS_LENGTHS=has_lengths, BLOCK_F=BLOCK_F, BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S,
    )
    # overlap-add through the padding map, valid frames only
    device = waveform.device
    f = torch.arange(num_frames, device=device, dtype=torch.int64)
    k = torch.arange(win, device=device, dtype=torch.int64)
    j = (f * hop + frame_offset)[:, None] + k[None, :]  # (frames, win)
    length = lengths.to(torch.int64)[:, None, None] if has_lengths else torch.full(
        (batch, 1, 1), num_samples, device=device, dtype=torch.int64)
    src = _source_index(j.unsqueeze(0), length, pad, pad_mode)  # (B, frames, win)
    ok = src >= 0
    if has_lengths:
        ok = ok & (f[None, :] < frame_lengths[:, None]).unsqueeze(-1)
    flat = src + (torch.arange(batch, device=device, dtype=torch.int64) * num_samples)[:, None, None]
    flat = torch.where(ok, flat, 0)
    if remove_dc or preemphasis != 0.0 or grad_energy is not None:
        frame_grad = _kaldi_frame_grad(frame_grad, torch.where(ok, waveform.reshape(-1)[flat], 0.0), window,
                                       grad_energy, remove_dc, preemphasis, energy_mode, log_floor, energy_floor)
    # index_put_ with accumulate: a deterministic kernel exists for it when torch asks for one
    grad_wave.view(-1).index_put_((flat.reshape(-1),), torch.where(ok, frame_grad, 0.0).reshape(-1), accumulate=True)
    return grad_wave


def _kaldi_frame_grad(dyw, raw, window, grad_energy, remove_dc, preemphasis, energy_mode, log_floor, energy_floor):
    """The adjoints of Kaldi's per-frame steps on ``(B, frames, win)``, from ``dyw`` (the DFT's
    gradient times the window) and the frames' samples ``raw`` (PyTorch, as the C++ backward's
    per-frame loop): windowed or raw energy, pre-emphasis, DC removal."""
    if remove_dc:
        raw = raw - raw.mean(dim=-1, keepdim=True)
    c = preemphasis
    y = raw
    if c != 0.0:
        prev = torch.cat([raw[..., :1], raw[..., :-1]], dim=-1)
        y = raw - c * prev
    dy = dyw
    denergy = None
    if grad_energy is not None:
        yw = y * window
        e = (raw * raw if energy_mode == ENERGY_RAW else yw * yw).sum(dim=-1)
        keep = e >= log_floor
        if energy_floor > 0.0:
            keep = keep & ~(torch.clamp(e, min=log_floor).log() < math.log(energy_floor))
        denergy = torch.where(keep, grad_energy / torch.where(keep, e, 1.0), 0.0).unsqueeze(-1)
        if energy_mode == ENERGY_WINDOWED:
            dy = dy + denergy * 2.0 * yw * window
    draw = dy
    if c != 0.0:
        nxt = torch.cat([dy[..., 1:], torch.zeros_like(dy[..., :1])], dim=-1)
        draw = dy - c * nxt
        draw = torch.cat([draw[..., :1] - c * dy[..., :1], draw[..., 1:]], dim=-1)
    if denergy is not None and energy_mode == ENERGY_RAW:
        draw = draw + denergy * 2.0 * raw
    if remove_dc:
        draw = draw - draw.mean(dim=-1, keepdim=True)
    return draw


def _power_mode(power: float) -> int:
    return 0 if power == 2.0 else 1 if power == 1.0 else 2


register_mel_autograd(fwd.mel_spectrogram_triton, mel_spectrogram_backward_triton)


def aot_cases() -> list:
    """What the backward launches on a GPU, at one config each for ``mmfuse.triton.aot_check``
    (the flags change elementwise code only): the spectral kernel with reflect padding, lengths,
    DC removal, pre-emphasis, |X|^power and the dB log (its tiles do not depend on n_mels); the frame gradient kernel
    with lengths."""
    from mmfuse.triton._aot import kernel_case

    f32 = torch.float32
    pointers = dict(x_ptr=f32, window_ptr=f32, cos_ptr=f32, sin_ptr=f32, fb_ptr=f32, mel_ptr=f32, dlog_ptr=f32,
                    lengths_ptr=torch.int64, frame_lengths_ptr=torch.int64, a_ptr=f32, b_ptr=f32)
    spectral = kernel_case(_spectral_grad_kernel, "float32", pointers,
                           dict(PAD_MODE=1, HAS_LENGTHS=True, REMOVE_DC=True, PREEMPH=True, POWER_MODE=2,
                                LOG_MODE=LOG_DB, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M),
                           floats=("preemph", "power", "log_floor"))
    frame = kernel_case(_frame_grad_kernel, "float32",
                        dict(a_ptr=f32, b_ptr=f32, cos_ptr=f32, sin_ptr=f32, window_ptr=f32,
                             frame_lengths_ptr=torch.int64, out_ptr=f32),
                        dict(HAS_LENGTHS=True, BLOCK_F=BLOCK_F, BLOCK_N=BLOCK_N, BLOCK_S=BLOCK_S))
    return [spectral, frame]


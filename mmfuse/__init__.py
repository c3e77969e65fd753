"""mmfuse: fused kernels for multimodal models.

Cross-modal attention, multimodal packing and fusion, and log-mel front ends, each with a
CUDA, a Triton, a C++ CPU kernel and a pure-PyTorch reference behind one custom-op contract
(see DESIGN.md). Every function takes ``backend=`` ("auto", "cuda", "triton", "cpu",
"reference").
"""
from mmfuse._extension import build_info
from mmfuse.backends import available_backends
from mmfuse.ops.attention import cross_attention, cross_attention_varlen
from mmfuse.ops.fusion import combine_modalities, fused_concat_linear
from mmfuse.ops.packing import PackedModalities, pack_modalities, unpack_modalities
from mmfuse.ops.spectrogram import (
    amplitude_to_db,
    kaldi_fbank,
    mel_spectrogram,
    mfcc,
    spectrogram,
    whisper_log_mel,
)
from mmfuse import masks  # key_ranges builders (torch ops only)
from mmfuse import nn  # layers last: they build on the ops above
from mmfuse import models  # models after the layers they build on

__version__ = "0.1.0"

__all__ = [
    "available_backends", "build_info", "combine_modalities", "cross_attention", "cross_attention_varlen",
    "fused_concat_linear", "pack_modalities", "unpack_modalities", "PackedModalities", "amplitude_to_db",
    "kaldi_fbank", "mel_spectrogram", "mfcc", "spectrogram", "whisper_log_mel", "masks", "nn", "models",
]

"""mmfuse: fused kernels for multimodal models.

Cross-modal attention, multimodal packing and fusion, and log-mel front ends, each with a
CUDA, a Triton, a C++ CPU kernel and a pure-PyTorch reference behind one custom-op contract
(see DESIGN.md). Every function takes ``backend=`` ("auto", "cuda", "triton", "cpu",
"reference").
"""
from mmfuse._extension import build_info
from mmfuse.backends import available_backends
from mmfuse.ops.attention import cross_attention, cross_attention_varlen
from mmfuse.ops.spectrogram import amplitude_to_db, kaldi_fbank, mel_spectrogram, whisper_log_mel

__version__ = "0.1.0"
from mmfuse.ops.packing import PackedModalities, pack_modalities, unpack_modalities
from mmfuse import nn  # noqa: E402  (layers; imported last, they use the ops above)

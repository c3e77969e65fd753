"""``MultimodalClassifier``: image, text and audio encoders fused by mmfuse's layers.

The data path, with B samples and width D:

- image ``(B, C, S, S)`` → conv patch embedding + position embedding + transformer layers →
  ``(B, P, D)`` patch tokens, P = (S / patch_size)²;
- tokens ``(B, Lt)`` → a learned query token prepended, token + position embeddings,
  transformer layers → ``(B, 1 + Lt, D)``; the query token's output is the pooled text feature;
- audio ``(B, T)`` → ``LogMelSpectrogram`` → strided ``Conv1d`` subsampling → ``(B, La, D)``;
- ``ModalityPacker`` packs each sample's valid image and audio tokens into ``(B, Lk, D)`` with
  a key padding mask; ``CrossModalAttention`` lets the text tokens (query token included)
  attend to them; the attended features are averaged over each sample's valid queries;
- ``FeatureFusion`` fuses the pooled text and attended features; a linear head gives logits.

A missing modality is fed as zeros with zero lengths rather than skipped, so every call runs
the same layers and the model compiles with ``fullgraph=True`` whatever is absent (Dynamo
traces once per pattern of None arguments; zero ``token_lengths``/``audio_lengths`` with
tensors given reuse one graph). A sample
with neither image nor audio attends to nothing and gets 0 from the attention (mmfuse's
guarantee for fully masked rows), so its logits come from the query token alone.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mmfuse.nn import CrossModalAttention, FeatureFusion, LogMelSpectrogram, ModalityPacker


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of a :class:`MultimodalClassifier`.

    dim: D, the token width of every encoder and of the fusion.
    num_heads: attention heads in every transformer layer and in the cross-attention.
    num_layers: transformer layers in the image encoder and in the text encoder.
    ffn_dim: hidden width of the transformer layers' feed-forward blocks.
    dropout: dropout in the transformer layers; 0 keeps training deterministic.
    attention_dropout: dropout on the cross-attention probabilities in training, applied in the
        fused kernels (a Philox stream seeded from torch's generator: ``torch.manual_seed``
        reproduces a run).
    image_channels, image_size, patch_size: images are (C, S, S); S must divide by patch_size.
    vocab_size: token ids lie in [0, vocab_size).
    max_text_len: the longest token sequence (sizes the position embedding, and the zero
        placeholder when no text is given).
    sample_rate: of the audio, in Hz.
    max_audio_samples: the longest waveform (the zero placeholder when no audio is given).
    n_fft, hop_length, n_mels: of the log-mel front end.
    audio_strides: strides of the Conv1d subsampling layers (kernel 3 each); their product is
        the frame subsampling factor.
    fusion_mode: ``FeatureFusion`` mode.
    num_classes: logits per sample.
    """

    dim: int = 64
    num_heads: int = 4
    num_layers: int = 1
    ffn_dim: int = 128
    dropout: float = 0.0
    attention_dropout: float = 0.0
    image_channels: int = 1
    image_size: int = 32
    patch_size: int = 8
    vocab_size: int = 64
    max_text_len: int = 16
    sample_rate: int = 16000
    max_audio_samples: int = 8000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 40
    audio_strides: tuple[int, ...] = (2, 2)
    fusion_mode: str = "concat"
    num_classes: int = 2


class MultimodalClassifier(nn.Module):
    """Classify samples from any subset of image, text and audio (see the module docstring).

    Args:
        config: a :class:`ClassifierConfig`; default sizes when None.
        backend: the mmfuse backend of the packing, attention and fusion layers.
    """

    def __init__(self, config: ClassifierConfig | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        cfg = ClassifierConfig() if config is None else config
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(
                f"MultimodalClassifier: image_size must be a multiple of patch_size, "
                f"got image_size={cfg.image_size}, patch_size={cfg.patch_size}"
            )
        self.config = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.audio_encoder = AudioEncoder(cfg)
        self.packer = ModalityPacker(2, cfg.dim, backend=backend)
        self.cross_attention = CrossModalAttention(cfg.dim, cfg.num_heads, dropout=cfg.attention_dropout, backend=backend)
        self.fusion = FeatureFusion([cfg.dim, cfg.dim], cfg.dim, mode=cfg.fusion_mode, activation="gelu", backend=backend)
        self.head = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.num_classes))

    def forward(
        self,
        images: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        token_lengths: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, num_classes)``; at least one of images, tokens, audio must be given.

        Args:
            images: float ``(B, image_channels, image_size, image_size)``, or None.
            tokens: int64 ``(B, Lt)`` ids, Lt <= max_text_len, zero-padded past each sample's
                length, or None.
            token_lengths: int ``(B,)`` valid tokens per sample, each in [0, Lt]; None: all Lt.
            audio: float ``(B, T)`` waveforms at ``sample_rate``, zero-padded, or None.
            audio_lengths: int ``(B,)`` valid samples per waveform, each in [0, T]; None: all T.
        """
        images, image_lengths, tokens, token_lengths, audio, audio_lengths = self._fill_missing(
            images, tokens, token_lengths, audio, audio_lengths
        )
        patches = self.image_encoder(images)
        text, query_mask = self.text_encoder(tokens, token_lengths)
        frames, frame_lengths = self.audio_encoder(audio, audio_lengths)
        # max_seqlen is the static bound P + La, so the padded key length is a shape, not data
        packed = self.packer(
            [patches, frames], [image_lengths * patches.shape[1], frame_lengths], padded=True,
            max_seqlen=patches.shape[1] + frames.shape[1],
        )
        attended, _ = self.cross_attention(
            text, packed.tokens, packed.tokens, key_padding_mask=packed.key_padding_mask, need_weights=False
        )
        pooled_attended = masked_mean(attended, query_mask)
        fused = self.fusion([text[:, 0], pooled_attended])
        return self.head(fused)

    def _fill_missing(self, images, tokens, token_lengths, audio, audio_lengths):
        """Zero placeholders with zero lengths for the absent modalities, full lengths where
        lengths are not given. ``image_lengths`` is 1 per sample with an image, else 0."""
        given = [x for x in (images, tokens, audio) if x is not None]
        if not given:
            raise ValueError("MultimodalClassifier: give at least one of images, tokens, audio; got none")
        cfg = self.config
        batch, device, dtype = given[0].shape[0], given[0].device, self.head[1].weight.dtype
        none = torch.zeros(batch, dtype=torch.long, device=device)
        if images is None:
            images = torch.zeros(batch, cfg.image_channels, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
            image_lengths = none
        else:
            image_lengths = torch.ones_like(none)
        if tokens is None:
            tokens, token_lengths = torch.zeros(batch, cfg.max_text_len, dtype=torch.long, device=device), none
        elif token_lengths is None:
            token_lengths = torch.full_like(none, tokens.shape[1])
        if audio is None:
            audio, audio_lengths = torch.zeros(batch, cfg.max_audio_samples, device=device, dtype=dtype), none
        elif audio_lengths is None:
            audio_lengths = torch.full_like(none, audio.shape[1])
        return images, image_lengths, tokens, token_lengths, audio, audio_lengths


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``(B, L, D)`` over the positions where ``valid`` ``(B, L)`` is True (≥ 1 per row)."""
    weights = valid.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1)


def transformer_layers(cfg: ClassifierConfig) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(cfg.dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout, activation="gelu", batch_first=True)
        for _ in range(cfg.num_layers)
    )


class ImageEncoder(nn.Module):
    """``(B, C, S, S)`` → ``(B, P, D)`` patch tokens: ViT's conv patch embedding, learned
    position embedding, transformer layers."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(cfg.image_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(num_patches, cfg.dim) * 0.02)
        self.layers = transformer_layers(cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images).flatten(2).transpose(1, 2) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return x


class TextEncoder(nn.Module):
    """``(B, Lt)`` ids → ``(B, 1 + Lt, D)`` tokens and their validity ``(B, 1 + Lt)`` bool.

    Position 0 is a learned query token, always valid: it pools the text (like BERT's [CLS])
    and is the one query of a sample without text, so no attention row here is fully masked.
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.query_token = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1 + cfg.max_text_len, cfg.dim) * 0.02)
        self.layers = transformer_layers(cfg)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = tokens.shape
        query = self.query_token.expand(batch, 1, -1)
        x = torch.cat([query, self.token_embedding(tokens)], dim=1) + self.position_embedding[: 1 + length]
        valid = torch.arange(1 + length, device=tokens.device) <= lengths.unsqueeze(1)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~valid)
        return x, valid


class AudioEncoder(nn.Module):
    """``(B, T)`` waveforms and lengths → ``(B, La, D)`` frame tokens and int64 ``(B,)`` valid
    token counts (0 for a zero-length waveform).

    Natural-log mel spectrogram, a per-frame LayerNorm over the mel bins (level-invariant
    features), then Conv1d + GELU layers with the configured strides. Constant (zero) STFT
    padding: reflect padding is undefined for clips shorter than n_fft // 2 + 1 samples (an
    absent clip has 0), and zero padding makes a clip's frames independent of its batch.
    """

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.log_mel = LogMelSpectrogram(
            cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, pad_mode="constant",
            log="natural", eps=1e-6,
        )
        self.norm = nn.LayerNorm(cfg.n_mels)
        widths = [cfg.n_mels] + [cfg.dim] * len(cfg.audio_strides)
        self.convs = nn.ModuleList(
            nn.Conv1d(w_in, w_out, 3, stride=s, padding=1) for w_in, w_out, s in zip(widths, widths[1:], cfg.audio_strides)
        )

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # With zero STFT padding the padded batch's frames within a clip equal the clip's own,
        # so one batched transform replaces the per-clip ``lengths`` path, which loops in Python
        # and would break a fullgraph compile; the centred STFT has 1 + length // hop frames.
        mel = self.log_mel(audio)
        frame_lengths = torch.div(lengths, self.log_mel.hop_length, rounding_mode="floor") + 1
        x = self.norm(mel.transpose(1, 2)).transpose(1, 2)
        for conv in self.convs:
            # zero past each clip's end first, so a clip's tokens do not depend on its batch's padding
            x = x * (torch.arange(x.shape[-1], device=x.device) < frame_lengths.unsqueeze(1)).unsqueeze(1)
            x = nn.functional.gelu(conv(x))
            frame_lengths = conv_output_length(frame_lengths, conv)
        # an empty clip still yields one all-padding STFT frame; it has no tokens
        frame_lengths = torch.where(lengths > 0, frame_lengths, torch.zeros_like(frame_lengths))
        return x.transpose(1, 2), frame_lengths


def conv_output_length(lengths: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """Valid output positions of ``conv`` for ``lengths`` valid input positions (torch's formula)."""
    span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
    return torch.div(lengths + 2 * conv.padding[0] - span, conv.stride[0], rounding_mode="floor") + 1

"""``nn.Module`` layers built on the mmfuse ops; all batch-first."""
from mmfuse.nn.attention import CrossModalAttention
from mmfuse.nn.audio import (
    MFCC,
    AmplitudeToDB,
    KaldiFbank,
    LogMelSpectrogram,
    MelSpectrogram,
    Spectrogram,
    WhisperLogMel,
)
from mmfuse.nn.packing import ModalityPacker
from mmfuse.nn.fusion import FeatureFusion
from mmfuse.nn.streaming import FeatureStream

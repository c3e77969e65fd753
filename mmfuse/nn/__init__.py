"""``nn.Module`` layers built on the mmfuse ops; all batch-first."""
from mmfuse.nn.attention import CrossModalAttention

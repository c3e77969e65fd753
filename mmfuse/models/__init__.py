"""A small model API built from the ``mmfuse.nn`` layers."""
from mmfuse.models.classifier import ClassifierConfig, MultimodalClassifier

__all__ = ["ClassifierConfig", "MultimodalClassifier"]

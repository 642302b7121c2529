"""The models the experiments train."""

from .cnn import MnistCNN

__all__ = ["MnistCNN"]

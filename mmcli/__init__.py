"""mmcli: a command-line toolkit for multimodal (image + text) models."""

__version__ = "0.1.0"

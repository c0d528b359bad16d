"""FLUX.1 Kontext [dev] image editing on small GPUs."""

__version__ = "0.2.0"

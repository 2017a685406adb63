"""GPEN face restoration engine: images and tensors in, images out.

It never touches hot folders or shares; weight files are the only paths it opens.
"""

from .checkpoint import load_generator
from .gpen import VARIANTS, GpenArch, create_generator

__all__ = ["VARIANTS", "GpenArch", "create_generator", "load_generator"]

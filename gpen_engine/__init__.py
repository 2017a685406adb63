"""GPEN face restoration engine: images and tensors in, images out.

It never touches hot folders or shares; weight files are the only paths it opens. The names below are the
public API the daemon and outside scripts use; everything else is an implementation detail.
"""

from .checkpoint import load_generator
from .device import DeviceReport, select_device
from .gpen import VARIANTS, GpenArch, create_generator
from .imageio import check_complete, decode, encode
from .options import BUILTIN_PRESETS, DecodeOptions, EncodeOptions, EngineOptions, Preset
from .registry import ModelSpec, builtin_models, model_table
from .restorer import EngineModels, Restorer, WorkingImage, load_engine_models, prepare_image
from .types import (
    DecodedImage,
    DeviceError,
    DeviceOutOfMemory,
    EngineError,
    Face,
    ImageTooLarge,
    InputError,
    ModelFileError,
    NoFaceFound,
    RestoredImage,
    UnsupportedImage,
)

__all__ = [
    "BUILTIN_PRESETS",
    "VARIANTS",
    "DecodeOptions",
    "DecodedImage",
    "DeviceError",
    "DeviceOutOfMemory",
    "DeviceReport",
    "EncodeOptions",
    "EngineError",
    "EngineModels",
    "EngineOptions",
    "Face",
    "GpenArch",
    "ImageTooLarge",
    "InputError",
    "ModelFileError",
    "ModelSpec",
    "NoFaceFound",
    "Preset",
    "RestoredImage",
    "Restorer",
    "UnsupportedImage",
    "WorkingImage",
    "builtin_models",
    "check_complete",
    "create_generator",
    "decode",
    "encode",
    "load_engine_models",
    "load_generator",
    "model_table",
    "prepare_image",
    "select_device",
]

"""GPEN face restoration engine: images and tensors in, images out.

It never touches hot folders or shares; weight files are the only paths it opens. The names below are the
public API the daemon and outside scripts use; everything else is an implementation detail.
"""

import importlib

# Imported on first use (PEP 562): importing a submodule such as ``gpen_engine.options`` from the daemon's
# configuration code must not pull in torch, which takes seconds and hundreds of MB.
_WHERE = {
    "BUILTIN_PRESETS": "options",
    "DecodeOptions": "options",
    "DecodedImage": "types",
    "DeviceError": "types",
    "DeviceOutOfMemory": "types",
    "DeviceReport": "device",
    "EncodeOptions": "options",
    "EngineError": "types",
    "EngineModels": "restorer",
    "EngineOptions": "options",
    "Face": "types",
    "GpenArch": "arch",
    "ImageTooLarge": "types",
    "InputError": "types",
    "ModelFileError": "types",
    "ModelSpec": "registry",
    "NoFaceFound": "types",
    "Preset": "options",
    "RestoredImage": "types",
    "Restorer": "restorer",
    "UnsupportedImage": "types",
    "VARIANTS": "arch",
    "WorkingImage": "restorer",
    "builtin_models": "registry",
    "check_complete": "imageio",
    "create_generator": "gpen",
    "decode": "imageio",
    "encode": "imageio",
    "load_engine_models": "restorer",
    "load_generator": "checkpoint",
    "model_table": "registry",
    "prepare_image": "restorer",
    "select_device": "device",
}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    return getattr(module, name)


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

"""The table of known weight files."""

from __future__ import annotations

from gpen_engine.gpen import VARIANTS, GpenArch
from gpen_engine.options import BUILTIN_PRESETS
from gpen_engine.registry import ModelSpec, builtin_models, detector_spec, model_table, preset_models


class TestRegistry:
    def test_builtin_gpen_entries(self) -> None:
        """Each official GPEN file has its official architecture, https sources and a non-commercial note."""
        table = builtin_models()
        for name, arch in VARIANTS.items():
            spec = table[name]
            assert (spec.kind, spec.arch, spec.filename) == ("gpen", arch, f"{name}.pth")
            assert spec.urls and all(url.startswith("https://") for url in spec.urls)
            assert "non-commercial" in spec.licence

    def test_every_preset_model_is_known(self) -> None:
        """Every file a built-in preset needs is in the table, so start-up can fetch it."""
        table = builtin_models()
        for preset in BUILTIN_PRESETS.values():
            assert all(name in table for name in preset_models(preset))

    def test_preset_needs(self) -> None:
        """low-spec needs its generator and the small detector only; fast also needs the parser."""
        assert preset_models(BUILTIN_PRESETS["low-spec"]) == ("GPEN-BFR-256", "retinaface-mobile0.25")
        assert "parsenet" in preset_models(BUILTIN_PRESETS["fast"])

    def test_detector_spec(self) -> None:
        """detector names map to facexlib's release files."""
        assert detector_spec("mobile0.25").filename == "detection_mobilenet0.25_Final.pth"
        assert detector_spec("resnet50").filename == "detection_Resnet50_Final.pth"

    def test_config_entries_add_and_override(self) -> None:
        """Config entries add new models and replace a built-in of the same name."""
        own = ModelSpec("my-gpen", "/srv/my.pth", "gpen", GpenArch(512), (), "mine")
        override = ModelSpec("GPEN-BFR-512", "mirror/GPEN-BFR-512.pth", "gpen", GpenArch(512), (), "x")
        table = model_table([own, override])
        assert table["my-gpen"] is own
        assert table["GPEN-BFR-512"] is override
        assert "GPEN-BFR-256" in table

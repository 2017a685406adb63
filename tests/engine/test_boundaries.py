import subprocess
import sys


def test_engine_never_imports_the_daemon():
    """gpen_engine knows images and tensors only: importing all of it pulls in nothing from daemon/."""
    code = (
        "import sys, pkgutil, importlib, gpen_engine\n"
        "for m in pkgutil.iter_modules(gpen_engine.__path__):\n"
        "    importlib.import_module('gpen_engine.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'daemon' or n.startswith('daemon.'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 0 == result.returncode, result.stdout + result.stderr


def test_public_api_is_importable_from_the_package():
    """The names outside scripts use are importable from gpen_engine itself."""
    import gpen_engine

    missing = [name for name in gpen_engine.__all__ if not hasattr(gpen_engine, name)]
    assert [] == missing

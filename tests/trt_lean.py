"""``import tensorrt`` / ``tensorrt.plugin`` on a machine without a GPU, for the registration tests.

The full TensorRT wheels need a GPU machine's libraries, but two real wheels of the same TensorRT release install
anywhere (the `test` extra pulls them in): ``tensorrt-lean-cu12-bindings`` + ``-libs`` (the lean *runtime*: plugin
registry, engine deserialization; no builder) and ``tensorrt-cu12-bindings`` (whose ``plugin`` package is the
pure-Python ``tensorrt.plugin``; its compiled part needs the full libraries and is not imported).  `install()` makes
``import tensorrt`` the lean runtime and ``import tensorrt.plugin`` the bindings wheel's plugin package on top of it.

The lean runtime lacks two builder-side names that ``tensorrt.plugin`` mentions at import: ``TensorFormat`` (used in
annotations and when TensorRT asks for format combinations during a build) and ``ITensor`` (network building via
``trtp.op``).  Neither is used by registration, creator lookup, plugin creation, output types or aliasing, which is
what the tests check; they are provided as inert placeholders and never reach TensorRT.  Nothing else is faked.
"""

from __future__ import annotations

import enum
import importlib.machinery
import importlib.util
import sys
import types
from importlib import metadata
from pathlib import Path

__all__ = ["install", "unavailable_reason", "versions"]

WHEELS = ("tensorrt-cu12-bindings", "tensorrt-lean-cu12-bindings", "tensorrt-lean-cu12-libs")


def versions() -> dict[str, str]:
    out = {}
    for name in WHEELS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = ""
    return out


def unavailable_reason() -> str:
    """Empty when `install` can work; else why not."""
    missing = [k for k, v in versions().items() if not v]
    if missing:
        return f"not installed: {', '.join(missing)} (pip install -e '.[test]')"
    return ""


def _placeholder(name: str):
    class _Format(enum.IntEnum):  # the values TensorRT's TensorFormat has first; only LINEAR is ever named here
        LINEAR = 0

    return _Format if name == "TensorFormat" else type(name, (), {})


def install():
    """Returns ``(trt, trtp)``: the lean runtime as ``tensorrt`` and the bindings wheel's ``tensorrt.plugin``."""
    if "tensorrt.plugin" in sys.modules:
        return sys.modules["tensorrt"], sys.modules["tensorrt.plugin"]
    reason = unavailable_reason()
    if reason:
        raise ImportError(reason)
    import tensorrt_lean_bindings as lean

    trt = types.ModuleType("tensorrt", "TensorRT lean runtime (tests.trt_lean)")
    trt.__dict__.update({k: v for k, v in vars(lean).items() if not k.startswith("__")})
    trt.__version__ = lean.__version__
    for name in ("TensorFormat", "ITensor"):
        if not hasattr(trt, name):
            setattr(trt, name, _placeholder(name))
    trt.__path__ = []  # a package, so that ``tensorrt.plugin`` resolves
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None, is_package=True)
    spec = importlib.util.find_spec("tensorrt_bindings")  # locates the package without running its __init__
    pdir = Path(spec.submodule_search_locations[0]) / "plugin"
    sys.modules["tensorrt"] = trt
    pspec = importlib.util.spec_from_file_location("tensorrt.plugin", pdir / "__init__.py",
                                                   submodule_search_locations=[str(pdir)])
    trtp = importlib.util.module_from_spec(pspec)
    sys.modules["tensorrt.plugin"] = trtp
    try:
        pspec.loader.exec_module(trtp)
    except BaseException:
        del sys.modules["tensorrt.plugin"], sys.modules["tensorrt"]
        raise
    trt.plugin = trtp
    return trt, trtp

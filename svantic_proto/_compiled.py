"""Which core modules a compiled build replaces, and a switch back to their sources.

The per-frame path (framing, the connection state machines, ids, token signing) is
compiled with mypyc when the package is built with a C compiler; the sources stay the
reference and behave the same. `SVANTIC_PURE_PYTHON=1` in the environment imports the
sources even when a compiled build is installed: for coverage, debuggers, and to test
the fallback. Standard library only: `setup.py` reads this file before any dependency
is installed.

The hand-written C extension `_speedups` (the codec's string checks, the XOR mask) has no
source twin: without it, codec, framing and messages take their pure-Python fallbacks.
`SVANTIC_NO_C_EXTENSION=1` makes every import of it fail as on an install built without a C
compiler, so that build can be tested and measured where the extension is built. With
`SVANTIC_PURE_PYTHON=1` too, nothing compiled runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILED_MODULES = ("framing", "connection", "agent", "mesh", "ids", "_jws", "states")
"""Modules of `svantic_proto` that mypyc compiles (the ones a round trip runs through)."""

PURE_PYTHON_ENV = "SVANTIC_PURE_PYTHON"
NO_C_EXTENSION_ENV = "SVANTIC_NO_C_EXTENSION"
C_EXTENSION_MODULE = "_speedups"

_PACKAGE = __name__.rpartition(".")[0]


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' `.py` files before the import system finds their `.so`."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != _PACKAGE or name not in COMPILED_MODULES:
            return None
        source = Path(__file__).with_name(f"{name}.py")
        return importlib.util.spec_from_file_location(fullname, source) if source.exists() else None


class _NoCExtension(importlib.abc.MetaPathFinder):
    """Makes `_speedups` unimportable, as on an install built without a C compiler."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != f"{_PACKAGE}.{C_EXTENSION_MODULE}":
            return None
        raise ModuleNotFoundError(
            f"No module named {fullname!r} ({NO_C_EXTENSION_ENV}=1)", name=fullname)


def is_compiled(module: ModuleType) -> bool:
    """A compiled module's file is its extension library, not its source."""
    return not str(getattr(module, "__file__", "") or "").endswith(".py")


def c_extension_loaded() -> bool:
    """Whether `_speedups` is imported (the package's modules import it, when they can)."""
    return sys.modules.get(f"{_PACKAGE}.{C_EXTENSION_MODULE}") is not None


def _switched_on(name: str) -> bool:
    """Set and neither empty nor `0`: those mean whatever is installed."""
    return os.environ.get(name, "") not in ("", "0")


def _install(finder: type[importlib.abc.MetaPathFinder]) -> None:
    if not any(type(installed) is finder for installed in sys.meta_path):
        sys.meta_path.insert(0, finder())


# Imported first by the package, before any compiled module or `_speedups` is.
if _switched_on(PURE_PYTHON_ENV):
    _install(_SourcesFirst)
if _switched_on(NO_C_EXTENSION_ENV):
    _install(_NoCExtension)

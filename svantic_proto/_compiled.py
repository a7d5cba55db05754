"""Which core modules a compiled build replaces, and a switch back to their sources.

The per-frame path (framing, the connection state machines, ids, token signing) is
compiled with mypyc when the package is built with a C compiler; the sources stay the
reference and behave the same. `SVANTIC_PURE_PYTHON=1` in the environment imports the
sources even when a compiled build is installed: for coverage, debuggers, and to test
the fallback. Standard library only: `setup.py` reads this file before any dependency
is installed.
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


def is_compiled(module: ModuleType) -> bool:
    """A compiled module's file is its extension library, not its source."""
    return not str(getattr(module, "__file__", "") or "").endswith(".py")


# Imported first by the package, before any compiled module is.
if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0") and not any(
    type(finder) is _SourcesFirst for finder in sys.meta_path
):
    sys.meta_path.insert(0, _SourcesFirst())

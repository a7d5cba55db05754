"""Build the optional compiled parts; everything else is in pyproject.toml.

Two kinds:

* `svantic_proto._speedups`, hand-written C: the codec's strict string checks and
  WebSocket masking. Built by default when a C compiler is there (optional: without one
  the codec uses its pure-Python fallback). It has no `.py` twin, so an editable install
  builds it beside its source; `./scripts/test` and `./scripts/demo` rebuild it when
  `_speedups.c` changes, and `tests/core/test_compiled.py` fails on a build older than
  its source.
* the per-frame path of the core (`svantic_proto._compiled.COMPILED_MODULES`), compiled
  from its typed sources with mypyc. Opt-in: only with `SVANTIC_COMPILE=1` at build
  time, and only into a wheel or a regular install, never into the source tree. A
  compiled module beside its source would silently win over the source, so an editable
  install is always pure Python and always runs the edited code; it also removes the
  compiled modules an older build left in the tree. With `SVANTIC_COMPILE=1`, a failure
  to compile fails the build.

The mypyc modules share one library: they are built together or not at all.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import runpy
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_compiled = runpy.run_path(str(HERE / "svantic_proto" / "_compiled.py"))
COMPILED_MODULES: tuple[str, ...] = _compiled["COMPILED_MODULES"]
COMPILE_ENV = "SVANTIC_COMPILE"
MYPYC_GROUP = "svantic_proto._native"
# The extension modules a mypyc build of COMPILED_MODULES makes in the package.
MYPYC_OUTPUTS = (*COMPILED_MODULES, MYPYC_GROUP.rpartition(".")[2] + "__mypyc")

SPEEDUPS = Extension(
    "svantic_proto._speedups", sources=["svantic_proto/_speedups.c"], optional=True
)


def compile_requested() -> bool:
    return os.environ.get(COMPILE_ENV, "") not in ("", "0")


@functools.cache
def mypyc_extensions() -> list[Extension]:
    try:
        from mypyc.build import mypycify  # noqa: PLC0415  # a build requirement only
    except ImportError as exc:  # building without the build requirements (no isolation)
        raise SystemExit(
            f"svantic-proto: {COMPILE_ENV}=1 needs mypyc (pip install mypy): {exc}") from exc
    # mypyc type-checks the sources first, and exits on an error: that fails the build.
    return list(mypycify(
        [f"svantic_proto/{name}.py" for name in COMPILED_MODULES],
        group_name=MYPYC_GROUP,
        opt_level="3",
    ))


def remove_compiled_modules(package: Path) -> None:
    """An older build may have left compiled modules beside their sources: they would win."""
    for name in MYPYC_OUTPUTS:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            stale = package / f"{name}{suffix}"
            if stale.exists():
                print(f"svantic-proto: removing {stale}, left by an older compiled build",
                      file=sys.stderr)
                stale.unlink()


class CoreBuildExt(build_ext):
    """`_speedups` always (optionally); the mypyc core only on request and out of the tree."""

    def in_tree(self) -> bool:
        return bool(self.inplace or getattr(self, "editable_mode", False))

    def finalize_options(self) -> None:
        # setuptools prepares the extensions it finds in the distribution here; this command
        # object alone gets the mypyc ones (an editable build's own build_ext must not).
        if not compile_requested() or self.in_tree():
            super().finalize_options()
            return
        extensions = self.distribution.ext_modules
        self.distribution.ext_modules = [*(extensions or []), *mypyc_extensions()]
        try:
            super().finalize_options()
        finally:
            self.distribution.ext_modules = extensions

    def run(self) -> None:
        if not self.in_tree() and not compile_requested():
            # setuptools packs all of its build directory: not a compiled module of an earlier
            # SVANTIC_COMPILE=1 build in the same tree.
            remove_compiled_modules(Path(self.build_lib) / "svantic_proto")
        if self.in_tree():
            remove_compiled_modules(HERE / "svantic_proto")
            if compile_requested():
                print(f"svantic-proto: {COMPILE_ENV}=1 is ignored by an editable (in-tree) "
                      "install, which stays pure Python; build a wheel or install "
                      "non-editable for the compiled core", file=sys.stderr)
        super().run()


setup(
    ext_modules=[SPEEDUPS],
    cmdclass={"build_ext": CoreBuildExt},
)

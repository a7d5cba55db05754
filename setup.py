"""Build the optional compiled parts; everything else is in pyproject.toml.

Two kinds, both optional, so an install without a C compiler is pure Python and
behaves the same, only slower:

* `svantic_proto._speedups`, hand-written C: the codec's strict string checks and
  WebSocket masking;
* the per-frame path of the core (`svantic_proto._compiled.COMPILED_MODULES`),
  compiled from its typed sources with mypyc.

The mypyc modules share one library: either all of them are built or none is (a
module without its shared library would fail to import). `SVANTIC_PURE_PYTHON=1` at
build time skips mypyc.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
_compiled = runpy.run_path(str(HERE / "svantic_proto" / "_compiled.py"))
COMPILED_MODULES: tuple[str, ...] = _compiled["COMPILED_MODULES"]
PURE_PYTHON_ENV: str = _compiled["PURE_PYTHON_ENV"]

SPEEDUPS = Extension(
    "svantic_proto._speedups", sources=["svantic_proto/_speedups.c"], optional=True
)


def mypyc_extensions() -> list[Extension]:
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify  # noqa: PLC0415  # a build requirement only
    except ImportError:  # building without the build requirements (e.g. no isolation)
        print("svantic-proto: mypyc not found, the core stays pure Python", file=sys.stderr)
        return []
    try:
        extensions: list[Extension] = mypycify(
            [f"svantic_proto/{name}.py" for name in COMPILED_MODULES],
            group_name="svantic_proto._native",
            opt_level="3",
        )
    except (Exception, SystemExit) as exc:  # mypyc type-checks first and exits on an error
        print(f"svantic-proto: mypyc failed ({exc!r}), the core stays pure Python",
              file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True
    return extensions


class AllOrNothingBuildExt(build_ext):
    """Builds every extension, each optionally; then removes the mypyc ones unless all built."""

    def run(self) -> None:
        super().run()
        native = [e for e in self.extensions if e.name.startswith("svantic_proto.")
                  and e.name.rpartition(".")[2] in (*COMPILED_MODULES, "_native__mypyc")]
        paths = [Path(self.get_ext_fullpath(e.name)) for e in native]
        if paths and not all(path.exists() for path in paths):
            print("svantic-proto: some compiled modules failed to build; using the sources",
                  file=sys.stderr)
            for path in paths:
                path.unlink(missing_ok=True)


setup(
    ext_modules=[SPEEDUPS, *mypyc_extensions()],
    cmdclass={"build_ext": AllOrNothingBuildExt},
)

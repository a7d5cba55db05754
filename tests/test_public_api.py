"""`__all__` says exactly what `svantic_proto` (and its test kit) export.

A name missing from `__all__` is invisible to `from svantic_proto import *`, to API
docs and to type checkers' re-export rules; a stale one breaks the star import.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

import svantic_proto
import svantic_proto.testing

SUBMODULES = [
    module
    for info in pkgutil.walk_packages(svantic_proto.__path__, "svantic_proto.")
    # Python source only: the optional C extension has no source to read here.
    if (module := importlib.import_module(info.name)).__file__.endswith(".py")  # type: ignore[union-attr]
]
EXPORTERS = [svantic_proto, svantic_proto.testing]


def _defined_at_top_level(module: ModuleType) -> set[str]:
    """Public names a module's own source binds: defs, classes and assignments."""
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def _is_api(value: Any) -> bool:
    """Type variables are typing plumbing, not something users import."""
    return not isinstance(value, TypeVar | ModuleType)


def _package_names() -> Iterator[tuple[str, Any]]:
    """Names bound at the top of `svantic_proto` that one of its modules defines."""
    defined = set().union(*(_defined_at_top_level(m) for m in [svantic_proto, *SUBMODULES]))
    for name, value in vars(svantic_proto).items():
        if not name.startswith("_") and name in defined and _is_api(value):
            yield name, value


@pytest.mark.parametrize("module", EXPORTERS, ids=lambda m: m.__name__)
def test_every_name_in_all_exists_once(module: ModuleType) -> None:
    exported = module.__all__
    assert [n for n in exported if not hasattr(module, n)] == []
    assert len(exported) == len(set(exported)), "duplicates in __all__"


def test_every_public_name_the_package_re_exports_is_in_all() -> None:
    missing = sorted(name for name, _ in _package_names() if name not in svantic_proto.__all__)
    assert missing == [], f"add to svantic_proto.__all__: {missing}"


def test_every_public_name_the_test_kit_defines_is_in_all() -> None:
    kit = svantic_proto.testing
    defined = {
        n for n in _defined_at_top_level(kit) if _is_api(getattr(kit, n))
    }
    assert sorted(defined - set(kit.__all__)) == []


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from svantic_proto import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(svantic_proto.__all__)


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 "isort-style" order: CONSTANTS, then Classes, then functions."""
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return kind, name


def _alphabetical_key(name: str) -> tuple[str, str]:
    """A dictionary's order: case does not matter."""
    return name.casefold(), name


ORDERS = {"plain": None, "isort-style": _isort_key, "alphabetical": _alphabetical_key}


def _all_groups(module: ModuleType) -> list[list[str]]:
    """The entries of the `__all__` literal, split where the source has a blank line or a
    comment between them: each group is sorted on its own."""
    source = Path(module.__file__ or "").read_text(encoding="utf-8")
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
            and isinstance(node.value, ast.List | ast.Tuple)
        ):
            groups: list[list[str]] = [[]]
            previous_line = None
            for element in node.value.elts:
                assert isinstance(element, ast.Constant) and isinstance(element.value, str)
                if previous_line is not None:
                    between = lines[previous_line : element.lineno - 1]
                    if any(not line.strip() or line.strip().startswith("#") for line in between):
                        groups.append([])
                groups[-1].append(element.value)
                previous_line = element.end_lineno
            return groups
    raise AssertionError(f"{module.__name__} has no literal __all__")


@pytest.mark.parametrize("module", EXPORTERS, ids=lambda m: m.__name__)
def test_all_is_sorted_within_each_group(module: ModuleType) -> None:
    for group in _all_groups(module):
        in_order = any(group == sorted(group, key=key) for key in ORDERS.values())
        assert in_order, (
            f"{module.__name__}.__all__: sort this group ({', '.join(ORDERS)}), or split it "
            f"into groups with a comment line: {sorted(group, key=_alphabetical_key)}"
        )


ALL_BUDGET = 64
"""The most names `svantic_proto` exports at its top level. h11 exports about 30 and
wsproto about 10; ours adds the event and error classes a user matches on one by one.
Frames, the codec, ids, trace context and backoff stay in their own modules."""


def test_the_top_level_stays_within_its_budget() -> None:
    assert len(svantic_proto.__all__) <= ALL_BUDGET, (
        f"svantic_proto exports {len(svantic_proto.__all__)} names, over {ALL_BUDGET}: "
        "keep the new ones in their own modules")

"""`help()` on every public entry point shows its parameters, by name.

A signature made of `*args, **kwargs` (a decorator without `functools.wraps`, a wrapper
that forwards everything) tells a reader nothing: every public callable here names what
it takes. `inspect.signature` follows `__wrapped__`, as `help()` does.
"""

from __future__ import annotations

import importlib
import inspect
import pydoc
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import svantic_proto

ADAPTERS = ("asyncio", "anyio", "gevent")
ENTRY_POINTS = ("connect", "Agent", "MeshServer")
CATCH_ALL = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def inherits_exception_constructor(obj: Any) -> bool:
    """An exception class that takes what any exception takes (a message): nothing to name."""
    if not (inspect.isclass(obj) and issubclass(obj, BaseException)):
        return False
    owner = next(cls for cls in obj.__mro__ if "__init__" in vars(cls) or "__new__" in vars(cls))
    return owner.__module__ == "builtins"


def adapter_entry_points() -> Iterator[tuple[str, Callable[..., Any]]]:
    for adapter in ADAPTERS:
        module = importlib.import_module(f"svantic_adapters.{adapter}")
        for name in ENTRY_POINTS:
            obj = getattr(module, name)
            yield f"svantic_adapters.{adapter}.{name}", obj
            if inspect.isclass(obj):
                for method_name, method in inspect.getmembers(obj, callable):
                    if not method_name.startswith("_"):
                        yield f"svantic_adapters.{adapter}.{name}.{method_name}", method


def core_entry_points() -> Iterator[tuple[str, Callable[..., Any]]]:
    for name in svantic_proto.__all__:
        obj = getattr(svantic_proto, name)
        if callable(obj) and not inherits_exception_constructor(obj):
            yield f"svantic_proto.{name}", obj


ENTRIES = [*adapter_entry_points(), *core_entry_points()]


def test_the_lists_are_not_empty() -> None:
    names = {name for name, _ in ENTRIES}
    for adapter in ADAPTERS:
        assert f"svantic_adapters.{adapter}.connect" in names
        assert f"svantic_adapters.{adapter}.Agent.run" in names
        assert f"svantic_adapters.{adapter}.MeshServer.dispatch" in names
    assert {"svantic_proto.AgentConnection", "svantic_proto.jwt_dispatch_auth"} <= names


@pytest.mark.parametrize(("name", "obj"), ENTRIES, ids=[name for name, _ in ENTRIES])
def test_help_names_every_parameter(name: str, obj: Callable[..., Any]) -> None:
    signature = inspect.signature(obj)
    catch_alls = [str(p) for p in signature.parameters.values() if p.kind in CATCH_ALL]
    assert not catch_alls, f"{name}{signature}: name the parameters instead of {catch_alls}"
    text = pydoc.render_doc(obj, renderer=pydoc.plaintext)
    for parameter in signature.parameters:
        assert parameter in text, f"help({name}) does not show {parameter!r}"

"""Sphinx configuration of the API reference (`scripts/docs` builds it).

autodoc reads the docstrings of the pure-Python sources: the compiled modules would show
no parameters. The guides in `docs/*.md` are pulled in by the Markdown pages beside this
file, so that their links to one another resolve inside the reference too.

Each public object is described once, on the page of its home module (`_home`); the other
public modules that export it skip it, so that no name is described twice.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import os
import re
import sys
import typing
from types import ModuleType
from typing import Any, TypeVar

from pygments.lexers.special import TextLexer
from sphinx import addnodes
from sphinx.pycode import ModuleAnalyzer

os.environ["SVANTIC_PURE_PYTHON"] = "1"  # before svantic_proto is first imported

import svantic_proto

project = "svantic-proto"
author = "svantic-proto contributors"
copyright = "svantic-proto contributors"
release = version = svantic_proto.__version__

extensions = ["sphinx.ext.autodoc", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

html_theme = "alabaster"
html_title = f"svantic-proto {release}"
html_show_sourcelink = False
html_theme_options = {"page_width": "1180px", "sidebar_width": "250px"}  # room for signatures

# Docstrings are plain text with `name` for code, as in the guides.
default_role = "code"

autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "inherited-members": True,  # those from private bases only: see _skip_if_described_elsewhere
    "show-inheritance": True,
    "member-order": "bysource",  # for a module: the order of its __all__
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# The public modules, in the order an object's home is looked for: the module that
# defines it when that is one of these, else the first of these that exports it.
PUBLIC_MODULES = (
    "svantic_proto",
    "svantic_proto.errors",
    "svantic_proto.agent_runtime",
    "svantic_proto.mesh_runtime",
    "svantic_proto.capabilities",
    "svantic_proto.testing",
    "svantic_proto.frames",
    "svantic_proto.codec",
    "svantic_proto.ids",
    "svantic_proto.trace",
    "svantic_proto.backoff",
    "svantic_proto.messages",
    "svantic_adapters",
    "svantic_adapters.asyncio",
    "svantic_adapters.anyio",
    "svantic_adapters.gevent",
    "svantic_adapters.asgi",
)
MODULES: dict[str, ModuleType] = {name: importlib.import_module(name) for name in PUBLIC_MODULES}

# Every annotation becomes a link, and a link that goes nowhere fails the build (-n), except
# for types this reference does not describe: the standard library's and other packages'
# (no inventory is fetched, so the build needs no network), those of the modules that are
# not public, private names, and type variables.
nitpicky = True
_public = "|".join(re.escape(name.rpartition(".")[2]) for name in PUBLIC_MODULES if "." in name)
nitpick_ignore_regex = [
    (r"py:.*", r"(collections|enum|ssl|msgspec|cryptography|jwt)\..+"),
    (r"py:.*", rf"svantic_proto\.(?!(?:{_public})\.)[a-z_]+\..+"),
    (r"py:.*", r"(svantic_proto|svantic_adapters)(\.\w+)*\._\w*(\.\w+)*"),
]
# Type variables, named in full or (by some Sphinx versions) by their bare name.
nitpick_ignore = [
    (role, target)
    for module_name, module in sorted(sys.modules.items())
    if module_name.partition(".")[0] in ("svantic_proto", "svantic_adapters")
    for name, value in sorted(vars(module).items())
    if isinstance(value, TypeVar)
    for target in (f"{module_name}.{name}", name)
    for role in ("py:class", "py:obj")
]
# Names imported only for type checking stay unevaluated: autodoc shows them as written.
# (autodoc_type_aliases would print a union of them as `TypeAliasForwardRef(...)`.)
nitpick_ignore += [
    ("py:class", "svantic_proto.auth.DispatchAuthFailure"),  # the reason of DispatchAuthError
    ("py:class", "DispatchAuthFailure"),
    ("py:class", "AsymmetricAlgorithm"),  # AsymmetricDispatchAuthMinter's key and algorithm
    ("py:class", "EllipticCurvePrivateKey"),
    ("py:class", "Ed25519PrivateKey"),
    # svantic_proto.capabilities.Handler, outside its module's __all__ (the adapters' drivers
    # name it, and its forward reference to DispatchContext does not resolve there).
    ("py:class", "Handler"),
]


def _home(obj: Any) -> str | None:
    """The module whose page describes `obj`, for a class or a function (a value such as a
    constant has no identity to follow: each module that exports one describes it)."""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        return None
    defined_in = getattr(obj, "__module__", None)
    if defined_in in MODULES and getattr(MODULES[defined_in], obj.__name__, None) is obj:
        return defined_in
    for name, module in MODULES.items():
        if any(getattr(module, member, None) is obj for member in getattr(module, "__all__", ())):
            return name
    return None


def _is_private(cls: Any) -> bool:
    """Defined in a private module, or private itself: this reference has no page for it."""
    module = getattr(cls, "__module__", "") or ""
    return any(part.startswith("_") for part in (*module.split("."), cls.__name__))


def _skip_if_described_elsewhere(  # noqa: PLR0917 (autodoc-skip-member)
    app: Any, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """A module's member whose home is another module's page is skipped. A class's inherited
    member is kept only when it comes from a private base (the five steps of `_Connection`,
    the adapters' shared drivers): a public base's page, or Python's, describes the rest."""
    if skip:
        return None
    document = app.env.current_document  # what autodoc is documenting now
    if what == "module":
        home = _home(obj)
        return True if home is not None and home != document.autodoc_module else None
    if what in ("class", "exception") and document.autodoc_class:
        cls = getattr(importlib.import_module(document.autodoc_module), document.autodoc_class)
        owner = next((base for base in inspect.getmro(cls) if name in vars(base)), cls)
        return True if owner is not cls and not _is_private(owner) else None
    return None


def _values_without_docstring(module_name: str) -> list[str]:
    """Names in a module's `__all__` bound to a value, not a class or a function, that
    automodule leaves out: it lists only values that have a docstring in that module's
    source (type aliases, constants, and values imported from elsewhere lack one)."""
    module = MODULES[module_name]
    described = {name for scope, name in ModuleAnalyzer.for_module(module_name).find_attr_docs()
                 if not scope}
    return [
        name
        for name in getattr(module, "__all__", ())
        if name not in described
        and not (inspect.isclass(value := getattr(module, name)) or inspect.isroutine(value))
    ]


def _add_values_without_docstring(app: Any, docname: str, source: list[str]) -> None:
    if docname in MODULES:  # each public module's page is named after it
        names = _values_without_docstring(docname)
        source[0] += "".join(f"\n.. autodata:: {docname}.{name}\n" for name in names)


_BULLET = re.compile(r"^(\s*)\* ")


def _blank_lines_around_lists(  # noqa: PLR0917 (autodoc-process-docstring)
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """A docstring may start a bulleted list right under a sentence and end it the same way,
    as Markdown allows; reStructuredText wants a blank line at both ends."""
    out: list[str] = []
    list_indent: int | None = None
    for line in lines:
        bullet = _BULLET.match(line)
        indent = len(line) - len(line.lstrip())
        if bullet and list_indent is None:
            if out and out[-1].strip():
                out.append("")
            list_indent = len(bullet.group(1))
        elif list_indent is not None and line.strip() and not bullet and indent <= list_indent:
            if out and out[-1].strip():
                out.append("")
            list_indent = None
        elif not line.strip():
            list_indent = None
        out.append(line)
    lines[:] = out


def _no_inherited_docstring_for_values(  # noqa: PLR0917 (autodoc-process-docstring)
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """A type alias or a constant without its own docstring would show its type's (that of
    `typing.Annotated` or of a union): show none."""
    if what == "data" and getattr(obj, "__doc__", None) == getattr(type(obj), "__doc__", None):
        lines.clear()


def _public_bases(app: Any, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """A private base class (`_Connection`, `_Frame`, the adapters' shared drivers) is shown
    as its own public bases, or as `object`."""
    public: list[Any] = []
    for base in bases:
        for shown in _public_bases_of(base):
            if shown not in public:
                public.append(shown)
    bases[:] = public or [object]


def _public_bases_of(base: Any) -> list[Any]:
    cls = typing.get_origin(base) or base
    if not _is_private(cls):
        return [base]
    return [
        shown
        for parent in cls.__bases__
        if parent not in (object, typing.Generic)
        for shown in _public_bases_of(parent)
    ]


def _plain_builtins_and_literals(app: Any, doctree: Any) -> None:
    """An annotation's built-in (`type[F]`) would otherwise link to any attribute of that
    name, and a literal in `Annotated[float, Meta(ge=0.0)]` to nothing: show both as text."""
    for node in list(doctree.findall(addnodes.pending_xref)):
        target = node.get("reftarget", "")
        if node.get("refdomain") != "py" or node.get("reftype") not in ("class", "obj"):
            continue
        builtin = inspect.isclass(getattr(builtins, target, None))
        if builtin or not target.replace(".", "_").isidentifier():
            node.replace_self(node.children[:])


def setup(app: Any) -> None:
    app.add_lexer("mermaid", TextLexer)  # docs/state-machines.md: diagrams for GitHub
    app.connect("source-read", _add_values_without_docstring)
    app.connect("autodoc-skip-member", _skip_if_described_elsewhere)
    app.connect("autodoc-process-docstring", _blank_lines_around_lists)
    app.connect("autodoc-process-docstring", _no_inherited_docstring_for_values)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("doctree-read", _plain_builtins_and_literals)

"""One error tree: every exception the library raises on purpose is defined in
`svantic_proto.errors`, placed under `LocalProtocolError` (your misuse), `RemoteError`
(the peer's or the network's fault) or, for a handler's own answer, `HandlerError`.
"""

from __future__ import annotations

import inspect
import pickle
import re
import typing
from types import ModuleType

import pytest

import svantic_proto
from svantic_proto import auth, errors, events, handshake, ids, trace
from svantic_proto.auth import DispatchAuthFailure
from svantic_proto.errors import (
    DeploymentModeMismatch,
    DispatchAuthError,
    DispatchError,
    FrameError,
    HandlerError,
    HandshakeFailed,
    HandshakeRejected,
    InsecureTransportError,
    InstanceNotFound,
    InvalidState,
    LocalProtocolError,
    MissingInstanceId,
    RemoteError,
    RemoteProtocolError,
    SvanticError,
    TenantMismatch,
    TimestampError,
    TlsError,
    TraceContextError,
    Unauthorized,
    UnsupportedSubprotocol,
    UpgradeRequired,
)
from svantic_proto.events import ConnectionClosed
from svantic_proto.testing import Pair

PARENT: dict[type[BaseException], type[BaseException]] = {
    LocalProtocolError: SvanticError,
    InvalidState: LocalProtocolError,
    InsecureTransportError: LocalProtocolError,
    RemoteError: SvanticError,
    RemoteProtocolError: RemoteError,
    FrameError: RemoteProtocolError,
    HandshakeFailed: RemoteProtocolError,
    HandshakeRejected: RemoteProtocolError,
    MissingInstanceId: HandshakeRejected,
    UnsupportedSubprotocol: HandshakeRejected,
    Unauthorized: HandshakeRejected,
    TenantMismatch: HandshakeRejected,
    InstanceNotFound: HandshakeRejected,
    DeploymentModeMismatch: HandshakeRejected,
    UpgradeRequired: HandshakeRejected,
    DispatchError: RemoteError,
    DispatchAuthError: RemoteError,
    TimestampError: RemoteError,
    TraceContextError: RemoteError,
    TlsError: RemoteError,
    HandlerError: SvanticError,
}
"""Each class's place in the tree: its first base."""


def _defined_in_errors() -> set[type[BaseException]]:
    return {
        value
        for _, value in inspect.getmembers(errors, inspect.isclass)
        if issubclass(value, BaseException) and value.__module__ == errors.__name__
    }


# -- the hierarchy -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(PARENT), ids=lambda c: c.__name__)
def test_each_class_sits_in_its_place(cls: type[BaseException]) -> None:
    assert cls.__bases__[0] is PARENT[cls]
    assert issubclass(cls, SvanticError)
    local, remote = issubclass(cls, LocalProtocolError), issubclass(cls, RemoteError)
    assert not (local and remote)


def test_the_table_above_covers_every_class_the_module_defines() -> None:
    assert _defined_in_errors() == {SvanticError, *PARENT}
    assert sorted(errors.__all__) == sorted(c.__name__ for c in _defined_in_errors())


def test_the_extra_bases_that_callers_catch_are_kept() -> None:
    assert issubclass(TlsError, ConnectionError) and issubclass(TlsError, OSError)
    assert issubclass(TimestampError, ValueError)
    assert not issubclass(HandlerError, LocalProtocolError | RemoteError)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (handshake, "HandshakeFailed"),
        (handshake, "HandshakeRejected"),
        (handshake, "InsecureTransportError"),
        (handshake, "MissingInstanceId"),
        (handshake, "UnsupportedSubprotocol"),
        (handshake, "Unauthorized"),
        (handshake, "TenantMismatch"),
        (handshake, "InstanceNotFound"),
        (handshake, "DeploymentModeMismatch"),
        (handshake, "UpgradeRequired"),
        (ids, "TimestampError"),
        (trace, "TraceContextError"),
        (auth, "DispatchAuthError"),
    ],
)
def test_the_old_import_paths_give_the_same_class(module: ModuleType, name: str) -> None:
    assert getattr(module, name) is getattr(errors, name)
    assert name in module.__all__


# -- constructors and attributes as before --------------------------------------------------------


def test_constructors_and_attributes_are_unchanged() -> None:
    frame = FrameError("bad", close_code=None, frame_id="f-1")
    assert (frame.message, frame.close_code, frame.frame_id, frame.code) == (
        "bad", None, "f-1", "BAD_FRAME",
    )
    assert FrameError("bad").close_code == 1002
    remote = RemoteProtocolError("gone", code="X", close_code=1001)
    assert (str(remote), remote.code, remote.close_code) == ("gone", "X", 1001)
    failed = HandshakeFailed("no 101")
    assert (failed.code, failed.close_code) == ("HANDSHAKE_FAILED", None)
    rejected = TenantMismatch(403, "TENANT_MISMATCH", "other tenant")
    assert (rejected.status, rejected.code, rejected.message) == (
        403, "TENANT_MISMATCH", "other tenant",
    )
    assert rejected.close_code is None and str(rejected) == "403 TENANT_MISMATCH: other tenant"
    dispatch = DispatchError("d-1", "DEADLINE_EXCEEDED", "late", {"a": 1})
    assert (dispatch.dispatch_id, dispatch.code, dispatch.message, dispatch.detail) == (
        "d-1", "DEADLINE_EXCEEDED", "late", {"a": 1},
    )
    assert str(DispatchError("", "CONNECTION_CLOSED")) == "CONNECTION_CLOSED"
    handler = HandlerError("OUT_OF_STOCK", "none left", {"sku": "x"})
    assert (handler.code, handler.message, handler.detail) == (
        "OUT_OF_STOCK", "none left", {"sku": "x"},
    )
    tls = TlsError("handshake failed")
    assert (str(tls), tls.message, tls.reason, tls.during_handshake, tls.code) == (
        "handshake failed", "handshake failed", None, False, "TLS_FAILED",
    )
    assert TlsError("x", reason="CERTIFICATE_VERIFY_FAILED", during_handshake=True).reason
    assert InvalidState("closed").code == "INVALID_STATE"
    assert InsecureTransportError("ws://").code == "INSECURE_TRANSPORT"


@pytest.mark.parametrize(
    "error",
    [
        Unauthorized(401, "UNAUTHORIZED", "expired"),
        HandshakeRejected(418, "HTTP_418", "teapot"),
        DispatchAuthError(DispatchAuthFailure.EXPIRED, "token expired"),
    ],
    ids=repr,
)
def test_errors_with_several_arguments_survive_pickling(error: SvanticError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and vars(copy) == vars(error)


# -- ConnectionClosed.error: one isinstance --------------------------------------------------------


def test_connection_closed_error_is_typed_as_the_remote_base() -> None:
    hints = typing.get_type_hints(ConnectionClosed, vars(events))
    assert hints["error"] == RemoteError | None


def _closing_errors(pair: Pair) -> list[BaseException]:
    closed = pair.agent_events_of(ConnectionClosed) + pair.mesh_events_of(ConnectionClosed)
    assert closed, "the scenario must end a connection"
    return [c.error for c in closed if c.error is not None]


def test_a_bad_frame_ends_the_connection_with_a_remote_error() -> None:
    pair = Pair()
    pair.connect()
    pair.agent.receive_data(b"\x81\x05hello", pair.clock.now)  # a text frame that is not JSON
    pair.pump()
    found = _closing_errors(pair)
    assert found and all(isinstance(e, RemoteError) for e in found)
    assert any(isinstance(e, FrameError) and e.close_code == 1002 for e in found)


def test_a_rejected_handshake_ends_both_sides_with_a_remote_error() -> None:
    pair = Pair(auto_accept=False)
    pair.connect()
    pair.mesh.reject(status=403, code="TENANT_MISMATCH", message="other tenant",
                     now=pair.clock.now)
    pair.pump()
    found = _closing_errors(pair)
    assert len(found) == 2 and all(isinstance(e, RemoteError) for e in found)
    assert any(isinstance(e, TenantMismatch) and e.status == 403 for e in found)


def test_a_silent_peer_ends_the_connection_with_a_remote_error() -> None:
    pair = Pair()
    pair.connect()
    pair.go_silent("mesh")
    pair.advance(pair.config.dead_peer_timeout + 1)
    found = _closing_errors(pair)
    assert found and all(isinstance(e, RemoteError) for e in found)


# -- the public surface ----------------------------------------------------------------------------

TOP_LEVEL = [
    "RemoteError", "DispatchError", "HandlerError", "TlsError", "HandshakeRejected",
    "MissingInstanceId", "UnsupportedSubprotocol", "Unauthorized", "TenantMismatch",
    "InstanceNotFound", "DeploymentModeMismatch", "UpgradeRequired",
]


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_importable_from_the_top_level(name: str) -> None:
    assert getattr(svantic_proto, name) is getattr(errors, name)
    assert name in svantic_proto.__all__


# -- the docstring's tree --------------------------------------------------------------------------

_TREE_LINE = re.compile(r"^(?P<indent>[ │├└─]*?)(?P<name>[A-Z][A-Za-z]+)\s{2,}\S")


def _docstring_tree() -> dict[str, str | None]:
    """Each class named in the docstring's tree, with its parent in the tree."""
    doc = errors.__doc__ or ""
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    in_tree = False
    for line in doc.splitlines():
        if not in_tree:
            in_tree = line.strip().startswith("SvanticError")
            if not in_tree:
                continue
        elif not line.strip():
            break
        match = _TREE_LINE.match(line)
        assert match, f"not a tree line: {line!r}"
        indent = len(match["indent"])
        depth = (indent - 4) // 4
        del stack[depth:]
        parents[match["name"]] = stack[-1] if stack else None
        stack.append(match["name"])
    return parents


def test_the_docstring_tree_lists_every_class_at_its_place() -> None:
    tree = _docstring_tree()
    assert set(tree) == {c.__name__ for c in _defined_in_errors()}
    for cls in _defined_in_errors():
        parent = tree[cls.__name__]
        expected = PARENT.get(cls)
        assert parent == (expected.__name__ if expected else None), cls.__name__

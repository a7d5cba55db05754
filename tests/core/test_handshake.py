"""The connected-mode HTTP upgrade (spec section 1), client and server, sans-IO."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svantic_proto.errors import InvalidState, LocalProtocolError, RemoteProtocolError
from svantic_proto.handshake import (
    Accept,
    ClientHandshake,
    ClientUpgrade,
    DeploymentModeMismatch,
    HandshakeAccepted,
    HandshakeFailed,
    HandshakeRefused,
    HandshakeRejected,
    InsecureTransportError,
    InstanceNotFound,
    InstanceRecord,
    MissingInstanceId,
    Reject,
    ServerHandshake,
    TenantMismatch,
    Unauthorized,
    UnsupportedSubprotocol,
    UpgradeRequested,
    UpgradeRequired,
    build_upgrade_request,
    check_upgrade,
    websocket_accept_key,
)

RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
TOKEN = "header.payload.signature"


@dataclass(frozen=True)
class Claims:
    sub: str
    tenant_id: str


REGISTRY = {
    "inst-1": InstanceRecord("inst-1", "tenant-a", "connected", "support"),
    "inst-hosted": InstanceRecord("inst-hosted", "tenant-a", "hosted", "support"),
    "inst-other": InstanceRecord("inst-other", "tenant-b", "connected", "support"),
}


def verify_token(token: str) -> Claims | None:
    if token == TOKEN:
        return Claims(sub="client-1", tenant_id="tenant-a")
    if token == "expired":
        raise ValueError("token expired")
    return None


def upgrade(instance_id: str = "inst-1", **kwargs: object) -> ClientUpgrade:
    kwargs.setdefault("token", TOKEN)
    kwargs.setdefault("key", RFC_KEY)
    return build_upgrade_request(
        "wss://mesh.example.com/agents/connect",
        instance_id=instance_id,
        **kwargs,  # type: ignore[arg-type]
    )


def raw_request(
    *,
    target: str = "/agents/connect?instance_id=inst-1",
    method: str = "GET",
    version: str = "1.1",
    headers: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
) -> bytes:
    """A hand-written request: a valid upgrade unless changed by the arguments."""
    fields = {
        "Host": "mesh.example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": RFC_KEY.decode(),
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "svantic.v1",
        "Authorization": f"Bearer {TOKEN}",
    }
    fields.update(headers or {})
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [f"{name}: {value}" for name, value in fields.items() if name not in drop]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse(data: bytes) -> UpgradeRequested:
    event = ServerHandshake().receive_data(data)
    assert isinstance(event, UpgradeRequested), event
    return event


def refusal(data: bytes, **kwargs: int) -> HandshakeRefused:
    event = ServerHandshake(**kwargs).receive_data(data)  # type: ignore[arg-type]
    assert isinstance(event, HandshakeRefused), event
    return event


def switching_response(key: bytes = RFC_KEY, *, extra_lines: tuple[str, ...] = ()) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {websocket_accept_key(key)}",
        "Sec-WebSocket-Protocol: svantic.v1",
        *extra_lines,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- building the request ---------------------------------------------------------------


def test_request_carries_the_section_1_headers() -> None:
    request = upgrade().request_bytes
    head, _, rest = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /agents/connect?instance_id=inst-1 HTTP/1.1"
    assert set(lines[1:]) == {
        "Host: mesh.example.com",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {RFC_KEY.decode()}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: svantic.v1",
        f"Authorization: Bearer {TOKEN}",
    }
    assert rest == b""
    assert b"deflate" not in request.lower() and b"extensions" not in request.lower()


def test_url_defaults_and_instance_id_encoding() -> None:
    built = build_upgrade_request(
        "wss://Mesh.Example.com:8443?instance_id=old&region=eu",
        token=TOKEN,
        instance_id="inst 1/é&x=y",
    )
    assert (built.host, built.port, built.tls, built.path) == (
        "mesh.example.com",
        8443,
        True,
        "/agents/connect",
    )
    assert built.target == "/agents/connect?region=eu&instance_id=inst%201%2F%C3%A9%26x%3Dy"
    assert b"\r\nHost: mesh.example.com:8443\r\n" in built.request_bytes
    # The server reads back exactly the id that was given.
    assert parse(built.request_bytes).instance_id == "inst 1/é&x=y"


def test_explicit_path_and_ipv6_host() -> None:
    built = build_upgrade_request("wss://[2001:db8::1]/mesh/connect", token=TOKEN, instance_id="i")
    assert built.path == "/mesh/connect" and built.port == 443
    assert b"\r\nHost: [2001:db8::1]\r\n" in built.request_bytes


def test_random_key_is_a_valid_nonce_and_differs_each_time() -> None:
    first = build_upgrade_request("wss://h", token=TOKEN, instance_id="i").key
    second = build_upgrade_request("wss://h", token=TOKEN, instance_id="i").key
    assert len(base64.b64decode(first, validate=True)) == 16
    assert first != second


def test_token_stays_out_of_repr() -> None:
    built = upgrade()
    assert TOKEN not in repr(built)
    assert TOKEN not in repr(parse(built.request_bytes))


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        ("https://mesh.example.com", {}),
        ("wss://", {}),
        ("wss://user:pw@mesh.example.com", {}),
        ("wss://mesh.example.com:99999", {}),
        ("wss://mesh.example.com", {"instance_id": ""}),
        ("wss://mesh.example.com", {"token": ""}),
        ("wss://mesh.example.com", {"token": "abc\r\nX-Injected: 1"}),
        ("wss://mesh.example.com", {"subprotocols": ("other.v2",)}),
        ("wss://mesh.example.com", {"subprotocols": ("svantic.v1", "bad name")}),
        ("wss://mesh.example.com", {"key": b"too-short"}),
    ],
)
def test_invalid_arguments_are_local_protocol_errors(url: str, kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"token": TOKEN, "instance_id": "i", **kwargs}
    with pytest.raises(LocalProtocolError):
        build_upgrade_request(url, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    ["ws://127.0.0.1:8080", "ws://127.4.5.6", "ws://localhost:9000/x", "ws://[::1]:1234"],
)
def test_ws_is_refused_unless_opted_in_for_loopback(url: str) -> None:
    with pytest.raises(InsecureTransportError):
        build_upgrade_request(url, token=TOKEN, instance_id="i")
    built = build_upgrade_request(url, token=TOKEN, instance_id="i", allow_insecure_loopback=True)
    assert built.tls is False


@pytest.mark.parametrize(
    "url", ["ws://example.com", "ws://10.0.0.1", "ws://localhost.example.com", "ws://[::2]"]
)
def test_ws_to_a_non_loopback_host_is_refused_even_when_opted_in(url: str) -> None:
    with pytest.raises(InsecureTransportError) as raised:
        build_upgrade_request(url, token=TOKEN, instance_id="i", allow_insecure_loopback=True)
    assert isinstance(raised.value, LocalProtocolError)
    assert raised.value.code == "INSECURE_TRANSPORT"


# -- client reading the answer -------------------------------------------------------------


def test_client_accepts_a_valid_101_and_keeps_the_bytes_after_it() -> None:
    handshake = ClientHandshake(upgrade())
    result = handshake.receive_data(switching_response() + b"\x81\x02hi")
    assert result == HandshakeAccepted(subprotocol="svantic.v1", extra=b"\x81\x02hi")
    assert websocket_accept_key(RFC_KEY) == RFC_ACCEPT
    with pytest.raises(InvalidState):
        handshake.receive_data(b"more")


def test_client_reads_a_101_fed_one_byte_at_a_time() -> None:
    handshake = ClientHandshake(upgrade())
    response = switching_response()
    results = [handshake.receive_data(response[i : i + 1]) for i in range(len(response))]
    assert results[:-1] == [None] * (len(response) - 1)
    assert results[-1] == HandshakeAccepted("svantic.v1", b"")


def test_client_skips_an_interim_100_continue() -> None:
    handshake = ClientHandshake(upgrade())
    assert handshake.receive_data(b"HTTP/1.1 100 Continue\r\n\r\n") is None
    assert isinstance(handshake.receive_data(switching_response()), HandshakeAccepted)


@pytest.mark.parametrize(
    "response",
    [
        switching_response(key=base64.b64encode(b"0123456789abcdef")),  # wrong accept key
        switching_response().replace(b"Sec-WebSocket-Protocol: svantic.v1\r\n", b""),
        switching_response().replace(b"svantic.v1", b"other.v2"),
        switching_response().replace(b"svantic.v1", b"svantic.v1, other.v2"),
        switching_response(extra_lines=("Sec-WebSocket-Extensions: permessage-deflate",)),
        switching_response().replace(b"Upgrade: websocket\r\n", b""),
        switching_response().replace(b"Connection: Upgrade\r\n", b"Connection: keep-alive\r\n"),
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 abc Nope\r\n\r\n",
    ],
)
def test_client_fails_on_a_malformed_answer(response: bytes) -> None:
    with pytest.raises(HandshakeFailed) as raised:
        ClientHandshake(upgrade()).receive_data(response)
    assert isinstance(raised.value, RemoteProtocolError)
    assert raised.value.code == "HANDSHAKE_FAILED"


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 101 Switching", b"HTTP/1.1 101 OK\r\nUp"])
@pytest.mark.parametrize("eof", [b"", None])
def test_client_fails_on_eof_before_a_full_answer(partial: bytes, eof: bytes | None) -> None:
    handshake = ClientHandshake(upgrade())
    if partial:
        assert handshake.receive_data(partial) is None
    with pytest.raises(HandshakeFailed):
        handshake.receive_data(eof)


def test_client_fails_on_eof_inside_a_rejection_body() -> None:
    handshake = ClientHandshake(upgrade())
    head = b'HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\n{"err'
    assert handshake.receive_data(head) is None
    with pytest.raises(HandshakeFailed):
        handshake.receive_data(b"")


def _error_answer(status: int, body: bytes, *, headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} Whatever\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body


def test_rejection_body_that_is_not_the_error_shape_falls_back_to_the_status() -> None:
    for body in (b"<html>busy</html>", b"[]", b'{"error": "x"}', b'{"error": {"code": 7}}', b""):
        with pytest.raises(HandshakeRejected) as raised:
            ClientHandshake(upgrade()).receive_data(_error_answer(503, body))
        assert type(raised.value) is HandshakeRejected
        assert (raised.value.status, raised.value.code) == (503, "HTTP_503")


def test_rejection_with_deeply_nested_json_body_does_not_crash() -> None:
    with pytest.raises(HandshakeRejected) as raised:
        ClientHandshake(upgrade()).receive_data(_error_answer(400, b"[" * 50000))
    assert raised.value.code == "HTTP_400"


def test_rejection_body_is_read_only_up_to_64_kib() -> None:
    handshake = ClientHandshake(upgrade())
    head = b"HTTP/1.1 500 Oops\r\nContent-Length: 10000000\r\n\r\n"
    assert handshake.receive_data(head + b"x" * 1000) is None
    with pytest.raises(HandshakeRejected) as raised:
        handshake.receive_data(b"x" * (64 * 1024))
    assert (raised.value.status, raised.value.code) == (500, "HTTP_500")


def test_rejection_with_close_delimited_or_chunked_body() -> None:
    body = b'{"error": {"code": "UNAUTHORIZED", "message": "expired"}}'
    handshake = ClientHandshake(upgrade())
    assert handshake.receive_data(b"HTTP/1.1 401 Unauthorized\r\n\r\n" + body) is None
    with pytest.raises(Unauthorized):
        handshake.receive_data(b"")
    chunked = (
        b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    with pytest.raises(Unauthorized) as raised:
        ClientHandshake(upgrade()).receive_data(chunked)
    assert raised.value.message == "expired"


# -- server parsing ------------------------------------------------------------------------


def test_server_parses_an_upgrade_and_answers_101() -> None:
    server = ServerHandshake()
    event = server.receive_data(upgrade().request_bytes)
    assert isinstance(event, UpgradeRequested)
    assert event.instance_id == "inst-1"
    assert event.bearer_token == TOKEN
    assert event.subprotocols == ("svantic.v1",)
    assert event.path == "/agents/connect"
    assert event.key == RFC_KEY.decode()
    response = server.accept()
    assert response.startswith(b"HTTP/1.1 101 ")
    assert f"Sec-WebSocket-Accept: {RFC_ACCEPT}\r\n".encode() in response
    assert b"Sec-WebSocket-Protocol: svantic.v1\r\n" in response
    assert b"Extensions" not in response
    # The client accepts what the server wrote.
    assert ClientHandshake(upgrade()).receive_data(response) == HandshakeAccepted("svantic.v1", b"")


def test_server_reads_a_request_fed_one_byte_at_a_time() -> None:
    server = ServerHandshake()
    request = upgrade().request_bytes
    events = [server.receive_data(request[i : i + 1]) for i in range(len(request))]
    assert events[:-1] == [None] * (len(request) - 1)
    assert isinstance(events[-1], UpgradeRequested)


def test_server_keeps_bytes_after_the_request_for_framing() -> None:
    server = ServerHandshake()
    assert isinstance(
        server.receive_data(upgrade().request_bytes + b"\x81\x85frame"), UpgradeRequested
    )
    assert server.receive_data(b"-more") is None  # read while the application decides
    server.accept()
    assert server.extra == b"\x81\x85frame-more"
    with pytest.raises(InvalidState):
        server.receive_data(b"x")


def test_cookies_are_never_handed_to_the_application() -> None:
    event = parse(raw_request(headers={"Cookie": "session=secret"}))
    names = {name for name, _ in event.headers}
    assert "cookie" not in names and "authorization" not in names
    assert "secret" not in repr(event)


def test_several_subprotocols_and_case_insensitive_bearer() -> None:
    event = parse(
        raw_request(
            headers={"Sec-WebSocket-Protocol": "other.v2, svantic.v1", "Authorization": "bearer t"}
        )
    )
    assert event.subprotocols == ("other.v2", "svantic.v1")
    assert event.bearer_token == "t"


@pytest.mark.parametrize(
    "authorization", ["Basic dXNlcjpwdw==", "Bearer", "Bearer a b", "Token abc"]
)
def test_malformed_authorization_gives_no_token(authorization: str) -> None:
    assert parse(raw_request(headers={"Authorization": authorization})).bearer_token is None


def test_not_an_upgrade_gets_426_first() -> None:
    # Also the wrong path and method: 426 comes before any other check (section 1).
    answer = refusal(raw_request(method="POST", target="/elsewhere", drop=("Upgrade",)))
    assert (answer.status, answer.code) == (426, "UPGRADE_REQUIRED")
    assert b"\r\nUpgrade: websocket\r\n" in answer.response_bytes
    assert answer.response_bytes.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert json.loads(answer.body_bytes)["error"]["code"] == "UPGRADE_REQUIRED"
    with pytest.raises(UpgradeRequired):
        ClientHandshake(upgrade()).receive_data(answer.response_bytes)


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (raw_request(target="/other?instance_id=inst-1"), 404, "NOT_FOUND"),
        (raw_request(method="POST", target="/other"), 404, "NOT_FOUND"),
        (raw_request(method="POST"), 405, "METHOD_NOT_ALLOWED"),
        (raw_request(method="PUT"), 405, "METHOD_NOT_ALLOWED"),
        (raw_request(version="1.0"), 400, "BAD_HANDSHAKE"),
        (raw_request(drop=("Connection",)), 400, "BAD_HANDSHAKE"),
        (raw_request(drop=("Sec-WebSocket-Key",)), 400, "BAD_HANDSHAKE"),
        (raw_request(headers={"Sec-WebSocket-Key": "not base64!"}), 400, "BAD_HANDSHAKE"),
        (raw_request(headers={"Sec-WebSocket-Key": "c2hvcnQ="}), 400, "BAD_HANDSHAKE"),
        (raw_request(drop=("Sec-WebSocket-Version",)), 400, "UNSUPPORTED_WEBSOCKET_VERSION"),
        (
            raw_request(headers={"Sec-WebSocket-Version": "8"}),
            400,
            "UNSUPPORTED_WEBSOCKET_VERSION",
        ),
        (raw_request(headers={"Content-Length": "5"}) + b"hello", 400, "BAD_HANDSHAKE"),
        (raw_request(drop=("Host",)), 400, "BAD_REQUEST"),
    ],
)
def test_server_refuses_what_is_not_a_valid_upgrade(
    request_bytes: bytes, status: int, code: str
) -> None:
    answer = refusal(request_bytes)
    assert (answer.status, answer.code) == (status, code)
    head, _, body = answer.response_bytes.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head
    assert json.loads(body) == {"error": {"code": code, "message": answer.message}}
    assert body == answer.body_bytes


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS ClientHello
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET /agents/connect HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ],
)
def test_garbage_gets_a_400_not_an_exception(garbage: bytes) -> None:
    answer = refusal(garbage)
    assert answer.status == 400
    assert answer.code == "BAD_REQUEST"
    assert answer.response_bytes.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"\x16" not in answer.response_bytes  # the peer's bytes are not echoed


def test_oversized_headers_get_431_whether_streamed_or_in_one_read() -> None:
    big = raw_request(headers={"X-Padding": "p" * 20000})
    assert refusal(big).status == 431
    server = ServerHandshake()
    fed = 0
    answer = None
    while answer is None:
        answer = server.receive_data(big[fed : fed + 1000])
        fed += 1000
    assert isinstance(answer, HandshakeRefused)
    assert (answer.status, answer.code) == (431, "REQUEST_HEADERS_TOO_LARGE")
    assert fed <= 16384 + 1000  # refused once the limit is passed, not at the end
    small_limit = refusal(raw_request(), max_header_bytes=256)
    assert small_limit.status == 431


def test_eof_before_a_full_request_is_a_400() -> None:
    server = ServerHandshake()
    assert server.receive_data(raw_request()[:30]) is None
    answer = server.receive_data(b"")
    assert isinstance(answer, HandshakeRefused) and answer.status == 400
    assert isinstance(ServerHandshake().receive_data(None), HandshakeRefused)


def test_accept_and_reject_are_for_one_decided_upgrade_only() -> None:
    server = ServerHandshake()
    with pytest.raises(LocalProtocolError):
        server.accept()
    with pytest.raises(LocalProtocolError):
        server.reject(404, "INSTANCE_NOT_FOUND", "no")
    server.receive_data(upgrade().request_bytes)
    with pytest.raises(LocalProtocolError):
        server.accept(subprotocol="other.v2")  # not offered
    with pytest.raises(LocalProtocolError):
        server.reject(200, "OK", "not an error")
    server.accept()
    with pytest.raises(LocalProtocolError):
        server.accept()
    refused = ServerHandshake()
    refused.receive_data(b"garbage\r\n\r\n")
    with pytest.raises(InvalidState):
        refused.receive_data(b"more")


# -- the section 1 table, in order -----------------------------------------------------------


def decide(request_bytes: bytes, lookups: list[str] | None = None) -> Accept[Claims] | Reject:
    def lookup(instance_id: str) -> InstanceRecord | None:
        if lookups is not None:
            lookups.append(instance_id)
        return REGISTRY.get(instance_id)

    return check_upgrade(parse(request_bytes), verify_token=verify_token, lookup_instance=lookup)


NO_SUBPROTOCOL = {"Sec-WebSocket-Protocol": "other.v2"}
BAD_TOKEN = {"Authorization": "Bearer forged"}


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        # Each row also fails every later check: the first failing check answers.
        (
            raw_request(target="/agents/connect", headers={**NO_SUBPROTOCOL, **BAD_TOKEN}),
            400,
            "MISSING_INSTANCE_ID",
        ),
        (
            raw_request(target="/agents/connect?instance_id=", drop=("Authorization",)),
            400,
            "MISSING_INSTANCE_ID",
        ),
        (
            raw_request(target="/agents/connect?instance_id=nope", headers=NO_SUBPROTOCOL),
            400,
            "UNSUPPORTED_SUBPROTOCOL",
        ),
        (
            raw_request(target="/agents/connect?instance_id=nope", drop=("Authorization",)),
            401,
            "UNAUTHORIZED",
        ),
        (
            raw_request(target="/agents/connect?instance_id=nope", headers=BAD_TOKEN),
            401,
            "UNAUTHORIZED",
        ),
        (
            raw_request(headers={"Authorization": "Bearer expired"}),  # verifier raises
            401,
            "UNAUTHORIZED",
        ),
        (raw_request(headers={"Authorization": "Basic abc"}), 401, "UNAUTHORIZED"),
        (raw_request(target="/agents/connect?instance_id=nope"), 404, "INSTANCE_NOT_FOUND"),
        (raw_request(target="/agents/connect?instance_id=inst-other"), 403, "TENANT_MISMATCH"),
        (
            raw_request(target="/agents/connect?instance_id=inst-hosted"),
            409,
            "DEPLOYMENT_MODE_MISMATCH",
        ),
    ],
)
def test_checks_run_in_the_spec_order(request_bytes: bytes, status: int, code: str) -> None:
    decision = decide(request_bytes)
    assert isinstance(decision, Reject)
    assert (decision.status, decision.code) == (status, code)
    assert decision.message


def test_instance_is_not_looked_up_for_an_unauthenticated_request() -> None:
    lookups: list[str] = []
    decide(raw_request(headers=BAD_TOKEN), lookups)
    assert lookups == []


def test_all_checks_passing_accepts_with_the_claims() -> None:
    decision = decide(raw_request())
    assert decision == Accept(
        instance_id="inst-1", tenant_id="tenant-a", claims=Claims("client-1", "tenant-a"),
        record=REGISTRY["inst-1"],
    )


def test_claims_without_a_tenant_are_unauthorized() -> None:
    @dataclass(frozen=True)
    class NoTenant:
        tenant_id: str = ""

    decision = check_upgrade(
        parse(raw_request()), verify_token=lambda token: NoTenant(), lookup_instance=REGISTRY.get
    )
    assert isinstance(decision, Reject) and decision.status == 401


@pytest.mark.parametrize(
    ("instance_id", "offer", "token", "error_class", "status"),
    [
        ("", ("svantic.v1",), TOKEN, MissingInstanceId, 400),
        ("nope", ("other.v2",), TOKEN, UnsupportedSubprotocol, 400),
        ("inst-1", ("svantic.v1",), "forged", Unauthorized, 401),
        ("inst-other", ("svantic.v1",), TOKEN, TenantMismatch, 403),
        ("nope", ("svantic.v1",), TOKEN, InstanceNotFound, 404),
        ("inst-hosted", ("svantic.v1",), TOKEN, DeploymentModeMismatch, 409),
    ],
)
def test_client_raises_the_typed_error_for_each_rejection(
    instance_id: str,
    offer: tuple[str, ...],
    token: str,
    error_class: type[HandshakeRejected],
    status: int,
) -> None:
    headers = {"Sec-WebSocket-Protocol": ", ".join(offer), "Authorization": f"Bearer {token}"}
    server = ServerHandshake()
    event = server.receive_data(
        raw_request(target=f"/agents/connect?instance_id={instance_id}", headers=headers)
    )
    assert isinstance(event, UpgradeRequested)
    decision = check_upgrade(event, verify_token=verify_token, lookup_instance=REGISTRY.get)
    assert isinstance(decision, Reject)
    answer = server.reject(decision.status, decision.code, decision.message)
    with pytest.raises(error_class) as raised:
        ClientHandshake(upgrade()).receive_data(answer)
    assert raised.value.status == status
    assert raised.value.code == decision.code
    assert raised.value.message == decision.message


# -- properties ----------------------------------------------------------------------------

_REQUEST_PREFIXES = st.sampled_from(
    [b"", b"GET ", b"GET /agents/connect?instance_id=", b"GET / HTTP/1.1\r\n", raw_request()[:80]]
)
_RESPONSE_PREFIXES = st.sampled_from(
    [
        b"",
        b"HTTP/1.1 ",
        b"HTTP/1.1 101 Switching Protocols\r\n",
        b"HTTP/1.1 404 x\r\n",
        switching_response()[:60],
    ]
)
_SERVER_RESULTS = (type(None), UpgradeRequested, HandshakeRefused)


@settings(max_examples=300, deadline=None)
@given(prefix=_REQUEST_PREFIXES, chunks=st.lists(st.binary(max_size=40), max_size=6))
def test_random_bytes_into_the_server_give_only_documented_results(
    prefix: bytes, chunks: list[bytes]
) -> None:
    server = ServerHandshake(max_header_bytes=512)
    result = None
    for chunk in [prefix, *chunks, b""]:
        result = server.receive_data(chunk)
        assert isinstance(result, _SERVER_RESULTS)
        if result is not None:
            break
    assert result is not None  # EOF always ends the handshake
    if isinstance(result, HandshakeRefused):
        assert 400 <= result.status <= 499
        assert json.loads(result.body_bytes)["error"]["code"] == result.code


@settings(max_examples=300, deadline=None)
@given(prefix=_RESPONSE_PREFIXES, chunks=st.lists(st.binary(max_size=40), max_size=6))
def test_random_bytes_into_the_client_give_only_documented_results(
    prefix: bytes, chunks: list[bytes]
) -> None:
    handshake = ClientHandshake(upgrade())
    try:
        for chunk in [prefix, *chunks, b""]:
            result = handshake.receive_data(chunk)
            assert result is None or isinstance(result, HandshakeAccepted)
            if result is not None:
                break
        else:
            pytest.fail("EOF must end the handshake")
    except (HandshakeRejected, HandshakeFailed):
        pass

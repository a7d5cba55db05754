"""Bad JWTs, for the transport token (spec 1 and 6) and the dispatch-auth envelope (spec 7)
alike: every kind is built from a valid token by one change, and gets the spec's answer.

* Transport token: `TokenIssuer.verify` refuses it; on a real mesh process (TLS, 127.0.0.1)
  the upgrade `GET /agents/connect` and a control-plane call both answer `401 UNAUTHORIZED`
  with the fixed spec 1 body (a token over the header bound gets `431` first).
* Dispatch envelope: `DispatchAuthVerifier.verify` raises `DISPATCH_AUTH_FAILED`; an agent
  connection that receives the dispatch on the wire answers `error`/`DISPATCH_AUTH_FAILED`
  in reply to it, never starts the handler, and keeps its socket (spec 3, 7).

No answer carries exception text: the bodies are checked for Python exception names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from hostile_kit import (
    LEAK,
    SIGNING,
    TOKEN_SECRET,
    MeshProcess,
    raw_request,
    read_body,
    read_http_answer,
    upgrade_request,
)
from svantic_mesh.tokens import InvalidToken, TokenIssuer

from svantic_proto import events as ev
from svantic_proto.auth import DispatchAuthVerifier
from svantic_proto.errors import DispatchAuthError
from svantic_proto.testing import TEST_SIGNING_SECRET, Pair

WALL = 1_795_000_000.0
INSTANCE = "agent-1"
LEEWAY = 5


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: dict[str, Any] | bytes, claims: dict[str, Any] | bytes, key: bytes,
         alg: str = "HS256") -> str:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = f"{b64(head)}.{b64(body)}".encode()
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return f"{signing_input.decode()}.{b64(hmac.new(key, signing_input, digest).digest())}"


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[dict[str, Any], bytes], str]
    """(valid claims, the right key) -> the bad token."""
    transport: bool = True
    dispatch: bool = True


HS256 = {"alg": "HS256", "typ": "JWT"}
PUBLIC_PEM = trustme.CA().cert_pem.bytes()
"""A public certificate: what an alg-confusion attack uses as an HMAC key."""


def _with(**changes: Any) -> Callable[[dict[str, Any], bytes], str]:
    def make(claims: dict[str, Any], key: bytes) -> str:
        changed = dict(claims)
        for name, value in changes.items():
            if value is _DROP:
                changed.pop(name, None)
            else:
                changed[name] = value(claims) if callable(value) else value
        return sign(HS256, changed, key)
    return make


_DROP = object()


def _tampered(claims: dict[str, Any], key: bytes) -> str:
    good = sign(HS256, claims, key)
    head, _, sig = good.split(".")
    other = dict(claims, tenant_id="tenant-b")
    return f"{head}.{b64(json.dumps(other).encode())}.{sig}"


def _reordered_signature(claims: dict[str, Any], key: bytes) -> str:
    good = sign(HS256, claims, key)
    head, body, sig = good.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[0] ^= 1
    return f"{head}.{body}.{b64(bytes(raw))}"


CASES = [
    Case("alg none, no signature", lambda c, k: b64(b'{"alg":"none"}') + "."
         + b64(json.dumps(c).encode()) + "."),
    Case("alg None (case game)", lambda c, k: sign({"alg": "None", "typ": "JWT"}, c, k)),
    Case("alg confusion: HS256 keyed with a public key", lambda c, k: sign(HS256, c,
                                                                              PUBLIC_PEM)),
    Case("alg RS256 header over an HMAC signature",
         lambda c, k: sign({"alg": "RS256", "typ": "JWT"}, c, k)),
    Case("HS512 with the right key", lambda c, k: sign({"alg": "HS512"}, c, k, "HS512")),
    Case("HS384 with the right key", lambda c, k: sign({"alg": "HS384"}, c, k, "HS384")),
    Case("wrong key", lambda c, k: sign(HS256, c, b"x" * 40)),
    Case("empty key", lambda c, k: sign(HS256, c, b"")),
    Case("tampered payload (tenant swapped)", _tampered),
    Case("flipped signature bit", _reordered_signature),
    Case("signature stripped", lambda c, k: sign(HS256, c, k).rpartition(".")[0] + "."),
    Case("exp as a string", _with(exp=lambda c: str(c["exp"]))),
    # Validly signed: only the key holder makes these. The transport issuer refuses a
    # lifetime beyond its own; the dispatch verifier follows PyJWT (see the test below).
    Case("exp huge (10**30)", _with(exp=10**30), dispatch=False),
    Case("exp 2**64", _with(exp=2**64), dispatch=False),
    Case("exp a float 1e308", _with(exp=1e308)),
    Case("exp true", _with(exp=True)),
    Case("exp null", _with(exp=None)),
    Case("iat as a string", _with(iat=lambda c: str(c["iat"]))),
    Case("missing exp", _with(exp=_DROP)),
    Case("missing iat", _with(iat=_DROP)),
    Case("missing sub", _with(sub=_DROP)),
    Case("missing tenant_id", _with(tenant_id=_DROP)),
    Case("tenant_id not a string", _with(tenant_id=7)),
    Case("missing iss", _with(iss=_DROP)),
    Case("wrong iss", _with(iss="someone-else")),
    # Times relative to the valid token's `iat`, which is "now" wherever it is verified.
    Case("expired beyond the leeway", _with(exp=lambda c: c["iat"] - LEEWAY - 1,
                                            iat=lambda c: c["iat"] - 60)),
    Case("iat in the future beyond the leeway", _with(iat=lambda c: c["iat"] + LEEWAY + 10,
                                                      exp=lambda c: c["iat"] + 70)),
    Case("oversized (9,000 characters)", lambda c, k: sign(HS256, dict(c, pad="p" * 7000), k)),
    Case("not base64url", lambda c, k: "e*J.h*b.c*d"),
    Case("base64 with padding", lambda c, k: sign(HS256, c, k).replace(".", "=.", 1)),
    Case("four segments", lambda c, k: sign(HS256, c, k) + ".extra"),
    Case("two segments", lambda c, k: sign(HS256, c, k).rpartition(".")[0]),
    Case("empty", lambda c, k: ""),
    Case("dots only", lambda c, k: ".."),
    Case("unicode", lambda c, k: "é.ü.🙂"),
    Case("header not JSON", lambda c, k: sign(b"not json", c, k)),
    Case("claims a JSON array", lambda c, k: sign(HS256, json.dumps([c]).encode(), k)),
    Case("crit header", lambda c, k: sign({"alg": "HS256", "crit": ["exp"]}, c, k),
         transport=False),
    # Claims only a dispatch token has (spec 7).
    Case("wrong aud", _with(aud="another-instance"), transport=False),
    Case("aud a list", _with(aud=lambda c: [c["aud"], "x"]), transport=False),
    Case("missing aud", _with(aud=_DROP), transport=False),
    Case("wrong jti (replayed onto another dispatch)", _with(jti=str(uuid.uuid4())),
         transport=False),
    Case("missing jti", _with(jti=_DROP), transport=False),
    Case("wrong cap", _with(cap="delete_everything"), transport=False),
    Case("nbf in the future", _with(nbf=lambda c: c["iat"] + 600), transport=False),
    Case("duplicate aud member", lambda c, k: sign(
        HS256, json.dumps(c).encode()[:-1] + b', "aud": "another-instance"}', k),
        transport=False),
    Case("unknown kid", lambda c, k: sign({"alg": "HS256", "kid": "nope"}, c, k),
         transport=False),
]
TRANSPORT_CASES = [case for case in CASES if case.transport]
DISPATCH_CASES = [case for case in CASES if case.dispatch]


def test_enough_kinds() -> None:
    assert len(TRANSPORT_CASES) >= 25 and len(DISPATCH_CASES) >= 25
    assert len({case.name for case in CASES}) == len(CASES)


# -- transport tokens ------------------------------------------------------------------------


def transport_claims(wall: float) -> dict[str, Any]:
    return {"sub": "client-a", "tenant_id": "tenant-a", "iat": int(wall),
            "exp": int(wall) + 3600, "iss": "svantic-mesh"}


@pytest.mark.parametrize("case", TRANSPORT_CASES, ids=lambda case: case.name)
def test_the_token_issuer_refuses(case: Case) -> None:
    issuer = TokenIssuer(TOKEN_SECRET, ttl=3600, leeway=LEEWAY)
    good = sign(HS256, transport_claims(WALL), TOKEN_SECRET)
    assert issuer.verify(good, WALL)["tenant_id"] == "tenant-a"
    with pytest.raises(InvalidToken) as refused:
        issuer.verify(case.make(transport_claims(WALL), TOKEN_SECRET), WALL)
    assert LEAK.search(str(refused.value)) is None


def _assert_401(status: int, body: bytes) -> None:
    assert status == 401, (status, body[:200])
    error = json.loads(body)["error"]
    assert error["code"] == "UNAUTHORIZED"
    assert LEAK.search(error["message"]) is None


def test_the_mesh_refuses_every_bad_transport_token_on_both_doors(mesh: MeshProcess) -> None:
    mesh.register("jwt-target")
    wall = time.time()
    good = sign(HS256, transport_claims(wall), TOKEN_SECRET)
    with mesh.client() as client:
        assert client.post("/agents/get_connection", json={"instance_id": "jwt-target"},
                           headers={"authorization": f"Bearer {good}"}).status_code == 200
        for case in TRANSPORT_CASES:
            token = case.make(transport_claims(wall), TOKEN_SECRET)
            _assert_401(*raw_request(mesh, "POST", "/agents/get_connection",
                                     b'{"instance_id": "jwt-target"}',
                                     (("Authorization", f"Bearer {token}"),)))
            sock = mesh.tls_socket()
            try:
                sock.sendall(upgrade_request("jwt-target", token))
                status, head, rest = read_http_answer(sock)
                _assert_401(status, read_body(sock, head, rest))
            finally:
                sock.close()


@pytest.mark.parametrize("header", ["", "Bearer", "Basic YTpi", "bearer  x",
                                    "Bearer a b", "Token abc", "Bearer \u00e9"])
def test_the_mesh_refuses_broken_authorization_headers(mesh: MeshProcess, header: str) -> None:
    with mesh.client() as client:
        answer = client.post("/agents/get_connection", json={"instance_id": "x"},
                             headers=[(b"authorization", header.encode("utf-8"))])
    _assert_401(answer.status_code, answer.content)


def test_a_token_over_the_header_bound_is_431_not_read(mesh: MeshProcess) -> None:
    token = sign(HS256, dict(transport_claims(time.time()), pad="p" * 40_000), TOKEN_SECRET)
    sock = mesh.tls_socket()
    try:
        sock.sendall(upgrade_request("jwt-target", token))
        status, head, rest = read_http_answer(sock)
        assert status == 431
        assert json.loads(read_body(sock, head, rest))["error"]["code"] == (
            "REQUEST_HEADERS_TOO_LARGE")
    finally:
        sock.close()


# -- dispatch-auth envelopes -------------------------------------------------------------------


def dispatch_claims(dispatch_id: str, wall: float, *, instance: str = INSTANCE,
                    agent_type: str = "test-agent", tenant_id: str = "tenant-1",
                    capability: str = "echo") -> dict[str, Any]:
    return {"iss": "svantic", "aud": instance, "sub": agent_type, "tenant_id": tenant_id,
            "jti": dispatch_id, "cap": capability, "iat": int(wall), "exp": int(wall) + 60}


def forged_envelope(case_name: str, route: Any, key: bytes) -> dict[str, str]:
    """The envelope a hostile mesh sends for one routed dispatch (see mesh_process.py)."""
    case = next(case for case in CASES if case.name == case_name)
    claims = dispatch_claims(route.dispatch_id, route.now, instance=route.instance_id,
                             agent_type=route.agent_type, tenant_id=route.tenant_id,
                             capability=route.capability)
    return {"type": "svantic_jwt", "token": case.make(claims, key)}


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=lambda case: case.name)
def test_the_dispatch_verifier_refuses(case: Case) -> None:
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SIGNING])
    dispatch_id = str(uuid.uuid4())
    claims = dispatch_claims(dispatch_id, WALL)
    good = sign(HS256, claims, SIGNING.encode())
    verifier.verify({"type": "svantic_jwt", "token": good}, dispatch_id=dispatch_id,
                    capability="echo", now=WALL)
    with pytest.raises(DispatchAuthError) as refused:
        verifier.verify({"type": "svantic_jwt", "token": case.make(claims, SIGNING.encode())},
                        dispatch_id=dispatch_id, capability="echo", now=WALL)
    assert refused.value.code == "DISPATCH_AUTH_FAILED"
    assert LEAK.search(str(refused.value)) is None, str(refused.value)


def test_a_validly_signed_far_future_exp_is_the_signers_choice_for_dispatch_auth() -> None:
    """Spec 7 sets no longest lifetime, and the verifier keeps PyJWT's verdicts except where
    tests/core/test_auth_differential.py lists a deliberate difference: a token the mesh's
    own key signed with `exp` 10**30 verifies. (The transport issuer, which knows its own
    ttl, refuses it.) Pinned here so that a change of this decision is a deliberate one."""
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SIGNING])
    dispatch_id = str(uuid.uuid4())
    claims = dict(dispatch_claims(dispatch_id, WALL), exp=10**30)
    verifier.verify({"type": "svantic_jwt", "token": sign(HS256, claims, SIGNING.encode())},
                    dispatch_id=dispatch_id, capability="echo", now=WALL)


def _unmasked_text(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes([0x81, size]) + payload
    if size < 1 << 16:
        return bytes([0x81, 126]) + size.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + size.to_bytes(8, "big") + payload


def _client_texts(data: bytes) -> list[Any]:
    """The JSON texts of the masked frames an agent wrote."""
    texts = []
    at = 0
    while at + 2 <= len(data):
        opcode, size = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if size == 126:
            size, at = int.from_bytes(data[at:at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(data[at:at + 8], "big"), at + 8
        mask, at = data[at:at + 4], at + 4
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[at:at + size]))
        at += size
        if opcode == 0x1:
            texts.append(json.loads(payload))
    return texts


@pytest.mark.parametrize("case", DISPATCH_CASES, ids=lambda case: case.name)
def test_an_agent_answers_dispatch_auth_failed_on_the_wire_and_runs_nothing(case: Case) -> None:
    pair = Pair()
    pair.connect()
    pair.agent_events.clear()
    wall = pair.clock.wall()
    dispatch_id = str(uuid.uuid4())
    token = case.make(dispatch_claims(dispatch_id, wall), TEST_SIGNING_SECRET.encode())
    frame = {"v": 1, "type": "dispatch", "id": dispatch_id, "ts": "2026-11-21T10:00:00.123Z",
             "payload": {"dispatch_id": dispatch_id, "capability": "echo", "arguments": {},
                         "deadline_ms": 5000,
                         "dispatch_auth": {"type": "svantic_jwt", "token": token}}}
    agent = pair.agent
    agent.receive_data(_unmasked_text(json.dumps(frame).encode()), pair.clock.now)
    events = agent.events_received()
    assert not any(isinstance(e, ev.DispatchReceived) for e in events), events
    assert not any(isinstance(e, ev.ConnectionClosed) for e in events), events
    answers = _client_texts(b"".join(agent.data_to_send()))
    assert [a["type"] for a in answers] == ["error"], answers
    assert answers[0]["in_reply_to"] == dispatch_id
    assert answers[0]["payload"]["code"] == "DISPATCH_AUTH_FAILED"
    assert LEAK.search(answers[0]["payload"].get("message", "")) is None
    assert not agent.closed


@pytest.mark.parametrize("adapter", ["asyncio", "trio", "gevent"])
def test_real_agents_refuse_every_bad_envelope_from_a_hostile_mesh(
        make_mesh: Callable[..., MeshProcess], tmp_path: Path, adapter: str) -> None:
    """A mesh process that forges the dispatch-auth token (each kind in turn) dispatches to
    a real agent on each adapter over TLS: every call ends `DISPATCH_AUTH_FAILED` (422, the
    agent's own code), the handler never runs, and the agent stays connected and serves the
    next honest dispatch."""
    forge = tmp_path / "forge.json"
    forge.write_text("{}", encoding="utf-8")
    # Failed dispatches would make the agent unhealthy (and deregister it) long before the
    # last kind: this mesh tolerates them, to see every kind reach the agent.
    mesh = make_mesh("asyncio", forge_file=str(forge), settings={"router": {
        "unhealthy_after_failures": 1000, "deregister_after_failures": 1000}})
    mesh.register("forge-target")
    mesh.start_agent("forge-target", adapter)
    with mesh.client() as client:
        def call(n: int) -> httpx.Response:
            return client.post("/agents/dispatch", headers={
                "authorization": f"Bearer {mesh.token()}"}, json={
                "capability": "echo", "arguments": {"n": n}, "instance_id": "forge-target",
                "deadline_ms": 5000})

        assert call(0).status_code == 200
        for n, case in enumerate(DISPATCH_CASES, 1):
            forge.write_text(json.dumps({"case": case.name}), encoding="utf-8")
            answer = call(n)
            assert answer.status_code == 422, (case.name, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "DISPATCH_AUTH_FAILED", (case.name, error)
            assert LEAK.search(error["message"]) is None, (case.name, error)
        forge.write_text("{}", encoding="utf-8")
        honest = call(1000)
        assert honest.status_code == 200 and honest.json()["result"]["echo"] == {"n": 1000}

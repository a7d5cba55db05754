"""The dispatch-auth fast paths (spec section 7) give exactly the answers of the slow ones.

The mint writes each agent's fixed header and claims start once and per token encodes and
hashes only the rest; the verifier remembers an HS256 header with its keys and, per token,
does one HMAC, one strict base64url decode and one Struct decode. These tests hold both to
a plain reference (the whole token built by hand; a verifier that has cached nothing), and
check the mesh's use of them: no route object per dispatch, claims rebound when they change,
and resume holding dispatches without their envelope.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svantic_proto import mesh as mesh_module
from svantic_proto._jws import B64URL_ALPHABET, HS256Signer, b64url_decode, hs256_payload
from svantic_proto.auth import (
    AsymmetricDispatchAuthMinter,
    DispatchAuthError,
    DispatchAuthFailure,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    HS256Key,
)
from svantic_proto.errors import LocalProtocolError
from svantic_proto.events import DispatchFailed, DispatchReceived
from svantic_proto.frames import Dispatch, SvanticJwtAuth
from svantic_proto.mesh import DispatchRoute, jwt_dispatch_auth
from svantic_proto.testing import Pair

SECRET = b"fast-path-secret-0123456789abcdef"
INSTANCE = "navigator-prod-01"
DISPATCH = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f61"
CAPABILITY = "get_ticket"
NOW = 1_795_000_000.25


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def reference_token(
    secret: bytes, claims: dict[str, Any], *, kid: str | None = None, lifetime: int = 60
) -> str:
    """A token built the plain way: whole header and claims JSON, one HMAC, no caching."""
    header: dict[str, str] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    issued_at = math.floor(claims.pop("now"))
    body = {**claims, "iat": issued_at, "exp": issued_at + lifetime}

    # msgspec writes JSON as the minter always has: compact, in insertion order.
    signing_input = b64url(msgspec.json.encode(header)) + b"." + b64url(msgspec.json.encode(body))
    signature = hmac.digest(secret, signing_input, "sha256")
    return (signing_input + b"." + b64url(signature)).decode()


def reference_b64url_decode(segment: bytes) -> bytes:
    """Strict base64url as RFC 4648 section 3.5 allows: no padding, canonical last char."""
    if len(segment) % 4 == 1 or any(byte not in B64URL_ALPHABET for byte in segment):
        raise ValueError("not base64url")
    padded = segment.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(segment) % 4)
    decoded = binascii.a2b_base64(padded, strict_mode=True)
    if b64url(decoded) != segment:
        raise ValueError("not canonical")
    return decoded


# Text a mesh may put in claims: JSON escapes, non-ASCII, and plain names.
claim_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24
)


# -- base64url ---------------------------------------------------------------------------------


segment_bytes = st.lists(
    st.sampled_from(list(B64URL_ALPHABET) + list(b'=+/.!"\\ \n\x00\xff\x7f')),
    max_size=40,
).map(bytes)


@settings(max_examples=600, deadline=None)
@given(segment=st.one_of(segment_bytes, st.binary(max_size=40), st.binary(max_size=30).map(b64url)))
def test_b64url_decode_accepts_and_refuses_exactly_what_strict_rfc4648_does(
    segment: bytes,
) -> None:
    try:
        expected: bytes | None = reference_b64url_decode(segment)
    except ValueError:
        expected = None
    try:
        got: bytes | None = b64url_decode(segment)
    except ValueError:
        got = None
    assert got == expected


@pytest.mark.parametrize(
    "segment", [b'QQ"', b"QQ\\u0041", b"QUE\\", b"Q\\/Q", b"QQ==", b"QUE=", b"QU\nE"]
)
def test_b64url_decode_lets_no_json_escape_or_padding_through(segment: bytes) -> None:
    with pytest.raises(ValueError):
        b64url_decode(segment)


# -- HS256Signer and hs256_payload ---------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=100),
    first=st.binary(max_size=80),
    second=st.binary(max_size=80),
    rest=st.binary(max_size=200),
)
def test_a_prefixed_signer_signs_the_prefix_and_the_rest(
    secret: bytes, first: bytes, second: bytes, rest: bytes
) -> None:
    signer = HS256Signer(secret).with_prefix(first).with_prefix(second)
    expected = b64url(hmac.digest(secret, first + second + rest, "sha256"))
    assert signer.sign(rest) == expected
    assert signer.matches(rest, expected)
    assert not signer.matches(rest, expected[:-1] + (b"B" if expected[-1:] == b"A" else b"A"))


@settings(max_examples=200, deadline=None)
@given(header=st.binary(min_size=1, max_size=40), start=st.binary(max_size=60),
       rest=st.binary(max_size=120))
def test_compact_is_the_whole_jws_when_the_start_ends_on_a_base64_group(
    header: bytes, start: bytes, rest: bytes
) -> None:
    start = start[: len(start) - len(start) % 3]
    prefix = b64url(header) + b"." + b64url(start)
    token = HS256Signer(SECRET).with_prefix(prefix).compact(rest)
    signing_input = b64url(header) + b"." + b64url(start + rest)
    signature = b64url(hmac.digest(SECRET, signing_input, "sha256"))
    assert token == (signing_input + b"." + signature).decode()


def test_hs256_payload_decodes_only_a_verified_canonical_payload() -> None:
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    signers = (
        HS256Signer(b"other-key").with_prefix(header + b"."),
        HS256Signer(SECRET).with_prefix(header + b"."),
    )
    payload = b'{"a":1}'
    segment = b64url(payload)
    signature = b64url(hmac.digest(SECRET, header + b"." + segment, "sha256"))
    assert hs256_payload(signers, segment, signature) == payload  # the second key matches
    assert hs256_payload(signers[:1], segment, signature) is None
    assert hs256_payload(signers, segment, signature[:-1]) is None
    # Signed, but not canonical base64url: the verifier's slow path says why.
    for bad in (segment + b"=", segment[:-1] + b"+", segment[:-1] + b"R", segment + b"A="):
        resigned = b64url(hmac.digest(SECRET, header + b"." + bad, "sha256"))
        assert hs256_payload(signers, bad, resigned) is None


# -- minting -------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    agent=st.fixed_dictionaries(
        {"instance_id": claim_text, "agent_type": claim_text, "tenant_id": claim_text}
    ),
    dispatch=st.tuples(claim_text, claim_text),
    now=st.floats(min_value=0, max_value=4e9) | st.integers(min_value=0, max_value=4 * 10**9),
    kid=st.none() | claim_text,
    lifetime=st.integers(min_value=1, max_value=10**6),
)
def test_minted_tokens_are_the_plain_tokens_byte_for_byte(
    agent: dict[str, str], dispatch: tuple[str, str], now: float, kid: str | None, lifetime: int
) -> None:
    dispatch_id, capability = dispatch
    minter = DispatchAuthMinter(SECRET, kid=kid, lifetime=lifetime)
    expected = reference_token(
        SECRET,
        {"iss": "svantic", "aud": agent["instance_id"], "sub": agent["agent_type"],
         "tenant_id": agent["tenant_id"], "jti": dispatch_id, "cap": capability, "now": now},
        kid=kid,
        lifetime=lifetime,
    )
    claims = {"dispatch_id": dispatch_id, "capability": capability, "now": now}
    assert minter.mint_token(**agent, **claims) == expected
    assert minter.token_minter(**agent)(dispatch_id, capability, now) == expected
    assert minter.mint_token(**agent, **claims) == expected  # from the minter's agent cache


def test_a_token_minter_verifies_and_differs_per_dispatch() -> None:
    minter = DispatchAuthMinter(SECRET)
    tokens = minter.token_minter(instance_id=INSTANCE, agent_type="navigator", tenant_id="t")
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])
    first = tokens(DISPATCH, CAPABILITY, NOW)
    second = tokens(DISPATCH[:-1] + "2", CAPABILITY, NOW)
    assert first != second
    claims = verifier.verify_token(first, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    assert (claims.sub, claims.tenant_id, claims.iat, claims.exp) == (
        "navigator", "t", 1_795_000_000, 1_795_000_060
    )


@pytest.mark.parametrize("field", ["instance_id", "agent_type", "tenant_id"])
@pytest.mark.parametrize("value", ["", None, 7, ["x"]])
def test_a_token_minter_needs_every_agent_claim(field: str, value: Any) -> None:
    agent: dict[str, Any] = {"instance_id": INSTANCE, "agent_type": "a", "tenant_id": "t"}
    agent[field] = value
    minter = DispatchAuthMinter(SECRET)
    with pytest.raises(LocalProtocolError):
        minter.token_minter(**agent)
    with pytest.raises(LocalProtocolError):
        minter.mint_token(**agent, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


@pytest.mark.parametrize(
    ("dispatch_id", "capability", "now"),
    [
        ("", CAPABILITY, NOW),
        (7, CAPABILITY, NOW),
        (DISPATCH, "", NOW),
        (DISPATCH, None, NOW),
        (DISPATCH, CAPABILITY, math.nan),
        (DISPATCH, CAPABILITY, math.inf),
        (DISPATCH, CAPABILITY, True),
        (DISPATCH, CAPABILITY, "1795000000"),
    ],
)
def test_a_token_minter_checks_each_dispatch(dispatch_id: Any, capability: Any, now: Any) -> None:
    tokens = DispatchAuthMinter(SECRET).token_minter(
        instance_id=INSTANCE, agent_type="a", tenant_id="t"
    )
    with pytest.raises(LocalProtocolError):
        tokens(dispatch_id, capability, now)


def test_a_str_subclass_is_refused_even_for_an_agent_minted_for_before() -> None:
    class Text(str):
        pass

    minter = DispatchAuthMinter(SECRET)
    claims = {"agent_type": "a", "tenant_id": "t", "dispatch_id": DISPATCH,
              "capability": CAPABILITY, "now": NOW}
    minter.mint_token(instance_id=INSTANCE, **claims)
    with pytest.raises(LocalProtocolError):
        minter.mint_token(instance_id=Text(INSTANCE), **claims)


def test_the_minter_keeps_a_bounded_number_of_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    from svantic_proto import auth as auth_module

    monkeypatch.setattr(auth_module, "_AGENT_CACHE_LIMIT", 3)
    minter = DispatchAuthMinter(SECRET)
    verifier = DispatchAuthVerifier("agent-0", hs256_keys=[SECRET])
    for number in range(10):
        minter.mint_token(instance_id=f"agent-{number}", agent_type="a", tenant_id="t",
                          dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    assert len(minter._agents) == 3
    token = minter.mint_token(instance_id="agent-0", agent_type="a", tenant_id="t",
                              dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    verifier.verify_token(token, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_asymmetric_token_minters_verify(algorithm: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else (
        ed25519.Ed25519PrivateKey.generate()
    )
    minter = AsymmetricDispatchAuthMinter(key, kid="k1")
    verifier = DispatchAuthVerifier(INSTANCE, jwks=minter.jwks())
    tokens = minter.token_minter(instance_id=INSTANCE, agent_type="a", tenant_id="t")
    for dispatch_id in (DISPATCH, DISPATCH[:-1] + "9"):
        claims = verifier.verify_token(
            tokens(dispatch_id, CAPABILITY, NOW), dispatch_id=dispatch_id,
            capability=CAPABILITY, now=NOW,
        )
        assert claims.jti == dispatch_id


# -- verifying: a warm verifier answers as a cold one ------------------------------------------


def _outcome(verifier: DispatchAuthVerifier, token: str, now: float) -> str:
    try:
        verifier.verify(SvanticJwtAuth(token=token), dispatch_id=DISPATCH,
                        capability=CAPABILITY, now=now)
    except DispatchAuthError as exc:
        return str(exc.reason)
    return "ok"


def _keys() -> list[HS256Key]:
    return [HS256Key(SECRET, kid="a"), HS256Key(b"second-key-0123456789", kid="b")]


def _valid(kid: str | None) -> str:
    minter = DispatchAuthMinter(SECRET, kid=kid)
    return minter.mint_token(instance_id=INSTANCE, agent_type="a", tenant_id="t",
                             dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


@settings(max_examples=400, deadline=None)
@given(
    kid=st.sampled_from([None, "a", "b", "zz"]),
    position=st.integers(min_value=0, max_value=400),
    replacement=st.sampled_from([*'.=+/-_Aa0\\"', "", ".."]),
    offset=st.sampled_from([0.0, 59.0, 64.9, 65.0, -5.0, -5.5, 3600.0]),
)
def test_a_warm_verifier_gives_the_reason_a_cold_one_gives(
    kid: str | None, position: int, replacement: str, offset: float
) -> None:
    """A verifier that has cached the header (the fast path) against a fresh one per token:
    the same verdict and the same reason, for valid and damaged tokens alike."""
    good = _valid(None if kid == "zz" else kid)
    warm = DispatchAuthVerifier(INSTANCE, hs256_keys=_keys())
    if kid != "zz":
        _outcome(warm, good, NOW)  # caches the header and its keys
    position = min(position, len(good))
    token = good[:position] + replacement + good[position + 1 :]
    cold = DispatchAuthVerifier(INSTANCE, hs256_keys=_keys())
    assert _outcome(warm, token, NOW + offset) == _outcome(cold, token, NOW + offset)


def test_a_warm_verifier_still_refuses_a_resigned_token_with_repeated_claims() -> None:
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    body = (
        b'{"iss":"svantic","aud":"elsewhere","aud":"' + INSTANCE.encode() + b'","sub":"a",'
        b'"tenant_id":"t","jti":"' + DISPATCH.encode() + b'","cap":"get_ticket",'
        b'"iat":1795000000,"exp":1795000060}'
    )
    signing_input = header + b"." + b64url(body)
    token = (signing_input + b"." + b64url(hmac.digest(SECRET, signing_input, "sha256"))).decode()
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])
    assert _outcome(verifier, _valid(None), NOW) == "ok"
    assert _outcome(verifier, token, NOW) == str(DispatchAuthFailure.MALFORMED)


def test_a_warm_verifier_honours_a_foreign_nbf() -> None:
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    body = json.dumps(
        {"iss": "svantic", "aud": INSTANCE, "sub": "a", "tenant_id": "t", "jti": DISPATCH,
         "cap": CAPABILITY, "iat": 1_795_000_000, "exp": 1_795_000_060, "nbf": 1_795_000_030},
        separators=(",", ":"),
    ).encode()
    signing_input = header + b"." + b64url(body)
    token = (signing_input + b"." + b64url(hmac.digest(SECRET, signing_input, "sha256"))).decode()
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])
    assert _outcome(verifier, _valid(None), NOW) == "ok"
    assert _outcome(verifier, token, NOW) == str(DispatchAuthFailure.NOT_YET_VALID)
    assert _outcome(verifier, token, 1_795_000_030.0) == "ok"


def test_verify_token_returns_the_claims_on_the_fast_path() -> None:
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])
    for _ in range(2):  # the first call caches the header, the second takes the fast path
        claims = verifier.verify_token(
            _valid(None), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW
        )
        assert (claims.aud, claims.jti, claims.cap) == (INSTANCE, DISPATCH, CAPABILITY)


# -- the mesh ------------------------------------------------------------------------------------


def _no_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> DispatchRoute:
        raise AssertionError("a route object was built for jwt_dispatch_auth")

    monkeypatch.setattr(mesh_module, "DispatchRoute", refuse)


def test_the_mesh_mints_through_jwt_dispatch_auth_without_a_route_object(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pair = Pair()
    pair.connect()
    _no_routes(monkeypatch)
    ids = [pair.mesh.send_dispatch("echo", deadline_ms=5000, now=pair.clock.now) for _ in range(3)]
    pair.pump()
    assert [e.dispatch_id for e in pair.agent_events_of(DispatchReceived)] == ids


def test_jwt_dispatch_auth_still_mints_from_a_route() -> None:
    mint = jwt_dispatch_auth(DispatchAuthMinter(SECRET))
    envelope = mint(DispatchRoute(INSTANCE, "a", "t", DISPATCH, CAPABILITY, NOW))
    assert isinstance(envelope, SvanticJwtAuth)
    assert envelope.token == _valid(None)


def _sent_claims(pair: Pair) -> dict[str, Any]:
    (frame,) = [f for f in _frames(pair.mesh.data_to_send()) if isinstance(f, Dispatch)]
    assert isinstance(frame.payload.dispatch_auth, SvanticJwtAuth)
    claims_segment = frame.payload.dispatch_auth.token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(claims_segment + "=="))
    return decoded


def _frames(chunks: list[bytes]) -> list[Any]:
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import TextMessage

    from svantic_proto.codec import decode_frame

    reader = Connection(ConnectionType.CLIENT)
    for chunk in chunks:
        reader.receive_data(chunk)
    return [decode_frame(e.data) for e in reader.events() if isinstance(e, TextMessage)]


def test_the_mesh_rebinds_its_minter_when_the_claims_change() -> None:
    pair = Pair(agent_type="first-type")
    pair.connect()
    pair.mesh.send_dispatch("echo", deadline_ms=5000, now=pair.clock.now)
    assert _sent_claims(pair)["sub"] == "first-type"
    pair.mesh.agent_type = "second-type"
    pair.mesh.send_dispatch("echo", deadline_ms=5000, now=pair.clock.now)
    claims = _sent_claims(pair)
    assert (claims["sub"], claims["aud"], claims["tenant_id"]) == (
        "second-type", pair.instance_id, pair.tenant_id
    )


def test_an_agent_type_the_minter_refuses_fails_each_dispatch_closed() -> None:
    pair = Pair()
    pair.connect()
    pair.mesh.agent_type = ""
    for _ in range(2):
        dispatch_id = pair.mesh.send_dispatch("echo", deadline_ms=5000, now=pair.clock.now)
        assert pair.mesh.data_to_send() == []
        failed = pair.mesh.events_received()
        assert [(e.dispatch_id, e.code) for e in failed if isinstance(e, DispatchFailed)] == [
            (dispatch_id, "AGENT_UNHEALTHY")
        ]
        assert dispatch_id not in pair.mesh.in_flight


def test_resume_holds_a_dispatch_without_its_envelope_and_replays_a_fresh_one() -> None:
    pair = Pair()
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    first = pair.mesh.in_flight[dispatch_id].payload.dispatch_auth
    assert isinstance(first, SvanticJwtAuth)
    pair.cut()
    held = [h for entry in pair.store._entries.values() for h in entry.held.values()]
    assert [(h.payload.dispatch_id, h.payload.dispatch_auth) for h in held] == [
        (dispatch_id, None)
    ]
    pair.advance(2)
    pair.reconnect()
    again = pair.mesh.in_flight[dispatch_id].payload
    assert again.attempt == 2
    assert isinstance(again.dispatch_auth, SvanticJwtAuth) and again.dispatch_auth != first
    (received,) = pair.agent_events_of(DispatchReceived)
    assert (received.dispatch_id, received.attempt) == (dispatch_id, 2)


def test_a_replay_whose_envelope_cannot_be_minted_fails_and_is_not_sent() -> None:
    pair = Pair()
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("job", deadline_ms=60_000, now=pair.clock.now)
    pair.cut()

    def broken(route: DispatchRoute) -> SvanticJwtAuth:
        raise RuntimeError("signing key unavailable")

    pair.mint = broken
    pair.reconnect()
    failed = [(e.dispatch_id, e.code) for e in pair.mesh_events_of(DispatchFailed)]
    assert failed == [(dispatch_id, "AGENT_UNHEALTHY")]
    assert dispatch_id not in pair.mesh.in_flight
    assert pair.agent_events_of(DispatchReceived) == []


def test_an_agent_with_auth_off_takes_dispatches_without_an_envelope() -> None:
    pair = Pair(dispatch_auth=False)
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("echo", deadline_ms=5000, now=pair.clock.now)
    pair.pump()
    assert [e.dispatch_id for e in pair.agent_events_of(DispatchReceived)] == [dispatch_id]


@pytest.mark.parametrize("now", [math.nan, math.inf, "1795000000", None, True])
def test_a_decoded_envelope_needs_a_finite_wall_time(now: Any) -> None:
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])
    with pytest.raises(LocalProtocolError):
        verifier.verify(SvanticJwtAuth(token=_valid(None)), dispatch_id=DISPATCH,
                        capability=CAPABILITY, now=now)

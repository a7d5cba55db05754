"""Dispatch auth (spec section 7): minting, verifying, rotation, strictness, JWKS, flag."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from svantic_proto._jws import HS256Signer, b64url_decode, b64url_encode
from svantic_proto.auth import (
    DISPATCH_AUTH_ENABLED_ENV,
    AsymmetricDispatchAuthMinter,
    DispatchAuthError,
    DispatchAuthFailure,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    DispatchClaims,
    HS256Key,
    dispatch_auth_enabled,
    shared_secret_envelope,
    verify_shared_secret,
)
from svantic_proto.errors import LocalProtocolError, SvanticError

SECRET = "current-signing-secret-0123456789abcdef"
PREVIOUS = "previous-signing-secret-0123456789abcdef"
INSTANCE = "navigator-prod-01"
DISPATCH = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f61"
CAPABILITY = "get_ticket"
NOW = 1_795_000_000.0
Failure = DispatchAuthFailure


def mint(minter: Any, now: float = NOW, **overrides: str) -> dict[str, str]:
    fields = {
        "instance_id": INSTANCE,
        "agent_type": "navigator",
        "tenant_id": "tenant_abc",
        "dispatch_id": DISPATCH,
        "capability": CAPABILITY,
    }
    fields.update(overrides)
    envelope: dict[str, str] = minter.mint(now=now, **fields)
    return envelope


def reason_of(verifier: DispatchAuthVerifier, envelope: Any, now: float = NOW + 1) -> Failure:
    with pytest.raises(DispatchAuthError) as caught:
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=now)
    return caught.value.reason


def jwt_envelope(token: str) -> dict[str, str]:
    return {"type": "svantic_jwt", "token": token}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def valid_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": "svantic",
        "aud": INSTANCE,
        "sub": "navigator",
        "tenant_id": "tenant_abc",
        "jti": DISPATCH,
        "cap": CAPABILITY,
        "iat": int(NOW),
        "exp": int(NOW) + 60,
    }
    claims.update(overrides)
    return claims


def craft(
    header: dict[str, Any] | bytes | None = None,
    claims: dict[str, Any] | bytes | None = None,
    secret: str = SECRET,
) -> str:
    """A token signed correctly over arbitrary header / claims bytes (stdlib only)."""
    if header is None:
        header = {"alg": "HS256", "typ": "JWT"}
    if claims is None:
        claims = valid_claims()
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    claims_bytes = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = b64(header_bytes) + "." + b64(claims_bytes)
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def resign(token_body: str, secret: str = SECRET) -> str:
    mac = hmac.new(secret.encode(), token_body.encode(), hashlib.sha256).digest()
    return token_body + "." + b64(mac)


@pytest.fixture
def verifier() -> DispatchAuthVerifier:
    return DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET])


# ----------------------------------------------------------------------------- HS256


def test_minted_envelope_verifies_and_carries_the_spec_claims(
    verifier: DispatchAuthVerifier,
) -> None:
    envelope = mint(DispatchAuthMinter(SECRET), now=NOW + 0.75)
    assert envelope["type"] == "svantic_jwt"
    verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW + 3)
    claims = verifier.verify_token(
        envelope["token"], dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW + 3
    )
    assert claims == DispatchClaims(
        iss="svantic",
        aud=INSTANCE,
        sub="navigator",
        tenant_id="tenant_abc",
        jti=DISPATCH,
        cap=CAPABILITY,
        iat=int(NOW),  # rounded down
        exp=int(NOW) + 60,  # spec default lifetime
    )


def test_header_is_hs256_jwt_and_names_the_kid_when_given() -> None:
    token = mint(DispatchAuthMinter(SECRET, kid="2026-11"))["token"]
    header = json.loads(b64url_decode(token.split(".")[0].encode()))
    assert header == {"alg": "HS256", "typ": "JWT", "kid": "2026-11"}


def test_our_tokens_verify_with_pyjwt() -> None:
    import jwt

    token = mint(DispatchAuthMinter(SECRET))["token"]
    claims = jwt.decode(
        token,
        SECRET,
        algorithms=["HS256"],
        audience=INSTANCE,
        issuer="svantic",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["jti"] == DISPATCH and claims["cap"] == CAPABILITY


def test_pyjwt_tokens_verify_with_ours(verifier: DispatchAuthVerifier) -> None:
    import jwt

    token = jwt.encode(valid_claims(extra={"scope": ["a"]}), SECRET, algorithm="HS256")
    verifier.verify(jwt_envelope(token), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


def test_custom_lifetime() -> None:
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET], leeway=0)
    envelope = mint(DispatchAuthMinter(SECRET, lifetime=10))
    verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW + 9.9)
    assert reason_of(verifier, envelope, now=NOW + 10) is Failure.EXPIRED


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"instance_id": "other-instance"}, Failure.WRONG_AUDIENCE),
        ({"dispatch_id": "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f69"}, Failure.WRONG_JTI),
        ({"capability": "delete_everything"}, Failure.WRONG_CAPABILITY),
    ],
)
def test_a_token_for_another_dispatch_is_refused(
    verifier: DispatchAuthVerifier, overrides: dict[str, str], reason: Failure
) -> None:
    assert reason_of(verifier, mint(DispatchAuthMinter(SECRET), **overrides)) is reason


def test_wrong_issuer(verifier: DispatchAuthVerifier) -> None:
    envelope = mint(DispatchAuthMinter(SECRET, issuer="evil"))
    assert reason_of(verifier, envelope) is Failure.WRONG_ISSUER


# ----------------------------------------------------------------------------- time


@pytest.mark.parametrize(
    ("now", "leeway", "reason"),
    [
        (NOW + 64.999, 5, None),  # exp + leeway not yet reached
        (NOW + 65, 5, Failure.EXPIRED),  # exp <= now - leeway: expired (RFC 7519 4.1.4)
        (NOW + 59.5, 0, None),
        (NOW + 60, 0, Failure.EXPIRED),
        (NOW - 5, 5, None),  # iat == now + leeway: still fine
        (NOW - 5.001, 5, Failure.ISSUED_IN_FUTURE),
        (NOW - 0.001, 0, Failure.ISSUED_IN_FUTURE),
        (NOW - 0.001, 2.5, None),
    ],
)
def test_time_boundaries_follow_pyjwt(now: float, leeway: float, reason: Failure | None) -> None:
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET], leeway=leeway)
    envelope = mint(DispatchAuthMinter(SECRET))
    if reason is None:
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=now)
    else:
        assert reason_of(verifier, envelope, now=now) is reason


def test_foreign_nbf_is_honoured(verifier: DispatchAuthVerifier) -> None:
    token = craft(claims=valid_claims(nbf=int(NOW) + 30))
    assert reason_of(verifier, jwt_envelope(token), now=NOW) is Failure.NOT_YET_VALID
    verifier.verify(jwt_envelope(token), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW + 26)


@pytest.mark.parametrize("leeway", [-1, 5.01, 60, float("nan"), True])
def test_leeway_is_at_most_five_seconds(leeway: float) -> None:
    with pytest.raises(LocalProtocolError):
        DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET], leeway=leeway)


@pytest.mark.parametrize("now", [float("nan"), float("inf"), "1795000000", None, True])
def test_now_must_be_a_finite_number(verifier: DispatchAuthVerifier, now: Any) -> None:
    """A NaN `now` would make every token look unexpired: refuse it as API misuse."""
    envelope = mint(DispatchAuthMinter(SECRET))
    with pytest.raises(LocalProtocolError):
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=now)
    with pytest.raises(LocalProtocolError):
        mint(DispatchAuthMinter(SECRET), now=now)


# ----------------------------------------------------------------------------- rotation


def test_kidless_token_is_tried_against_every_key() -> None:
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET, PREVIOUS])
    for secret in (SECRET, PREVIOUS):
        envelope = mint(DispatchAuthMinter(secret))
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    assert reason_of(verifier, mint(DispatchAuthMinter("x" * 40))) is Failure.BAD_SIGNATURE


def test_kid_selects_exactly_one_key() -> None:
    verifier = DispatchAuthVerifier(
        INSTANCE, hs256_keys=[HS256Key(SECRET, kid="new"), HS256Key(PREVIOUS, kid="old")]
    )
    for secret, kid in ((SECRET, "new"), (PREVIOUS, "old")):
        envelope = mint(DispatchAuthMinter(secret, kid=kid))
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    # The previous secret under the current key's kid: only "new" is tried.
    assert reason_of(verifier, mint(DispatchAuthMinter(PREVIOUS, kid="new"))) is (
        Failure.BAD_SIGNATURE
    )
    assert reason_of(verifier, mint(DispatchAuthMinter(SECRET, kid="gone"))) is (
        Failure.UNKNOWN_KEY
    )
    # Keys with kids still serve tokens without one.
    verifier.verify(
        mint(DispatchAuthMinter(PREVIOUS)), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW
    )


def test_a_kid_is_unknown_to_a_verifier_whose_keys_have_none(
    verifier: DispatchAuthVerifier,
) -> None:
    assert reason_of(verifier, mint(DispatchAuthMinter(SECRET, kid="k1"))) is (Failure.UNKNOWN_KEY)


def test_key_configuration_errors() -> None:
    with pytest.raises(LocalProtocolError):
        DispatchAuthVerifier(INSTANCE, hs256_keys=[HS256Key(SECRET, "k"), HS256Key(PREVIOUS, "k")])
    with pytest.raises(LocalProtocolError):
        HS256Key("")
    with pytest.raises(LocalProtocolError):
        HS256Key(SECRET, kid="")
    with pytest.raises(LocalProtocolError):
        DispatchAuthMinter(b"")
    with pytest.raises(LocalProtocolError):
        DispatchAuthVerifier(INSTANCE)  # enabled, but nothing to verify with
    with pytest.raises(LocalProtocolError):
        DispatchAuthVerifier("", hs256_keys=[SECRET])
    DispatchAuthVerifier(INSTANCE, enabled=False)  # disabled needs no credential


@pytest.mark.parametrize("lifetime", [0, -60, 1.5, True])
def test_lifetime_must_be_positive_whole_seconds(lifetime: Any) -> None:
    with pytest.raises(LocalProtocolError):
        DispatchAuthMinter(SECRET, lifetime=lifetime)


@pytest.mark.parametrize("field", ["instance_id", "agent_type", "tenant_id", "dispatch_id"])
def test_minting_needs_every_claim(field: str) -> None:
    with pytest.raises(LocalProtocolError):
        mint(DispatchAuthMinter(SECRET), **{field: ""})


# ----------------------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"alg": "none", "typ": "JWT"}, Failure.BAD_ALGORITHM),
        ({"alg": "HS512", "typ": "JWT"}, Failure.BAD_ALGORITHM),
        ({"alg": "hs256"}, Failure.BAD_ALGORITHM),
        ({"alg": "ES256"}, Failure.BAD_ALGORITHM),
        ({"typ": "JWT"}, Failure.BAD_ALGORITHM),
        ({"alg": ["HS256"]}, Failure.BAD_ALGORITHM),
        ({"alg": "HS256", "typ": "JWS"}, Failure.BAD_HEADER),
        ({"alg": "HS256", "typ": "jwt"}, Failure.BAD_HEADER),
        ({"alg": "HS256", "typ": None}, Failure.BAD_HEADER),
        ({"alg": "HS256", "crit": ["b64"], "b64": True}, Failure.BAD_HEADER),
        ({"alg": "HS256", "crit": ["exp"]}, Failure.BAD_HEADER),
        ({"alg": "HS256", "b64": False}, Failure.BAD_HEADER),
        ({"alg": "HS256", "kid": 7}, Failure.BAD_HEADER),
        ({"alg": "HS256", "kid": None}, Failure.BAD_HEADER),
    ],
)
def test_header_rules(
    verifier: DispatchAuthVerifier, header: dict[str, Any], reason: Failure
) -> None:
    assert reason_of(verifier, jwt_envelope(craft(header))) is reason


def test_header_without_typ_and_with_unused_parameters_is_fine(
    verifier: DispatchAuthVerifier,
) -> None:
    token = craft({"alg": "HS256", "jku": "https://attacker.invalid/keys", "cty": "x"})
    verifier.verify(jwt_envelope(token), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("exp", str(int(NOW) + 60)),
        ("exp", float(int(NOW) + 60)),
        ("exp", True),
        ("iat", NOW + 0.5),
        ("iat", str(int(NOW))),
        ("nbf", str(int(NOW))),
        ("nbf", None),
        ("aud", [INSTANCE]),
        ("iss", None),
        ("jti", 1),
        ("cap", [CAPABILITY]),
        ("sub", 5),
        ("tenant_id", {"id": "tenant_abc"}),
    ],
)
def test_claim_types_are_strict(verifier: DispatchAuthVerifier, name: str, value: Any) -> None:
    """exp/iat/nbf are JSON integers, the rest strings: PyJWT would int() a string exp."""
    token = craft(claims=valid_claims(**{name: value}))
    assert reason_of(verifier, jwt_envelope(token)) is Failure.BAD_CLAIM_TYPE


@pytest.mark.parametrize("name", ["iss", "aud", "sub", "tenant_id", "jti", "cap", "iat", "exp"])
def test_every_claim_is_required(verifier: DispatchAuthVerifier, name: str) -> None:
    claims = valid_claims()
    del claims[name]
    assert reason_of(verifier, jwt_envelope(craft(claims=claims))) is Failure.MISSING_CLAIM


def test_extra_claims_are_ignored(verifier: DispatchAuthVerifier) -> None:
    token = craft(claims=valid_claims(scope=["read"], nested={"a": [1, 2.5, None]}))
    verifier.verify(jwt_envelope(token), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


def _duplicate_claims(first: str, last: str) -> bytes:
    body = json.dumps(valid_claims())[1:-1]
    return (
        '{"aud": ' + json.dumps(first) + ", " + body + ', "aud": ' + json.dumps(last) + "}"
    ).encode()


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        (b'{"alg":"HS256","alg":"HS256"}', None),
        (b'{"alg":"none","alg":"HS256"}', None),
        (None, _duplicate_claims("someone-else", INSTANCE)),
        (None, _duplicate_claims(INSTANCE, INSTANCE)),
        (None, json.dumps(valid_claims(x={"k": 1})).replace('"k": 1', '"k": 1, "k": 2').encode()),
    ],
)
def test_repeated_member_names_are_refused(
    verifier: DispatchAuthVerifier, header: bytes | None, claims: bytes | None
) -> None:
    """Parsers that keep the first and parsers that keep the last must not disagree."""
    assert reason_of(verifier, jwt_envelope(craft(header, claims))) is Failure.MALFORMED


GOOD = craft()
GOOD_HEADER, GOOD_CLAIMS, GOOD_SIGNATURE = GOOD.split(".")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc.def",
        GOOD + ".",
        GOOD + "." + GOOD_SIGNATURE,
        "." + GOOD_CLAIMS + "." + GOOD_SIGNATURE,
        GOOD_HEADER + ".." + GOOD_SIGNATURE,
        resign(GOOD_HEADER + "=." + GOOD_CLAIMS),  # padding (re-signed: parse must refuse)
        resign(GOOD_HEADER + "." + GOOD_CLAIMS + "=" * (-len(GOOD_CLAIMS) % 4 or 1)),
        resign(GOOD_HEADER + "." + GOOD_CLAIMS[:-1] + "+"),  # standard alphabet
        resign(GOOD_HEADER + "." + " " + GOOD_CLAIMS),  # whitespace
        resign(GOOD_HEADER + "." + GOOD_CLAIMS + "é"),  # not ASCII
        resign(GOOD_HEADER + "." + GOOD_CLAIMS[:-1]),  # truncated JSON / 4n+1 length
        resign(GOOD_HEADER + "." + b64(b"[1, 2]")),
        resign(GOOD_HEADER + "." + b64(b'"claims"')),
        resign(GOOD_HEADER + "." + b64(json.dumps(valid_claims()).encode("utf-16"))),
        resign(GOOD_HEADER + "." + b64(b"\xef\xbb\xbf" + json.dumps(valid_claims()).encode())),
        resign(GOOD_HEADER + "." + b64(json.dumps(valid_claims(x="\ud800")).encode())),
        resign(GOOD_HEADER + "." + b64(json.dumps(valid_claims(x=float("nan"))).encode())),
        resign(
            GOOD_HEADER + "." + b64(b'{"x": "\xff", ' + json.dumps(valid_claims())[1:].encode())
        ),
        resign(GOOD_HEADER + "." + b64(b"[" * 5000 + b"]" * 5000)),
        resign(b64(b"[]") + "." + GOOD_CLAIMS),
        resign(b64(b"\xff") + "." + GOOD_CLAIMS),
        resign(b64(b"{" * 3000) + "." + GOOD_CLAIMS),
    ],
)
def test_malformed_tokens(verifier: DispatchAuthVerifier, token: str) -> None:
    assert reason_of(verifier, jwt_envelope(token)) is Failure.MALFORMED


def test_non_canonical_base64_is_refused(verifier: DispatchAuthVerifier) -> None:
    """`QR` and `QQ` both decode to b"A"; only the canonical spelling is accepted."""
    claims = GOOD_CLAIMS
    assert len(claims) % 4 in (2, 3)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(claims[-1])
    twisted = claims[:-1] + alphabet[last | 1]
    assert twisted != claims
    assert reason_of(verifier, jwt_envelope(resign(GOOD_HEADER + "." + twisted))) is (
        Failure.MALFORMED
    )


def test_tampering_breaks_the_signature(verifier: DispatchAuthVerifier) -> None:
    claims = b64(json.dumps(valid_claims(aud="someone-else")).encode())
    assert reason_of(verifier, jwt_envelope(f"{GOOD_HEADER}.{claims}.{GOOD_SIGNATURE}")) is (
        Failure.BAD_SIGNATURE
    )
    flipped = GOOD_SIGNATURE[:-2] + ("A" if GOOD_SIGNATURE[-2] != "A" else "B") + "A"
    assert reason_of(verifier, jwt_envelope(f"{GOOD_HEADER}.{GOOD_CLAIMS}.{flipped}")) is (
        Failure.BAD_SIGNATURE
    )
    assert reason_of(verifier, jwt_envelope(f"{GOOD_HEADER}.{GOOD_CLAIMS}.")) is (
        Failure.BAD_SIGNATURE
    )


def test_many_distinct_headers_keep_working(verifier: DispatchAuthVerifier) -> None:
    """Header parsing is cached per verifier; a flood of distinct headers stays bounded."""
    for index in range(200):
        token = craft({"alg": "HS256", "typ": "JWT", "x": index})
        verifier.verify(jwt_envelope(token), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
        bad = craft({"alg": "HS256", "typ": "JWT", "x": index}, secret=PREVIOUS)
        assert reason_of(verifier, jwt_envelope(bad)) is Failure.BAD_SIGNATURE
    assert len(verifier._header_cache) <= 64


# ----------------------------------------------------------------------------- envelopes


@dataclass
class EnvelopeStruct:
    type: str
    token: str | None = None
    secret: str | None = None


class EnvelopeMsgspec(msgspec.Struct):
    type: str
    token: str | msgspec.UnsetType = msgspec.UNSET
    secret: str | msgspec.UnsetType = msgspec.UNSET


@pytest.mark.parametrize("shape", [dict, EnvelopeStruct, EnvelopeMsgspec, types.SimpleNamespace])
def test_envelope_may_be_a_dict_or_an_object_with_attributes(
    verifier: DispatchAuthVerifier, shape: Any
) -> None:
    envelope = shape(**mint(DispatchAuthMinter(SECRET)))
    verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    secret_verifier = DispatchAuthVerifier(INSTANCE, shared_secret="s3cr3t")
    secret_verifier.verify(
        shape(**shared_secret_envelope("s3cr3t")), dispatch_id=DISPATCH, capability="x", now=NOW
    )
    assert reason_of(secret_verifier, shape(type="shared_secret", secret="nope")) is (
        Failure.SECRET_MISMATCH
    )


@pytest.mark.parametrize("absent", [None, msgspec.UNSET])
def test_missing_envelope_fails_closed_when_enabled(
    verifier: DispatchAuthVerifier, absent: Any
) -> None:
    assert reason_of(verifier, absent) is Failure.MISSING
    disabled = DispatchAuthVerifier(INSTANCE, enabled=False)
    disabled.verify(absent, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


def test_an_envelope_at_a_disabled_agent_is_a_flag_mismatch() -> None:
    """Both sides must agree on SVANTIC_DISPATCH_AUTH_ENABLED; a disagreement fails loudly."""
    disabled = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET], enabled=False)
    assert reason_of(disabled, mint(DispatchAuthMinter(SECRET))) is Failure.DISABLED_MISMATCH


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        ({"type": "mtls"}, Failure.UNSUPPORTED_TYPE),
        ({"type": "oauth", "token": "x"}, Failure.MALFORMED_ENVELOPE),
        ({}, Failure.MALFORMED_ENVELOPE),
        ({"type": "svantic_jwt"}, Failure.MALFORMED_ENVELOPE),
        ({"type": "svantic_jwt", "token": 5}, Failure.MALFORMED_ENVELOPE),
        ({"type": "svantic_jwt", "token": None}, Failure.MALFORMED_ENVELOPE),
        ({"type": "shared_secret", "secret": ["s"]}, Failure.MALFORMED_ENVELOPE),
        ({"type": "shared_secret", "secret": "s3cr3t"}, Failure.UNEXPECTED_TYPE),
        ("svantic_jwt", Failure.MALFORMED_ENVELOPE),
    ],
)
def test_envelope_shapes(verifier: DispatchAuthVerifier, envelope: Any, reason: Failure) -> None:
    assert reason_of(verifier, envelope) is reason


def test_a_jwt_at_a_shared_secret_agent_is_unexpected() -> None:
    verifier = DispatchAuthVerifier(INSTANCE, shared_secret="s3cr3t")
    assert reason_of(verifier, mint(DispatchAuthMinter(SECRET))) is Failure.UNEXPECTED_TYPE


def test_an_agent_may_accept_both_schemes() -> None:
    verifier = DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET], shared_secret="s3cr3t")
    for envelope in (mint(DispatchAuthMinter(SECRET)), shared_secret_envelope("s3cr3t")):
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


def test_shared_secret_compare() -> None:
    verify_shared_secret("pässwörd-✓", "pässwörd-✓")
    for presented in ("pässwörd-x", "", "pässwörd-✓ ", "\ud800"):
        with pytest.raises(DispatchAuthError) as caught:
            verify_shared_secret(presented, "pässwörd-✓")
        assert caught.value.reason is Failure.SECRET_MISMATCH
    with pytest.raises(LocalProtocolError):
        shared_secret_envelope("")


# ----------------------------------------------------------------------------- the error


def test_error_carries_code_reason_and_a_message_without_secrets(
    verifier: DispatchAuthVerifier,
) -> None:
    envelope = mint(DispatchAuthMinter(SECRET, kid="k"), instance_id="other")
    with pytest.raises(DispatchAuthError) as caught:
        verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    error = caught.value
    assert isinstance(error, SvanticError)
    assert error.code == "DISPATCH_AUTH_FAILED"
    assert error.reason == "unknown_key"  # a StrEnum: compares to its wire string
    assert SECRET not in str(error) and envelope["token"] not in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.message) == (error.reason, error.message)

    secret_verifier = DispatchAuthVerifier(INSTANCE, shared_secret="hunter2-local")
    with pytest.raises(DispatchAuthError) as caught:
        secret_verifier.verify(
            shared_secret_envelope("hunter2-presented"),
            dispatch_id=DISPATCH,
            capability="x",
            now=NOW,
        )
    assert "hunter2" not in str(caught.value) and "hunter2" not in repr(caught.value)


# ----------------------------------------------------------------------------- the flag


@pytest.mark.parametrize(
    ("value", "enabled"),
    [
        (None, True),
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        (" true\n", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_dispatch_auth_enabled(value: str | None, enabled: bool) -> None:
    environ = {} if value is None else {DISPATCH_AUTH_ENABLED_ENV: value}
    assert dispatch_auth_enabled(environ) is enabled


@pytest.mark.parametrize("value", ["", "2", "enabled", "truee", "y", "nope"])
def test_dispatch_auth_enabled_refuses_other_values(value: str) -> None:
    with pytest.raises(ValueError, match=DISPATCH_AUTH_ENABLED_ENV):
        dispatch_auth_enabled({DISPATCH_AUTH_ENABLED_ENV: value})


def test_dispatch_auth_enabled_reads_only_the_mapping_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DISPATCH_AUTH_ENABLED_ENV, "false")
    assert dispatch_auth_enabled({}) is True


# ----------------------------------------------------------------------------- primitives


@settings(max_examples=200, deadline=None)
@given(secret=st.binary(min_size=1, max_size=200), message=st.binary(max_size=300))
def test_hs256_signer_is_hmac_sha256(secret: bytes, message: bytes) -> None:
    expected = hmac.digest(secret, message, "sha256")
    assert HS256Signer(secret).digest(message) == expected
    assert HS256Signer(secret).sign(message) == base64.urlsafe_b64encode(expected).rstrip(b"=")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=100))
def test_b64url_round_trip(data: bytes) -> None:
    encoded = b64url_encode(data)
    assert b"=" not in encoded and b"+" not in encoded and b"/" not in encoded
    assert b64url_decode(encoded) == data


# ----------------------------------------------------------------------------- asymmetric


@pytest.fixture(scope="module")
def private_keys() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.fixture(scope="module")
def other_private_keys() -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    return {
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate(),
    }


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_asymmetric_round_trip(algorithm: str, private_keys: dict[str, Any]) -> None:
    minter = AsymmetricDispatchAuthMinter(private_keys[algorithm], kid=f"{algorithm}-1")
    assert minter.algorithm == algorithm
    jwks = minter.jwks()
    (jwk,) = jwks["keys"]
    assert (jwk["kid"], jwk["alg"], jwk["use"]) == (f"{algorithm}-1", algorithm, "sig")
    assert "d" not in jwk
    verifier = DispatchAuthVerifier(INSTANCE, jwks=json.loads(json.dumps(jwks)))
    envelope = mint(minter)
    verifier.verify(envelope, dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    claims = verifier.verify_token(
        envelope["token"], dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW
    )
    assert claims.tenant_id == "tenant_abc"
    # Same claim and time checks as HS256, on our `now`, never PyJWT's clock.
    assert reason_of(verifier, envelope, now=NOW + 65) is Failure.EXPIRED
    assert reason_of(verifier, mint(minter, capability="other")) is Failure.WRONG_CAPABILITY


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_asymmetric_tamper_and_wrong_key(
    algorithm: str, private_keys: dict[str, Any], other_private_keys: dict[str, Any]
) -> None:
    minter = AsymmetricDispatchAuthMinter(private_keys[algorithm], kid="k1")
    verifier = DispatchAuthVerifier(INSTANCE, jwks=minter.jwks())
    header, claims, signature = mint(minter)["token"].split(".")
    forged_claims = b64(json.dumps(valid_claims(aud="x")).encode())
    assert reason_of(verifier, jwt_envelope(f"{header}.{forged_claims}.{signature}")) is (
        Failure.BAD_SIGNATURE
    )
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    assert reason_of(verifier, jwt_envelope(f"{header}.{claims}.{flipped}")) is (
        Failure.BAD_SIGNATURE
    )
    impostor = AsymmetricDispatchAuthMinter(other_private_keys[algorithm], kid="k1")
    assert reason_of(verifier, mint(impostor)) is Failure.BAD_SIGNATURE
    unknown = AsymmetricDispatchAuthMinter(private_keys[algorithm], kid="k2")
    assert reason_of(verifier, mint(unknown)) is Failure.UNKNOWN_KEY


def test_jwks_kid_selection_and_pinned_algorithms(private_keys: dict[str, Any]) -> None:
    es = AsymmetricDispatchAuthMinter(private_keys["ES256"], kid="es")
    ed = AsymmetricDispatchAuthMinter(private_keys["EdDSA"], kid="ed")
    jwks = {"keys": [es.public_jwk(), ed.public_jwk()]}
    verifier = DispatchAuthVerifier(INSTANCE, jwks=jwks)
    for minter in (es, ed):
        verifier.verify(mint(minter), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    # An EdDSA signature presented as the ES256 key's: the key's alg wins.
    _, claims, signature = mint(ed)["token"].split(".")
    swapped = b64(b'{"alg":"EdDSA","typ":"JWT","kid":"es"}')
    assert reason_of(verifier, jwt_envelope(f"{swapped}.{claims}.{signature}")) is (
        Failure.BAD_ALGORITHM
    )
    # Algorithm confusion: HS256 keyed with the public JWK text. HS256 is not accepted.
    confused = craft(
        {"alg": "HS256", "typ": "JWT", "kid": "es"}, secret=json.dumps(es.public_jwk())
    )
    assert reason_of(verifier, jwt_envelope(confused)) is Failure.BAD_ALGORITHM
    # A kid-less token is tried against the keys of its alg.
    kidless_header = b64(b'{"alg":"EdDSA","typ":"JWT"}')
    body = f"{kidless_header}.{claims}"
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key: ed25519.Ed25519PrivateKey = private_keys["EdDSA"]
    token = body + "." + b64(key.sign(body.encode()))
    verifier.verify(jwt_envelope(token), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


def test_hs256_and_jwks_together(private_keys: dict[str, Any]) -> None:
    es = AsymmetricDispatchAuthMinter(private_keys["ES256"], kid="es")
    verifier = DispatchAuthVerifier(
        INSTANCE, hs256_keys=[HS256Key(SECRET, kid="hs")], jwks=es.jwks()
    )
    verifier.verify(mint(es), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)
    verifier.verify(
        mint(DispatchAuthMinter(SECRET, kid="hs")),
        dispatch_id=DISPATCH,
        capability=CAPABILITY,
        now=NOW,
    )
    # The HS256 secret's kid on an ES256 header, and the other way round.
    assert reason_of(verifier, mint(DispatchAuthMinter(SECRET, kid="es"))) is Failure.BAD_ALGORITHM
    with pytest.raises(LocalProtocolError):
        DispatchAuthVerifier(INSTANCE, hs256_keys=[HS256Key(SECRET, kid="es")], jwks=es.jwks())


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_interoperates_with_pyjwt(algorithm: str, private_keys: dict[str, Any]) -> None:
    import jwt

    minter = AsymmetricDispatchAuthMinter(private_keys[algorithm], kid="k")
    public = jwt.PyJWK(minter.public_jwk())
    claims = jwt.decode(
        mint(minter)["token"],
        public,
        algorithms=[algorithm],
        audience=INSTANCE,
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["jti"] == DISPATCH
    foreign = jwt.encode(
        valid_claims(), private_keys[algorithm], algorithm=algorithm, headers={"kid": "k"}
    )
    verifier = DispatchAuthVerifier(INSTANCE, jwks=minter.jwks())
    verifier.verify(jwt_envelope(foreign), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


def test_pem_private_keys(private_keys: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives import serialization

    for algorithm, key in private_keys.items():
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for form in (pem, pem.decode()):
            minter = AsymmetricDispatchAuthMinter(form, kid="k")
            assert minter.algorithm == algorithm
            verifier = DispatchAuthVerifier(INSTANCE, jwks=minter.jwks())
            verifier.verify(mint(minter), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


def test_asymmetric_configuration_errors(private_keys: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    with pytest.raises(LocalProtocolError):
        AsymmetricDispatchAuthMinter(ec.generate_private_key(ec.SECP384R1()), kid="k")
    with pytest.raises(LocalProtocolError):
        AsymmetricDispatchAuthMinter(
            rsa.generate_private_key(public_exponent=65537, key_size=2048), kid="k"
        )
    with pytest.raises(LocalProtocolError):
        AsymmetricDispatchAuthMinter(private_keys["ES256"], kid="k", algorithm="EdDSA")
    with pytest.raises(LocalProtocolError):
        AsymmetricDispatchAuthMinter(b"not a pem", kid="k")
    with pytest.raises(LocalProtocolError):
        AsymmetricDispatchAuthMinter(private_keys["ES256"], kid="")

    es = AsymmetricDispatchAuthMinter(private_keys["ES256"], kid="es")
    public = es.public_jwk()
    for bad_jwks in (
        {},
        {"keys": "nope"},
        {"keys": []},
        {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]},  # nothing usable left
        {"keys": [{"kty": "oct", "k": b64(b"secret")}]},  # never a symmetric key
        {"keys": [{**public, "use": "enc"}]},
        {"keys": [{**public, "alg": "ES384"}]},
        {"keys": [public, public]},  # duplicate kid
        {"keys": [{**public, "x": "AAAA"}]},  # not a point on the curve
        {"keys": [{**public, "d": "AAAA"}]},  # private key material published
        {"keys": ["not an object"]},
    ):
        with pytest.raises(LocalProtocolError):
            DispatchAuthVerifier(INSTANCE, jwks=bad_jwks)
    # Unusable keys next to a usable one are skipped.
    mixed = {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa"}, public]}
    verifier = DispatchAuthVerifier(INSTANCE, jwks=mixed)
    verifier.verify(mint(es), dispatch_id=DISPATCH, capability=CAPABILITY, now=NOW)


# ----------------------------------------------------------------------------- purity


def test_import_loads_no_jwt_ssl_or_socket() -> None:
    """PyJWT imports ssl and socket (breaking gevent's patch-first rule): import it lazily."""
    code = (
        "import sys, svantic_proto.auth as auth\n"
        f"minter = auth.DispatchAuthMinter({SECRET!r})\n"
        f"verifier = auth.DispatchAuthVerifier({INSTANCE!r}, hs256_keys=[{SECRET!r}])\n"
        "envelope = minter.mint(instance_id=%r, agent_type='a', tenant_id='t',"
        " dispatch_id='d', capability='c', now=1.0e9)\n"
        "verifier.verify(envelope, dispatch_id='d', capability='c', now=1.0e9)\n"
        "loaded = sorted(m for m in ('jwt', 'ssl', 'socket', 'cryptography', 'asyncio',"
        " 'threading') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    ) % INSTANCE
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """`python benchmarks/bench_auth.py` keeps working (a quick run; figures not checked)."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import bench_auth
    finally:
        sys.path.pop(0)
    assert bench_auth.main(["--quick", "--repeats", "1"]) == 0
    assert "ours / PyJWT" in capsys.readouterr().out

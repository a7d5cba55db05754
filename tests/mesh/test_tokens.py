"""Transport JWTs (spec 1): issue, verify, and every way a token must be refused."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from svantic_mesh.tokens import InvalidToken, TokenIssuer

SECRET = b"s" * 32
WALL = 1_700_000_000.0


def issuer(**kw: float | str) -> TokenIssuer:
    return TokenIssuer(SECRET, **kw)  # type: ignore[arg-type]


def test_round_trip_claims() -> None:
    tokens = issuer(ttl=600.0)
    token, expires_in = tokens.issue("client-1", "tenant-a", WALL)
    assert expires_in == 600
    claims = tokens.verify(token, WALL + 1)
    assert claims["sub"] == "client-1"
    assert claims["tenant_id"] == "tenant-a"
    assert claims["iss"] == "svantic-mesh"
    assert claims["iat"] == int(WALL)
    assert claims["exp"] == int(WALL) + 600
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "HS256"


def test_expiry_with_leeway() -> None:
    tokens = issuer(ttl=60.0, leeway=5.0)
    token, _ = tokens.issue("c", "t", WALL)
    tokens.verify(token, WALL + 64)  # within leeway
    with pytest.raises(InvalidToken):
        tokens.verify(token, WALL + 65)
    with pytest.raises(InvalidToken):
        tokens.verify(token, WALL + 10_000)


def test_issued_in_the_future_is_refused() -> None:
    tokens = issuer(leeway=5.0)
    token, _ = tokens.issue("c", "t", WALL + 100)
    with pytest.raises(InvalidToken):
        tokens.verify(token, WALL)
    tokens.verify(token, WALL + 96)


def test_other_secret_and_tampering_refused() -> None:
    token, _ = issuer().issue("c", "t", WALL)
    with pytest.raises(InvalidToken):
        TokenIssuer(b"x" * 32).verify(token, WALL)
    head, payload, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["tenant_id"] = "other"
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        issuer().verify(f"{head}.{body}.{sig}", WALL)


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "x" * 9000, "Bearer x.y.z"])
def test_malformed_refused(bad: str) -> None:
    with pytest.raises(InvalidToken):
        issuer().verify(bad, WALL)


def test_alg_none_and_other_algorithms_refused() -> None:
    claims = {"sub": "c", "tenant_id": "t", "iat": WALL, "exp": WALL + 60, "iss": "svantic-mesh"}
    none_token = jwt.encode(claims, None, algorithm="none")
    with pytest.raises(InvalidToken):
        issuer().verify(none_token, WALL)
    hs512 = jwt.encode(claims, SECRET * 2, algorithm="HS512")
    with pytest.raises(InvalidToken):
        issuer().verify(hs512, WALL)


def test_wrong_issuer_and_missing_claims_refused() -> None:
    base = {"sub": "c", "tenant_id": "t", "iat": WALL, "exp": WALL + 60, "iss": "svantic-mesh"}
    wrong_iss = jwt.encode({**base, "iss": "someone"}, SECRET, algorithm="HS256")
    with pytest.raises(InvalidToken):
        issuer().verify(wrong_iss, WALL)
    for name in base:
        claims = {k: v for k, v in base.items() if k != name}
        token = jwt.encode(claims, SECRET, algorithm="HS256")
        with pytest.raises(InvalidToken):
            issuer().verify(token, WALL)


def test_claim_types_checked() -> None:
    base = {"sub": "c", "tenant_id": "t", "iat": WALL, "exp": WALL + 60, "iss": "svantic-mesh"}
    for name, value in (("tenant_id", 5), ("tenant_id", ""), ("exp", True), ("iat", "x")):
        token = jwt.encode({**base, name: value}, SECRET, algorithm="HS256")
        with pytest.raises(InvalidToken):
            issuer().verify(token, WALL)


def test_secret_length_and_repr() -> None:
    with pytest.raises(ValueError):
        TokenIssuer(b"short")
    with pytest.raises(ValueError):
        TokenIssuer(b"s" * 32, ttl=0)
    assert "sss" not in repr(issuer())

"""Transport JWTs: what `POST /auth/token` hands an API client and what every other control
plane call and `GET /agents/connect` check (spec 1, spec 6).

HS256 with the mesh's own secret, because the mesh is both issuer and only verifier; an
asymmetric key would buy nothing here. The issuer reads no clock: `wall` (epoch seconds)
comes in as an argument, so tests pin time and the serving code owns the clock. PyJWT's own
time checks read the system clock, so they are switched off and `exp` / `iat` are checked
here against `wall`.
"""

from __future__ import annotations

import math
from typing import Any, Final

import jwt

__all__ = ["ALGORITHM", "InvalidToken", "TokenIssuer"]

ALGORITHM: Final = "HS256"
"""The only algorithm accepted: pinned so a token cannot pick `none` or another scheme."""

_REQUIRED: Final = ("sub", "tenant_id", "iat", "exp", "iss")
_MIN_SECRET_BYTES: Final = 32
_MAX_TOKEN_CHARS: Final = 8192
_CACHED_TOKENS: Final = 4096


class InvalidToken(Exception):
    """The token is missing a claim, malformed, forged, expired or not yet valid.

    One class on purpose: the caller answers every case with the same 401, and a client
    must not learn which check failed.
    """


def _is_number(value: Any) -> bool:
    # bool is an int subclass; `"exp": true` is not a time.
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


class TokenIssuer:
    """Issues and verifies the mesh's transport JWTs (claims `sub`, `tenant_id`, `iat`,
    `exp`, `iss`, spec 1)."""

    __slots__ = ("_issuer", "_leeway", "_secret", "_ttl", "_verified")

    def __init__(
        self,
        secret: bytes,
        *,
        issuer: str = "svantic-mesh",
        ttl: float = 3600.0,
        leeway: float = 5.0,
    ) -> None:
        if not isinstance(secret, bytes) or len(secret) < _MIN_SECRET_BYTES:
            # RFC 7518 3.2: an HS256 key shorter than the hash output weakens it.
            raise ValueError("the token secret must be at least 32 bytes")
        if not issuer:
            raise ValueError("issuer must not be empty")
        if not (math.isfinite(ttl) and ttl >= 1):
            raise ValueError("ttl must be at least one second")
        if not (math.isfinite(leeway) and 0 <= leeway <= 300):
            raise ValueError("leeway must be between 0 and 300 seconds")
        self._secret = secret
        self._issuer = issuer
        self._ttl = ttl
        self._leeway = leeway
        # Tokens whose signature and claims checked out, by their text: every control-plane
        # call and every upgrade of one client repeats the same token, and the HMAC and
        # JSON decoding are most of a call's cost. Bounded; the times are checked each use.
        self._verified: dict[str, tuple[dict[str, Any], float, float]] = {}

    def __repr__(self) -> str:
        # Never the secret.
        return f"TokenIssuer(issuer={self._issuer!r}, ttl={self._ttl}, leeway={self._leeway})"

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def ttl(self) -> float:
        return self._ttl

    def issue(self, client_id: str, tenant_id: str, wall: float) -> tuple[str, int]:
        """A token for `client_id` acting for `tenant_id`, and its lifetime in whole seconds
        (the `expires_in` of the `/auth/token` answer)."""
        if not client_id or not tenant_id:
            raise ValueError("client_id and tenant_id must not be empty")
        iat = math.floor(wall)
        expires_in = max(1, math.floor(self._ttl))
        claims = {
            "sub": client_id,
            "tenant_id": tenant_id,
            "iat": iat,
            "exp": iat + expires_in,
            "iss": self._issuer,
        }
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        return token, expires_in

    def verify(self, token: str, wall: float) -> dict[str, Any]:
        """The claims of a valid token; raises `InvalidToken` for anything else.

        Checks: HS256 only, the signature, `iss`, the five required claims with their
        types, a lifetime (`exp - iat`) no longer than this issuer's `ttl` plus `leeway`,
        `iat` not in the future and `exp` not past, both with `leeway`.
        """
        if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_CHARS:
            raise InvalidToken("malformed token")
        cached = self._verified.get(token)
        if cached is not None:
            self._check_times(cached[1], cached[2], wall)
            return dict(cached[0])
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": True,
                    "require": list(_REQUIRED),
                },
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken("token rejected") from exc
        except (ValueError, TypeError) as exc:  # defensive: a decoder edge case
            raise InvalidToken("malformed token") from exc
        for name in ("sub", "tenant_id"):
            value = claims.get(name)
            if not isinstance(value, str) or not value:
                raise InvalidToken(f"claim {name} is not a non-empty string")
        iat: Any = claims.get("iat")
        exp: Any = claims.get("exp")
        if not _is_number(iat) or not _is_number(exp):
            raise InvalidToken("iat and exp must be numbers")
        if exp - iat > self._ttl + self._leeway:
            # Only a holder of the secret could sign it, but this issuer never grants that
            # long: a token that outlives every one it mints is refused, not trusted forever.
            raise InvalidToken("token lifetime exceeds the issuer's")
        self._check_times(iat, exp, wall)
        if len(self._verified) >= _CACHED_TOKENS:
            self._verified.clear()
        self._verified[token] = (dict(claims), iat, exp)
        return dict(claims)

    def _check_times(self, iat: float, exp: float, wall: float) -> None:
        if iat > wall + self._leeway:
            raise InvalidToken("token issued in the future")
        if exp <= wall - self._leeway:
            raise InvalidToken("token expired")

"""Dispatch auth: the per-dispatch envelope the mesh mints and the agent verifies (spec section 7).

Three envelope types arrive in `dispatch.payload.dispatch_auth` (spec section 3):

* `{"type": "svantic_jwt", "token": jwt}`: HS256 with the mesh's signing secret, or (our
  option for meshes that share no secret with agents) ES256 / EdDSA checked against the
  mesh's JWKS. Claims: `iss="svantic"`, `aud`=instance id, `sub`=agent type, `tenant_id`,
  `jti`=dispatch id, `cap`=capability, `iat`, `exp` (default `iat` + 60 s).
* `{"type": "shared_secret", "secret": str}`: compared in constant time with the agent's copy.
* `{"type": "mtls"}`: reserved, always refused.

The module is pure: wall time comes in as `now` (seconds since the epoch), the environment
comes in as a mapping, and PyJWT / cryptography (which import `ssl` and `socket`) are
imported only inside the asymmetric functions. The HS256 path is hand-written (`_jws`)
because it runs once per dispatch; it is strict where RFC 7515 / 7519 leave room:

* alg must be exactly `HS256` (or the JWKS key's own alg), `typ` if present exactly `JWT`,
  no `crit` and no `b64` header, `kid` a string;
* exactly three segments, none empty, base64url without padding and in canonical form;
* header and claims are UTF-8 JSON objects; a member name repeated in any object is
  refused (some parsers keep the first, some the last: with a repeated `aud` they would
  disagree on whom the token is for);
* `iat`, `exp` (and `nbf` if a foreign minter set it) are JSON integers (not bool, float
  or string); `iss`, `aud`, `sub`, `tenant_id`, `jti`, `cap` are strings; `aud` is one
  string, never a list.

Fail closed: every failure raises `DispatchAuthError` (code `DISPATCH_AUTH_FAILED`), whose
`reason` says which check failed; the agent answers `error`/`DISPATCH_AUTH_FAILED` and does
not run the handler.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, NoReturn

import msgspec
from msgspec import UNSET, UnsetType

from ._jws import HS256Signer, b64url_decode, b64url_encode, has_duplicate_keys, hs256_payload
from .errors import DispatchAuthError, LocalProtocolError  # the former re-exported here
from .frames import SvanticJwtAuth

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from jwt.algorithms import Algorithm

__all__ = [
    "DISPATCH_AUTH_ENABLED_ENV",
    "DEFAULT_TOKEN_LIFETIME",
    "MAX_LEEWAY",
    "SVANTIC_ISSUER",
    "AsymmetricAlgorithm",
    "AsymmetricDispatchAuthMinter",
    "DispatchAuthError",
    "DispatchAuthFailure",
    "DispatchAuthMinter",
    "DispatchAuthVerifier",
    "DispatchClaims",
    "HS256Key",
    "dispatch_auth_enabled",
    "shared_secret_envelope",
    "verify_shared_secret",
]

SVANTIC_ISSUER: Final = "svantic"
DEFAULT_TOKEN_LIFETIME: Final = 60
MAX_LEEWAY: Final = 5.0
DISPATCH_AUTH_ENABLED_ENV: Final = "SVANTIC_DISPATCH_AUTH_ENABLED"

AsymmetricAlgorithm = Literal["ES256", "EdDSA"]


class DispatchAuthFailure(StrEnum):
    """Why a dispatch-auth envelope was refused: machine-readable, stable across releases."""

    MISSING = "missing"
    """Dispatch auth is enabled but the dispatch carries no envelope."""
    DISABLED_MISMATCH = "disabled_mismatch"
    """Dispatch auth is disabled here but the mesh sent an envelope: the flags disagree."""
    MALFORMED_ENVELOPE = "malformed_envelope"
    """Unknown `type`, or `token` / `secret` missing or not a string (spec section 3)."""
    UNSUPPORTED_TYPE = "unsupported_type"
    """`mtls`: reserved by the spec, never accepted."""
    UNEXPECTED_TYPE = "unexpected_type"
    """A known type this agent holds no credential for (e.g. a JWT at a shared-secret agent)."""
    MALFORMED = "malformed"
    """Not three non-empty canonical base64url segments of UTF-8 JSON objects."""
    BAD_HEADER = "bad_header"
    """`typ` other than `JWT`, a `crit` or `b64` parameter, or a non-string `kid`."""
    BAD_ALGORITHM = "bad_algorithm"
    """`alg` is not one this verifier pins (`none`, `HS512`, or not the key's alg)."""
    UNKNOWN_KEY = "unknown_key"
    """The header's `kid` names no configured key."""
    BAD_SIGNATURE = "bad_signature"
    """The signature does not verify with any candidate key."""
    MISSING_CLAIM = "missing_claim"
    BAD_CLAIM_TYPE = "bad_claim_type"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    WRONG_JTI = "wrong_jti"
    """`jti` is not this dispatch's id: a token replayed onto another dispatch."""
    WRONG_CAPABILITY = "wrong_capability"
    EXPIRED = "expired"
    ISSUED_IN_FUTURE = "issued_in_future"
    NOT_YET_VALID = "not_yet_valid"
    """A foreign minter's `nbf` is still in the future."""
    SECRET_MISMATCH = "secret_mismatch"


class DispatchClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The claims of a `svantic_jwt` (spec section 7), in the order the mesh writes them.

    Decoding into this Struct is the claim type check: integers must be JSON integers and
    strings JSON strings. `nbf` is never minted here; it is honoured when a foreign
    minter sets it.
    """

    iss: str
    aud: str
    sub: str
    tenant_id: str
    jti: str
    cap: str
    iat: int
    exp: int
    nbf: int | UnsetType = UNSET


_MAX_TOKEN_CHARS: Final = 8192
"""A minted token is a few hundred characters; a longer one is refused before any work."""

_CLAIMS_DECODER: Final = msgspec.json.Decoder(DispatchClaims)
_JSON_DECODER: Final = msgspec.json.Decoder()
_JSON_ENCODER: Final = msgspec.json.Encoder()
# A mesh sends the same few headers (alg, typ, kid) on every dispatch: parse each once.
# Bounded in count and size, so a flood of odd headers cannot grow memory.
_HEADER_CACHE_LIMIT: Final = 64
_HEADER_CACHE_MAX_SEGMENT: Final = 256


def _fail(reason: DispatchAuthFailure, message: str) -> DispatchAuthError:
    return DispatchAuthError(reason, message)


def _check_wall_time(now: float) -> None:
    """A NaN `now` would make every time comparison false, so every token "unexpired"."""
    if type(now) not in (int, float) or not math.isfinite(now):
        raise LocalProtocolError(f"now must be a finite wall time in seconds, not {now!r}")


def _check_text(name: str, value: object) -> None:
    if type(value) is not str or not value:
        raise LocalProtocolError(f"{name} must be a non-empty string, not {value!r}")


def _check_agent_names(instance_id: str, agent_type: str, tenant_id: str) -> None:
    """The three names every agent's tokens carry (each checked once per mint or bind)."""
    _check_text("instance_id", instance_id)
    _check_text("agent_type", agent_type)
    _check_text("tenant_id", tenant_id)


def _check_lifetime(lifetime: int) -> None:
    if type(lifetime) is not int or lifetime <= 0:
        raise LocalProtocolError(f"lifetime must be a positive int of seconds, not {lifetime!r}")


def _secret_bytes(secret: str | bytes, what: str) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes) or not secret:
        raise LocalProtocolError(f"{what} must be a non-empty str or bytes")
    return secret


# --------------------------------------------------------------------------- parsing


class _Header(NamedTuple):
    alg: str
    kid: str | None


def _decode_json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = _JSON_DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise _fail(DispatchAuthFailure.MALFORMED, f"token {what} is not UTF-8 JSON") from None
    if type(value) is not dict:
        raise _fail(DispatchAuthFailure.MALFORMED, f"token {what} is not a JSON object")
    if _JSON_ENCODER.encode(value) != raw and has_duplicate_keys(raw):
        raise _fail(DispatchAuthFailure.MALFORMED, f"token {what} repeats a JSON member name")
    return value


def _parse_header(segment: bytes) -> _Header:
    """RFC 7515 section 4.1, with the strictness listed in the module docstring."""
    try:
        raw = b64url_decode(segment)
    except ValueError as exc:
        raise _fail(DispatchAuthFailure.MALFORMED, f"token header: {exc}") from None
    header = _decode_json_object(raw, "header")
    alg = header.get("alg")
    if type(alg) is not str:
        raise _fail(DispatchAuthFailure.BAD_ALGORITHM, "token header has no string alg")
    if "crit" in header or "b64" in header:
        raise _fail(
            DispatchAuthFailure.BAD_HEADER,
            "token header uses crit/b64 extensions, which dispatch tokens never need",
        )
    if "typ" in header and header["typ"] != "JWT":
        raise _fail(DispatchAuthFailure.BAD_HEADER, "token header typ is not JWT")
    kid = header.get("kid")
    if kid is not None and type(kid) is not str:
        raise _fail(DispatchAuthFailure.BAD_HEADER, "token header kid is not a string")
    if "kid" in header and kid is None:
        raise _fail(DispatchAuthFailure.BAD_HEADER, "token header kid is null")
    return _Header(alg, kid)


def _decode_claims(segment: bytes) -> DispatchClaims:
    """Claims as typed values: one strict base64url decode and one msgspec Struct decode."""
    try:
        raw = b64url_decode(segment)
    except ValueError as exc:
        raise _fail(DispatchAuthFailure.MALFORMED, f"token claims: {exc}") from None
    claims = _decode_claims_json(raw)
    if _JSON_ENCODER.encode(claims) != raw:
        _decode_json_object(raw, "claims")
    return claims


def _decode_claims_json(raw: bytes) -> DispatchClaims:
    """The claims JSON decoded into `DispatchClaims`, which is the claim type check.

    The caller then holds the whole object to the header's standard, cheaply when it
    can: claims that re-encode to the very bytes they came from hold only the Struct's
    fields, each once and each type-checked. Otherwise (another encoder's spacing or
    escapes, or extra claims, which msgspec skips without checking their UTF-8) it
    decodes the whole object untyped and looks for repeated names. The signature was
    checked first, so only a key holder can make a verifier take that slower way.
    """
    try:
        return _CLAIMS_DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        if raw.lstrip(b" \t\r\n")[:1] != b"{":
            message = "token claims are not a JSON object"
            raise _fail(DispatchAuthFailure.MALFORMED, message) from None
        detail = str(exc)
        if detail.startswith("Object missing required field"):
            raise _fail(DispatchAuthFailure.MISSING_CLAIM, f"token claims: {detail}") from None
        raise _fail(DispatchAuthFailure.BAD_CLAIM_TYPE, f"token claims: {detail}") from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise _fail(DispatchAuthFailure.MALFORMED, "token claims are not UTF-8 JSON") from None


# --------------------------------------------------------------------------- minting


@dataclass(frozen=True, slots=True)
class HS256Key:
    """One HS256 verification secret, optionally named by `kid` for rotation (spec section 7).

    A token whose header has a `kid` is checked with the key of that `kid` only; one
    without is tried against every key, so the previous secret keeps working while the
    mesh rolls to the current one.
    """

    secret: str | bytes
    kid: str | None = None

    def __post_init__(self) -> None:
        _secret_bytes(self.secret, "HS256Key.secret")
        if self.kid is not None:
            _check_text("HS256Key.kid", self.kid)


def _encode_header(alg: str, kid: str | None) -> bytes:
    header: dict[str, str] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return b64url_encode(_JSON_ENCODER.encode(header))


class _ClaimsHead(msgspec.Struct, gc=False):
    """The claims fixed per (instance, agent type, tenant): the start of every token's JSON."""

    iss: str
    aud: str
    sub: str
    tenant_id: str


class _ClaimsTail(msgspec.Struct, gc=False):
    """The claims that change per dispatch, in `DispatchClaims` order after the head."""

    jti: str
    cap: str
    iat: int
    exp: int


class _AgentTokens:
    """Mints the tokens of one (instance, agent type, tenant): what `token_minter` returns.

    Base64 maps 3 bytes to 4 characters, so the claims head, cut at a multiple of 3,
    is encoded once, into the signer's prefix (after the header segment and its dot);
    `compact(rest)` encodes the 0-2 bytes left over (`carry`) and the tail, signs, and
    joins the token.
    """

    __slots__ = ("_carry", "_compact", "_lifetime")

    def __init__(self, carry: bytes, compact: Callable[[bytes], str], lifetime: int) -> None:
        self._carry = carry
        self._compact = compact
        self._lifetime = lifetime

    def mint(self, dispatch_id: str, capability: str, now: float) -> str:
        """One dispatch's token: `jti`, `cap`, `iat` = floor(now), `exp` (spec section 7)."""
        if type(now) not in (int, float) or not math.isfinite(now):
            _check_wall_time(now)
        if type(dispatch_id) is not str or not dispatch_id:
            _check_text("dispatch_id", dispatch_id)
        if type(capability) is not str or not capability:
            _check_text("capability", capability)
        issued_at = math.floor(now)
        tail = _JSON_ENCODER.encode(
            _ClaimsTail(dispatch_id, capability, issued_at, issued_at + self._lifetime)
        )
        # `tail[1:]` drops the tail's own `{`: the head ends where its members begin.
        return self._compact(self._carry + tail[1:])


# `mint_token` keeps one `_AgentTokens` per agent it mints for, bounded so that churn
# through many instance ids cannot grow memory; the oldest is dropped first.
_AGENT_CACHE_LIMIT: Final = 1024


class _ClaimsMinter:
    """Shared claim building for both minters: the claims are the same whatever signs them.

    Per token only `jti`, `cap`, `iat` and `exp` change (spec section 7). Everything else
    (the header segment, the head of the claims JSON and its base64, and for HS256 the
    keyed hash state over them) is computed once per agent, so a mint encodes a
    four-field Struct, base64-encodes about 120 bytes and hashes only those. The bytes
    are exactly those of encoding the whole `DispatchClaims` (the spec's vector checks it).
    """

    _header_prefix: bytes  # the encoded header and its dot, fixed per minter

    def __init__(self, *, lifetime: int, issuer: str) -> None:
        _check_lifetime(lifetime)
        _check_text("issuer", issuer)
        self._lifetime = lifetime
        self._issuer = issuer
        self._agents: dict[tuple[str, str, str], _AgentTokens] = {}

    def token_minter(
        self, *, instance_id: str, agent_type: str, tenant_id: str
    ) -> Callable[[str, str, float], str]:
        """`mint(dispatch_id, capability, now) -> token` for one agent's dispatches.

        The same tokens as `mint_token`, with the per-agent work done here once: a mesh
        connection binds one when it sends its first dispatch.
        """
        _check_agent_names(instance_id, agent_type, tenant_id)
        return self._agent_tokens(instance_id, agent_type, tenant_id).mint

    def _agent_tokens(self, instance_id: str, agent_type: str, tenant_id: str) -> _AgentTokens:
        """One agent's token state, from names the caller has checked."""
        head = _JSON_ENCODER.encode(_ClaimsHead(self._issuer, instance_id, agent_type, tenant_id))
        head = head[:-1] + b","  # the tail's members follow: `{"iss":...,"tenant_id":"t",`
        cut = len(head) - len(head) % 3
        signed_head = self._header_prefix + b64url_encode(head[:cut])
        return _AgentTokens(head[cut:], self._compact_for(signed_head), self._lifetime)

    def mint_token(
        self,
        *,
        instance_id: str,
        agent_type: str,
        tenant_id: str,
        dispatch_id: str,
        capability: str,
        now: float,
    ) -> str:
        """The compact JWT alone; `now` is the mesh's wall time in seconds."""
        _check_wall_time(now)
        _check_agent_names(instance_id, agent_type, tenant_id)
        agents = self._agents
        key = (instance_id, agent_type, tenant_id)
        tokens = agents.get(key)
        if tokens is None:
            tokens = self._agent_tokens(instance_id, agent_type, tenant_id)
            if len(agents) >= _AGENT_CACHE_LIMIT:
                del agents[next(iter(agents))]
            agents[key] = tokens
        return tokens.mint(dispatch_id, capability, now)

    def _compact_for(self, signed_head: bytes) -> Callable[[bytes], str]:
        """`compact(rest)`: the token whose signing input is `signed_head` followed by
        `b64url(rest)`. Each key type signs its own way; this is all a minter class adds.
        """
        raise NotImplementedError

    def mint(
        self,
        *,
        instance_id: str,
        agent_type: str,
        tenant_id: str,
        dispatch_id: str,
        capability: str,
        now: float,
    ) -> dict[str, str]:
        """The `dispatch_auth` envelope to put in the dispatch payload (spec section 3)."""
        token = self.mint_token(
            instance_id=instance_id,
            agent_type=agent_type,
            tenant_id=tenant_id,
            dispatch_id=dispatch_id,
            capability=capability,
            now=now,
        )
        return {"type": "svantic_jwt", "token": token}


class DispatchAuthMinter(_ClaimsMinter):
    """Mesh side of `svantic_jwt` with HS256 and the mesh's `SIGNING_SECRET` (spec section 7).

    `iat` is `now` rounded down, `exp` is `iat + lifetime`. Pass `kid` when agents hold
    several keys, so they check only the one named.
    """

    def __init__(
        self,
        secret: str | bytes,
        *,
        kid: str | None = None,
        lifetime: int = DEFAULT_TOKEN_LIFETIME,
        issuer: str = SVANTIC_ISSUER,
    ) -> None:
        super().__init__(lifetime=lifetime, issuer=issuer)
        if kid is not None:
            _check_text("kid", kid)
        self._signer = HS256Signer(_secret_bytes(secret, "secret"))
        self._header_prefix = _encode_header("HS256", kid) + b"."

    def _compact_for(self, signed_head: bytes) -> Callable[[bytes], str]:
        """HMAC state with the fixed start already hashed in: per token, only the rest."""
        return self._signer.with_prefix(signed_head).compact


def shared_secret_envelope(secret: str) -> dict[str, str]:
    """Mesh side of `shared_secret`: the agent's registered secret, resolved at dispatch time."""
    _check_text("secret", secret)
    return {"type": "shared_secret", "secret": secret}


def _load_private_key(
    private_key: str | bytes | EllipticCurvePrivateKey | Ed25519PrivateKey,
    algorithm: AsymmetricAlgorithm | None,
) -> tuple[AsymmetricAlgorithm, EllipticCurvePrivateKey | Ed25519PrivateKey]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: PLC0415
    from cryptography.hazmat.primitives.serialization import (  # noqa: PLC0415
        load_pem_private_key,
    )

    key: object = private_key
    if isinstance(key, str):
        key = key.encode("utf-8")
    if isinstance(key, bytes):
        try:
            key = load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise LocalProtocolError(f"private_key is not an unencrypted PEM key: {exc}") from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        found: AsymmetricAlgorithm = "ES256"
        loaded: EllipticCurvePrivateKey | Ed25519PrivateKey = key
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        found = "EdDSA"
        loaded = key
    else:
        raise LocalProtocolError(
            "private_key must be an EC P-256 key (ES256) or an Ed25519 key (EdDSA)"
        )
    if algorithm is not None and algorithm != found:
        raise LocalProtocolError(f"algorithm {algorithm!r} does not fit a {found} key")
    return found, loaded


def _algorithm(name: AsymmetricAlgorithm) -> Algorithm:
    from jwt.algorithms import get_default_algorithms  # noqa: PLC0415

    return get_default_algorithms()[name]


class AsymmetricDispatchAuthMinter(_ClaimsMinter):
    """Mesh side of `svantic_jwt` signed with ES256 or EdDSA (our option, spec section 7).

    For meshes that share no secret with agents: the mesh keeps the private key and
    publishes `jwks()` at `GET /.well-known/jwks.json` (spec section 6); agents verify
    with `DispatchAuthVerifier(jwks=...)`. To rotate, publish the union of the old and new
    minters' `public_jwk()` under `{"keys": [...]}` until old tokens have expired.
    PyJWT and cryptography are imported here, never at module import.
    """

    def __init__(
        self,
        private_key: str | bytes | EllipticCurvePrivateKey | Ed25519PrivateKey,
        *,
        kid: str,
        algorithm: AsymmetricAlgorithm | None = None,
        lifetime: int = DEFAULT_TOKEN_LIFETIME,
        issuer: str = SVANTIC_ISSUER,
    ) -> None:
        super().__init__(lifetime=lifetime, issuer=issuer)
        _check_text("kid", kid)
        self.algorithm, self._private_key = _load_private_key(private_key, algorithm)
        self.kid = kid
        self._signer = _algorithm(self.algorithm)
        self._header_prefix = _encode_header(self.algorithm, kid) + b"."

    def public_jwk(self) -> dict[str, Any]:
        """This key's public half as a JWK with `kid`, `alg` and `use="sig"` (RFC 7517)."""
        jwk: dict[str, Any] = dict(
            self._signer.to_jwk(self._private_key.public_key(), as_dict=True)
        )
        jwk.update(kid=self.kid, alg=self.algorithm, use="sig")
        return jwk

    def jwks(self) -> dict[str, Any]:
        """The JWKS document for `GET /.well-known/jwks.json` (spec section 6)."""
        return {"keys": [self.public_jwk()]}

    def _compact_for(self, signed_head: bytes) -> Callable[[bytes], str]:
        def compact(rest: bytes) -> str:
            signing_input = signed_head + b64url_encode(rest)
            signature = b64url_encode(self._signer.sign(signing_input, self._private_key))
            return (signing_input + b"." + signature).decode("ascii")

        return compact


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True, slots=True)
class _PublicKey:
    kid: str | None
    alg: str
    algorithm: Algorithm
    key: Any

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        return bool(self.algorithm.verify(signing_input, self.key, signature))


def _load_jwks(jwks: Mapping[str, Any]) -> list[_PublicKey]:
    """Keep the ES256 (P-256) and EdDSA (Ed25519) signature keys of a JWKS (RFC 7517).

    Other keys (RSA, other curves, `use` other than `sig`, symmetric `oct`) are skipped:
    the mesh may publish keys for other purposes. Each kept key's `alg` is pinned to what
    its type and curve allow, so a token cannot pick a weaker algorithm for it.
    """
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list):
        raise LocalProtocolError('jwks must be a JWKS document: {"keys": [...]}')
    import jwt  # noqa: PLC0415  (PyJWT imports ssl and socket: only when JWKS is used)

    keys: list[_PublicKey] = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            raise LocalProtocolError("every JWKS entry must be a JSON object")
        if entry.get("use", "sig") != "sig":
            continue
        kty, crv = entry.get("kty"), entry.get("crv")
        if kty == "EC" and crv == "P-256":
            alg = "ES256"
        elif kty == "OKP" and crv == "Ed25519":
            alg = "EdDSA"
        else:
            continue
        if entry.get("alg", alg) != alg:
            continue
        if "d" in entry:
            raise LocalProtocolError("a JWKS entry carries private key material ('d')")
        kid = entry.get("kid")
        if kid is not None and (type(kid) is not str or not kid):
            raise LocalProtocolError(f"JWKS kid must be a non-empty string, not {kid!r}")
        try:
            pyjwk = jwt.PyJWK(dict(entry), algorithm=alg)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise LocalProtocolError(f"JWKS key {kid!r} does not load: {exc}") from None
        keys.append(_PublicKey(kid, alg, pyjwk.Algorithm, pyjwk.key))
    if not keys:
        raise LocalProtocolError("jwks holds no ES256 (EC P-256) or EdDSA (Ed25519) signature key")
    return keys


def verify_shared_secret(presented: str, local: str) -> None:
    """Compare a presented `shared_secret` with the agent's copy in constant time (spec 7).

    `hmac.compare_digest` on the UTF-8 bytes: the time does not depend on where they
    differ (only on the length, which is not the secret).
    """
    try:
        presented_bytes = presented.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a lax JSON parser
        presented_bytes = b""
    if not hmac.compare_digest(presented_bytes, local.encode("utf-8")) or not local:
        raise _fail(DispatchAuthFailure.SECRET_MISMATCH, "shared secret does not match")


def _read_field(envelope: object, name: str) -> object:
    """Read `type` / `token` / `secret` from a dict or from a decoded Struct alike."""
    if type(envelope) is dict or isinstance(envelope, Mapping):
        return envelope.get(name)
    return getattr(envelope, name, None)


class DispatchAuthVerifier:
    """Agent side of dispatch auth (spec section 7), one per agent instance.

    Configure the credentials the agent accepts: `hs256_keys` (the mesh's signing
    secret, and during rotation the previous one: `HS256Key` or a bare secret), `jwks`
    (a JWKS document for ES256 / EdDSA tokens), and/or `shared_secret`. `enabled` is
    `dispatch_auth_enabled(os.environ)` on the agent: both sides must agree, and a
    disagreement fails closed either way (`missing` or `disabled_mismatch`).

    `leeway` (at most 5 s, default 5) absorbs clock skew between mesh and agent for
    `exp`, `iat` and `nbf`, with PyJWT's boundaries: expired once
    `exp <= now - leeway`, too early while `iat > now + leeway`.
    """

    def __init__(
        self,
        instance_id: str,
        *,
        hs256_keys: Iterable[HS256Key | str | bytes] = (),
        jwks: Mapping[str, Any] | None = None,
        shared_secret: str | None = None,
        enabled: bool = True,
        leeway: float = MAX_LEEWAY,
        issuer: str = SVANTIC_ISSUER,
    ) -> None:
        _check_text("instance_id", instance_id)
        _check_text("issuer", issuer)
        if type(leeway) not in (int, float) or not 0 <= leeway <= MAX_LEEWAY:
            raise LocalProtocolError(f"leeway must be between 0 and {MAX_LEEWAY} s")
        if shared_secret is not None:
            _check_text("shared_secret", shared_secret)
        self.instance_id = instance_id
        self.enabled = bool(enabled)
        self._issuer = issuer
        self._leeway = float(leeway)
        self._shared_secret = shared_secret

        self._hs256_signers: list[HS256Signer] = []
        self._hs256_by_kid: dict[str, HS256Signer] = {}
        for item in hs256_keys:
            key = item if isinstance(item, HS256Key) else HS256Key(item)
            signer = HS256Signer(_secret_bytes(key.secret, "HS256 secret"))
            self._hs256_signers.append(signer)
            if key.kid is not None:
                if key.kid in self._hs256_by_kid:
                    raise LocalProtocolError(f"two HS256 keys share kid {key.kid!r}")
                self._hs256_by_kid[key.kid] = signer

        self._public_keys = _load_jwks(jwks) if jwks is not None else []
        self._public_by_kid: dict[str, _PublicKey] = {}
        for public_key in self._public_keys:
            if public_key.kid is None:
                continue
            if public_key.kid in self._public_by_kid or public_key.kid in self._hs256_by_kid:
                raise LocalProtocolError(f"two keys share kid {public_key.kid!r}")
            self._public_by_kid[public_key.kid] = public_key
        self._algorithms = frozenset(
            (["HS256"] if self._hs256_signers else []) + [k.alg for k in self._public_keys]
        )
        if self.enabled and not self._algorithms and shared_secret is None:
            raise LocalProtocolError(
                "dispatch auth is enabled but no hs256_keys, jwks or shared_secret is set"
            )
        self._header_cache: dict[bytes, _Header] = {}
        # Header segment -> its HS256 candidate keys, each with `header.` hashed in already.
        self._hs256_by_header: dict[bytes, tuple[HS256Signer, ...]] = {}

    def verify(
        self,
        dispatch_auth: object,
        *,
        dispatch_id: str,
        capability: str,
        now: float,
    ) -> None:
        """Check one dispatch's `dispatch_auth`, raising `DispatchAuthError` if it fails.

        `dispatch_auth` is the payload field as decoded: `None` (or `msgspec.UNSET`) when
        absent, a dict, or any object with `type` / `token` / `secret` attributes.
        `now` is the agent's wall time (seconds since the epoch).
        """
        if type(dispatch_auth) is SvanticJwtAuth and self.enabled and self._algorithms:
            # What every dispatch from a JWT-minting mesh takes: the decoded frame's Struct
            # carries a str token by construction, so only the time is left to check here.
            if type(now) not in (int, float) or not math.isfinite(now):
                _check_wall_time(now)
            self._verify_token(dispatch_auth.token, dispatch_id, capability, now)
            return
        if dispatch_auth is None or dispatch_auth is UNSET:
            if self.enabled:
                raise _fail(
                    DispatchAuthFailure.MISSING,
                    "dispatch carries no dispatch_auth but dispatch auth is enabled here: "
                    f"set {DISPATCH_AUTH_ENABLED_ENV} alike on mesh and agent",
                )
            return
        if not self.enabled:
            raise _fail(
                DispatchAuthFailure.DISABLED_MISMATCH,
                "dispatch carries dispatch_auth but dispatch auth is disabled here: "
                f"set {DISPATCH_AUTH_ENABLED_ENV} alike on mesh and agent",
            )
        _check_wall_time(now)
        auth_type = _read_field(dispatch_auth, "type")
        if auth_type == "svantic_jwt":
            token = _read_field(dispatch_auth, "token")
            if type(token) is not str:
                raise _fail(
                    DispatchAuthFailure.MALFORMED_ENVELOPE, "svantic_jwt token is not a string"
                )
            if not self._algorithms:
                raise _fail(
                    DispatchAuthFailure.UNEXPECTED_TYPE,
                    "got a svantic_jwt but this agent holds no signing key",
                )
            self._verify_token(token, dispatch_id, capability, now)
        elif auth_type == "shared_secret":
            secret = _read_field(dispatch_auth, "secret")
            if type(secret) is not str:
                raise _fail(
                    DispatchAuthFailure.MALFORMED_ENVELOPE, "shared_secret secret is not a string"
                )
            if self._shared_secret is None:
                raise _fail(
                    DispatchAuthFailure.UNEXPECTED_TYPE,
                    "got a shared_secret but this agent holds no shared secret",
                )
            verify_shared_secret(secret, self._shared_secret)
        elif auth_type == "mtls":
            raise _fail(DispatchAuthFailure.UNSUPPORTED_TYPE, "mtls dispatch auth is reserved")
        else:
            raise _fail(
                DispatchAuthFailure.MALFORMED_ENVELOPE,
                f"dispatch_auth type {auth_type!r} is not svantic_jwt, shared_secret or mtls",
            )

    def verify_token(
        self, token: str, *, dispatch_id: str, capability: str, now: float
    ) -> DispatchClaims:
        """Check one `svantic_jwt` and return its claims (for `tenant_id` and `sub`)."""
        _check_wall_time(now)
        return self._verify_token(token, dispatch_id, capability, now)

    def _verify_token(
        self, token: str, dispatch_id: str, capability: str, now: float
    ) -> DispatchClaims:
        """Check a `svantic_jwt` token; `now` is known to be a finite wall time.

        Fast path, for a header seen before that named HS256 keys: one HMAC of the
        claims segment, one strict base64url decode (`hs256_payload`), one Struct decode
        and one re-encode to prove the JSON canonical, and the claim checks at once. Any
        miss takes `_verify_segments`, every check in order, so a refusal always carries
        the reason the first failing check gives.
        """
        if type(token) is str and len(token) > _MAX_TOKEN_CHARS:
            raise _fail(DispatchAuthFailure.MALFORMED,
                        f"token is longer than {_MAX_TOKEN_CHARS} characters")
        try:
            header_segment, claims_segment, signature_segment = token.encode("ascii").split(b".")
        except (UnicodeEncodeError, AttributeError):
            raise _fail(DispatchAuthFailure.MALFORMED, "token is not an ASCII string") from None
        except ValueError:  # not three values to unpack
            raise _fail(
                DispatchAuthFailure.MALFORMED, "token does not have three segments"
            ) from None
        signers = self._hs256_by_header.get(header_segment)
        raw = None
        if signers is not None and claims_segment:
            raw = hs256_payload(signers, claims_segment, signature_segment)
        if raw is None:  # not a known HS256 header, or something is wrong: find out what
            return self._verify_segments(
                header_segment, claims_segment, signature_segment,
                dispatch_id=dispatch_id, capability=capability, now=now,
            )
        try:
            claims = _CLAIMS_DECODER.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            claims = _decode_claims_json(raw)  # raises with the precise reason
        if _JSON_ENCODER.encode(claims) != raw:  # see `_decode_claims_json`
            _decode_json_object(raw, "claims")
        leeway = self._leeway
        if (  # every check of `_check_claims` at once; it says which one failed
            claims.jti != dispatch_id
            or claims.cap != capability
            or claims.aud != self.instance_id
            or claims.iss != self._issuer
            or claims.exp <= now - leeway
            or claims.iat > now + leeway
            or claims.nbf is not UNSET
        ):
            self._check_claims(claims, dispatch_id, capability, now)
        return claims

    def _verify_segments(
        self,
        header_segment: bytes,
        claims_segment: bytes,
        signature_segment: bytes,
        *,
        dispatch_id: str,
        capability: str,
        now: float,
    ) -> DispatchClaims:
        """Every check in order, each failure with its reason (spec section 7).

        The path of a token whose header this verifier has not cached (its first, a
        `kid` it names, or any other algorithm), and of one that failed the fast path.
        """
        if not header_segment or not claims_segment:
            raise _fail(DispatchAuthFailure.MALFORMED, "token has an empty segment")
        self._check_signature(header_segment, claims_segment, signature_segment)
        claims = _decode_claims(claims_segment)
        self._check_claims(claims, dispatch_id, capability, now)
        return claims

    def _check_signature(
        self, header_segment: bytes, claims_segment: bytes, signature: bytes
    ) -> None:
        """Parse the header, pin the algorithm, pick the keys by `kid` and check the signature.

        An HS256 header that passes is remembered with its candidate keys, each with the
        header segment already hashed in: the next token with the same header goes straight
        to one HMAC of its claims segment (`_verify_token`).
        """
        header = self._header_cache.get(header_segment)
        if header is None:
            header = _parse_header(header_segment)
            cacheable = (
                len(self._header_cache) < _HEADER_CACHE_LIMIT
                and len(header_segment) <= _HEADER_CACHE_MAX_SEGMENT
            )
            if cacheable:
                self._header_cache[header_segment] = header
        if header.alg not in self._algorithms:
            raise _fail(
                DispatchAuthFailure.BAD_ALGORITHM,
                f"token alg {header.alg!r} is not accepted (accepted: "
                f"{', '.join(sorted(self._algorithms)) or 'none'})",
            )
        signed_prefix = header_segment + b"."
        if header.alg != "HS256":
            self._check_public_key(header, signed_prefix + claims_segment, signature)
            return
        candidates = self._hs256_candidates(header.kid)
        if header_segment in self._header_cache:  # the same bound: cached once, reused
            prefixed = tuple(signer.with_prefix(signed_prefix) for signer in candidates)
            self._hs256_by_header[header_segment] = prefixed
        signing_input = signed_prefix + claims_segment
        for signer in candidates:
            if signer.matches(signing_input, signature):
                return
        raise _fail(DispatchAuthFailure.BAD_SIGNATURE, "token signature does not verify")

    def _hs256_candidates(self, kid: str | None) -> list[HS256Signer]:
        """Spec section 7 rotation: a `kid` picks that key only; none tries each key."""
        if kid is None:
            return self._hs256_signers
        signer = self._hs256_by_kid.get(kid)
        if signer is None:
            self._raise_for_unmatched_kid(kid, "HS256")
        return [signer]

    def _check_public_key(self, header: _Header, signing_input: bytes, segment: bytes) -> None:
        if header.kid is not None:
            key = self._public_by_kid.get(header.kid)
            if key is None or key.alg != header.alg:
                self._raise_for_unmatched_kid(header.kid, header.alg)
            candidates: list[_PublicKey] = [key]
        else:
            candidates = [k for k in self._public_keys if k.alg == header.alg]
        try:
            signature = b64url_decode(segment)
        except ValueError as exc:
            raise _fail(DispatchAuthFailure.MALFORMED, f"token signature: {exc}") from None
        for key in candidates:
            if key.verify(signing_input, signature):
                return
        raise _fail(DispatchAuthFailure.BAD_SIGNATURE, "token signature does not verify")

    def _raise_for_unmatched_kid(self, kid: str, alg: str) -> NoReturn:
        public_key = self._public_by_kid.get(kid)
        if public_key is not None or kid in self._hs256_by_kid:
            key_alg = public_key.alg if public_key is not None else "HS256"
            raise _fail(
                DispatchAuthFailure.BAD_ALGORITHM,
                f"token alg {alg} does not match the {key_alg} key it names (kid {kid!r})",
            )
        raise _fail(DispatchAuthFailure.UNKNOWN_KEY, f"token kid {kid!r} names no known key")

    def _check_claims(
        self, claims: DispatchClaims, dispatch_id: str, capability: str, now: float
    ) -> None:
        if claims.iss != self._issuer:
            raise _fail(DispatchAuthFailure.WRONG_ISSUER, f"token iss is not {self._issuer!r}")
        if claims.aud != self.instance_id:
            raise _fail(
                DispatchAuthFailure.WRONG_AUDIENCE,
                f"token is for instance {claims.aud!r}, not {self.instance_id!r}",
            )
        if claims.jti != dispatch_id:
            raise _fail(
                DispatchAuthFailure.WRONG_JTI,
                f"token is for dispatch {claims.jti!r}, not {dispatch_id!r}",
            )
        if claims.cap != capability:
            raise _fail(
                DispatchAuthFailure.WRONG_CAPABILITY,
                f"token is for capability {claims.cap!r}, not {capability!r}",
            )
        leeway = self._leeway
        if claims.exp <= now - leeway:
            raise _fail(
                DispatchAuthFailure.EXPIRED,
                f"token expired at {claims.exp} (now {now}, leeway {leeway} s): "
                "check the mesh and agent clocks",
            )
        if claims.iat > now + leeway:
            raise _fail(
                DispatchAuthFailure.ISSUED_IN_FUTURE,
                f"token issued at {claims.iat}, after now {now} + leeway {leeway} s: "
                "check the mesh and agent clocks",
            )
        nbf = claims.nbf
        if nbf is not UNSET and nbf > now + leeway:
            raise _fail(
                DispatchAuthFailure.NOT_YET_VALID,
                f"token not valid before {nbf} (now {now}, leeway {leeway} s)",
            )


_TRUE_WORDS: Final = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS: Final = frozenset({"false", "0", "no", "off"})


def dispatch_auth_enabled(environ: Mapping[str, str]) -> bool:
    """Read `SVANTIC_DISPATCH_AUTH_ENABLED` from `environ` (spec section 7: default on).

    Pass `os.environ`; the core never reads it. `true/false/1/0/yes/no/on/off` in any
    case (surrounding blanks ignored); anything else, the empty string included, raises
    `ValueError`, because guessing would silently switch auth off or on.
    """
    value = environ.get(DISPATCH_AUTH_ENABLED_ENV)
    if value is None:
        return True
    word = value.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(
        f"{DISPATCH_AUTH_ENABLED_ENV} must be one of true/false/1/0/yes/no/on/off, not {value!r}"
    )

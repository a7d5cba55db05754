"""Hand-written compact JWS pieces for the HS256 dispatch-auth fast path (spec section 7).

Why not PyJWT here: one dispatch is minted and verified per call, and PyJWT spends most of
its time per mint+verify in generic option handling. The HS256 compact form is small
enough to write exactly (RFC 7515 section 7.1, RFC 7518 section 3.2) and strictly:
base64url without padding and in canonical form only, UTF-8 JSON objects only, no
duplicate member names. Everything asymmetric stays with PyJWT (see `auth`).

Nothing here imports `jwt`, `ssl` or `socket`.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
from typing import Any

import msgspec

__all__ = [
    "B64URL_ALPHABET",
    "HS256Signer",
    "b64url_decode",
    "b64url_encode",
    "has_duplicate_keys",
    "hs256_payload",
]

B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

_STD_TO_URL = bytes.maketrans(b"+/", b"-_")


def _url_to_std_table() -> bytes:
    """The url alphabet onto the standard one, and every other byte ("+", "/", "=",
    quotes, backslashes, controls, non-ASCII) onto "!", which no base64 decoder accepts."""
    table = bytearray(b"!" * 256)
    for char in B64URL_ALPHABET:
        table[char] = char
    table[ord("-")], table[ord("_")] = ord("+"), ord("/")
    return bytes(table)


_URL_TO_STD = _url_to_std_table()
# The closing quote of the JSON string `b64url_decode` hands msgspec, after the padding
# that makes the length a multiple of 4; indexed by len(segment) % 4 (1 is invalid).
_PADDING_AND_QUOTE = (b'"', b'"', b'=="', b'="')
_BASE64_DECODER = msgspec.json.Decoder(bytes)
# Called without `newline=False`: a keyword costs more than cutting off the "\n".
_b2a_base64 = binascii.b2a_base64
# An HMAC-SHA256 is 32 bytes: 43 base64 characters, then "=" and the newline, cut off.
_SIGNATURE_CHARS = 43

# Value of each base64url character, to check that the bits a short final group leaves
# unused are zero: RFC 4648 section 3.5 allows encoders only that one (canonical) form.
_CHAR_VALUE = [-1] * 256
for _index, _char in enumerate(B64URL_ALPHABET):
    _CHAR_VALUE[_char] = _index
# Mask of the unused low bits of the last character, by len(segment) % 4.
_UNUSED_BITS = (0, 0, 0b1111, 0b11)

_SHA256_BLOCK_SIZE = 64
_XOR_IPAD = bytes(value ^ 0x36 for value in range(256))  # translate tables: K ^ ipad, K ^ opad
_XOR_OPAD = bytes(value ^ 0x5C for value in range(256))


def b64url_encode(data: bytes) -> bytes:
    """Base64url without padding (RFC 7515 section 2, "Base64url Encoding")."""
    return _b2a_base64(data).translate(_STD_TO_URL).rstrip(b"=\n")


def b64url_decode(segment: bytes) -> bytes:
    """Decode one JWS segment strictly, raising `ValueError` on anything but canonical form.

    Refused: `=` padding, the standard alphabet's `+` and `/`, whitespace or any other
    byte, a length of 4n+1, and non-zero unused bits in the last character. Strictness
    means one token has exactly one spelling, so two verifiers cannot disagree on it.
    """
    remainder = len(segment) & 3
    if remainder:
        if remainder == 1:
            raise ValueError("segment length is not a possible base64url length")
        if _CHAR_VALUE[segment[-1]] & _UNUSED_BITS[remainder]:
            raise ValueError("segment is not in canonical base64url form")
    try:
        # msgspec decodes base64 (a JSON string into `bytes`) about 3x faster than
        # binascii. One translate pass maps the url alphabet onto the standard one and
        # every other byte onto "!", so no escape or quote can reach the JSON parser and
        # anything outside the alphabet is refused.
        return _BASE64_DECODER.decode(
            b'"' + segment.translate(_URL_TO_STD) + _PADDING_AND_QUOTE[remainder]
        )
    except msgspec.DecodeError:
        raise ValueError("segment holds a byte outside the base64url alphabet") from None


class HS256Signer:
    """HMAC-SHA256 over a signing input, returning the base64url signature segment.

    HMAC (RFC 2104) is `H((K ^ opad) || H((K ^ ipad) || m))`. The two keyed SHA-256
    states are computed once per key and copied per token: that halves the cost of
    `hmac.new(...).copy()` per dispatch, whose Python wrapper dominates at this size.
    Tests check it against `hmac.digest` for keys shorter than, equal to and longer
    than the 64-byte block.

    A signer made by `with_prefix(prefix)` has hashed `prefix` in already: its `sign`,
    `matches` and `compact` take only what follows. Dispatch tokens share their header
    (and, per agent, the start of their claims), so per token only the rest is hashed.
    """

    __slots__ = ("_inner", "_outer", "_prefix")
    _inner: hashlib._Hash
    _outer: hashlib._Hash
    _prefix: bytes

    def __init__(self, secret: bytes, *, copy_of: HS256Signer | None = None) -> None:
        """Key the two SHA-256 states with `secret`, or take `copy_of`'s (a compiled class
        has no `__new__` trick for that)."""
        if copy_of is not None:
            self._inner = copy_of._inner.copy()
            self._outer = copy_of._outer
            self._prefix = copy_of._prefix
            return
        if len(secret) > _SHA256_BLOCK_SIZE:
            secret = hashlib.sha256(secret).digest()
        padded = secret.ljust(_SHA256_BLOCK_SIZE, b"\0")
        self._inner = hashlib.sha256(padded.translate(_XOR_IPAD))
        self._outer = hashlib.sha256(padded.translate(_XOR_OPAD))
        self._prefix = b""

    def with_prefix(self, prefix: bytes) -> HS256Signer:
        """A signer for messages that start with `prefix`: `sign(rest)` is the signature
        of `prefix + rest`, and the signing input need never be sliced or joined."""
        prefixed = HS256Signer(b"", copy_of=self)
        prefixed._inner.update(prefix)
        prefixed._prefix = self._prefix + prefix
        return prefixed

    def digest(self, message: bytes) -> bytes:
        """The raw 32-byte HMAC-SHA256 of `message`."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def sign(self, signing_input: bytes) -> bytes:
        """Return `b64url(HMAC-SHA256(key, signing_input))` (RFC 7518 section 3.2)."""
        inner = self._inner.copy()
        inner.update(signing_input)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return _b2a_base64(outer.digest()).translate(_STD_TO_URL)[:_SIGNATURE_CHARS]

    def matches(self, signing_input: bytes, signature: bytes) -> bool:
        """Whether `signature` is the signature segment of `signing_input`, compared in
        constant time. Compared encoded: a signature is canonical base64url or wrong."""
        return hmac.compare_digest(self.sign(signing_input), signature)

    def compact(self, payload_rest: bytes) -> str:
        """The compact JWS (RFC 7515 section 7.1) of the prefix and `payload_rest`.

        For a signer whose prefix is `header "." b64url(payload start)`, where the
        payload start is a multiple of 3 bytes long, so that its base64 ends on a group
        boundary: then `b64url(payload) = b64url(payload start) + b64url(payload_rest)`.
        Encoding and signing are written out here, as one call per token.
        """
        segment = _b2a_base64(payload_rest).translate(_STD_TO_URL).rstrip(b"=\n")
        inner = self._inner.copy()
        inner.update(segment)
        outer = self._outer.copy()
        outer.update(inner.digest())
        signature = _b2a_base64(outer.digest()).translate(_STD_TO_URL)[:_SIGNATURE_CHARS]
        return b"".join((self._prefix, segment, b".", signature)).decode("ascii")


def hs256_payload(
    signers: tuple[HS256Signer, ...], payload_segment: bytes, signature: bytes
) -> bytes | None:
    """The decoded payload of an HS256 compact JWS, or None if anything is off.

    For a verifier that has checked the header segment and holds `signers` with that
    segment and its dot as their prefix (one per candidate key). None means: the
    signature matches no key, or the payload segment is not canonical base64url; the
    caller then takes its slow path, which says which. This is `matches` and
    `b64url_decode` written out, as one call per token.
    """
    for signer in signers:
        inner = signer._inner.copy()
        inner.update(payload_segment)
        outer = signer._outer.copy()
        outer.update(inner.digest())
        expected = _b2a_base64(outer.digest()).translate(_STD_TO_URL)[:_SIGNATURE_CHARS]
        if hmac.compare_digest(expected, signature):
            break
    else:
        return None
    remainder = len(payload_segment) & 3
    if remainder and (remainder == 1 or _CHAR_VALUE[payload_segment[-1]] & _UNUSED_BITS[remainder]):
        return None
    try:
        return _BASE64_DECODER.decode(
            b'"' + payload_segment.translate(_URL_TO_STD) + _PADDING_AND_QUOTE[remainder]
        )
    except msgspec.DecodeError:
        return None


def has_duplicate_keys(raw: bytes) -> bool:
    """Whether any JSON object in `raw` repeats a member name (at any depth).

    RFC 7515 section 5.2 lets a JWS parser either reject duplicates or keep the last;
    parsers that keep the *first* exist, so a token with two `aud` members could mean
    different things to different verifiers. We reject. This is the slow path: callers
    first try a cheap exact re-encoding check that proves there are none, and call this
    only on JSON that msgspec already accepted.
    """
    duplicate_found = False

    def collect(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicate_found
        obj = dict(pairs)
        if len(obj) != len(pairs):
            duplicate_found = True
        return obj

    try:
        json.loads(raw, object_pairs_hook=collect)
    except (ValueError, RecursionError):
        return True  # callers parsed `raw` already: treat a parser disagreement as suspect
    return duplicate_found

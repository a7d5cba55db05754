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
import json
from typing import Any

__all__ = [
    "B64URL_ALPHABET",
    "HS256Signer",
    "b64url_decode",
    "b64url_encode",
    "has_duplicate_keys",
]

B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

_STD_TO_URL = bytes.maketrans(b"+/", b"-_")
_URL_TO_STD = bytes.maketrans(b"-_+/=", b"+/!!!")
_PADDING = (b"", b"", b"==", b"=")  # indexed by len(segment) % 4; remainder 1 is invalid

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
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=")


def b64url_decode(segment: bytes) -> bytes:
    """Decode one JWS segment strictly, raising `ValueError` on anything but canonical form.

    Refused: `=` padding, the standard alphabet's `+` and `/`, whitespace or any other
    byte, a length of 4n+1, and non-zero unused bits in the last character. Strictness
    means one token has exactly one spelling, so two verifiers cannot disagree on it.
    """
    remainder = len(segment) % 4
    if remainder == 1:
        raise ValueError("segment length is not a possible base64url length")
    if remainder and _CHAR_VALUE[segment[-1]] & _UNUSED_BITS[remainder]:
        raise ValueError("segment is not in canonical base64url form")
    try:
        # One pass maps the url alphabet onto the standard one and every byte the url
        # alphabet lacks ("+", "/", "=") onto "!", which strict mode then refuses.
        return binascii.a2b_base64(
            segment.translate(_URL_TO_STD) + _PADDING[remainder], strict_mode=True
        )
    except binascii.Error:
        raise ValueError("segment holds a byte outside the base64url alphabet") from None


class HS256Signer:
    """HMAC-SHA256 over a signing input, returning the base64url signature segment.

    HMAC (RFC 2104) is `H((K ^ opad) || H((K ^ ipad) || m))`. The two keyed SHA-256
    states are computed once per key and copied per token: that halves the cost of
    `hmac.new(...).copy()` per dispatch, whose Python wrapper dominates at this size.
    Tests check it against `hmac.digest` for keys shorter than, equal to and longer
    than the 64-byte block.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        if len(secret) > _SHA256_BLOCK_SIZE:
            secret = hashlib.sha256(secret).digest()
        padded = secret.ljust(_SHA256_BLOCK_SIZE, b"\0")
        self._inner = hashlib.sha256(padded.translate(_XOR_IPAD))
        self._outer = hashlib.sha256(padded.translate(_XOR_OPAD))

    def digest(self, message: bytes) -> bytes:
        """The raw 32-byte HMAC-SHA256 of `message`."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def sign(self, signing_input: bytes) -> bytes:
        """Return `b64url(HMAC-SHA256(key, signing_input))` (RFC 7518 section 3.2)."""
        return b64url_encode(self.digest(signing_input))


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

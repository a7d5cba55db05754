"""Differential test: our HS256 `svantic_jwt` verifier against PyJWT configured alike.

Over 12,000 seeded random tokens (valid ones, claim type and value changes, header
changes, times around the `exp` / `iat` / `nbf` boundaries, kid present / absent / unknown,
re-serialised JSON, bit flips, segment swaps, padding, extra segments, with and without
re-signing after the change) our accept/reject must equal PyJWT's, with these checks
added on PyJWT's side to match spec section 7: `algorithms=["HS256"]`, `issuer`,
`audience` with `strict_aud`, the same leeway, every claim required, PyJWT's clock
frozen at our `now`, `jti` == the dispatch id and `cap` == the capability, and kid
selection (a `kid` picks that key only; no `kid` tries each key).

Where we are deliberately stricter than PyJWT we must reject and PyJWT may accept.
Those cases are listed in `STRICTER` and recognised by `stricter_reasons` from the
token's content alone, not from how it was generated; every one of them must turn up.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import random
import warnings
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svantic_proto.auth import DispatchAuthError, DispatchAuthVerifier, HS256Key

STRICTER = {
    "padding": "a segment carries '=' padding (PyJWT strips it)",
    "typ": "header typ present and not exactly 'JWT' (PyJWT ignores typ)",
    "crit/b64": "header has crit or b64 (PyJWT accepts crit=['b64'] with b64 true)",
    "duplicate": "a JSON object repeats a member name (PyJWT keeps the last)",
    "not strict JSON": "not UTF-8 (UTF-16/32, BOM), NaN/Infinity, lone surrogate, "
    "or a number outside the double range (Python's json accepts them)",
    "time claim type": "exp/iat/nbf not a JSON integer: string, float or bool "
    "(PyJWT calls int() on them)",
    "tenant_id type": "tenant_id not a string (PyJWT does not know the claim)",
}

SECRET_A = b"differential-secret-A-0123456789abcdef"
SECRET_B = b"differential-secret-B-fedcba9876543210"
SECRET_WRONG = b"differential-secret-X-not-a-configured-key"
KEYS_BY_KID = {"a": SECRET_A, "b": SECRET_B}
INSTANCE = "navigator-prod-01"
OTHER_INSTANCE = "navigator-prod-02"
DISPATCH = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f61"
OTHER_DISPATCH = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f69"
CAPABILITY = "get_ticket"
BASE_TIME = 1_795_000_000
LEEWAYS = (0.0, 2.5, 5.0)
REQUIRED = ["iss", "aud", "sub", "tenant_id", "jti", "cap", "iat", "exp"]
CASES = 12_000
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# Verifier configurations: (our keys, candidate secrets for a kid-less token, kid table).
CONFIGS: dict[str, tuple[list[HS256Key], list[bytes], dict[str, bytes]]] = {
    "single": ([HS256Key(SECRET_A)], [SECRET_A], {}),
    "rotating": (
        [HS256Key(SECRET_A, kid="a"), HS256Key(SECRET_B, kid="b")],
        [SECRET_A, SECRET_B],
        KEYS_BY_KID,
    ),
}


# ----------------------------------------------------------------------------- helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(signing_input: str, secret: bytes, alg: str = "HS256") -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    if alg not in digest:
        return ""
    mac = hmac.new(secret, signing_input.encode("utf-8"), digest[alg])
    return b64url(mac.digest())


class FrozenClock:
    """Stands in for `datetime` inside `jwt.api_jwt`, whose `decode` reads the clock."""

    now = 0.0

    class _Instant:
        def __init__(self, timestamp: float) -> None:
            self._timestamp = timestamp

        def timestamp(self) -> float:
            return self._timestamp

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch) -> None:
        class FrozenDatetime(datetime):
            @staticmethod
            def now(tz: Any = None) -> Any:
                return FrozenClock._Instant(FrozenClock.now)

        monkeypatch.setattr(jwt.api_jwt, "datetime", FrozenDatetime)


@pytest.fixture
def frozen_pyjwt(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FrozenClock]]:
    FrozenClock.install(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield FrozenClock


def pyjwt_accepts(token: str, config: str, leeway: float, now: float) -> bool:
    """PyJWT configured like spec section 7, plus the checks PyJWT cannot express."""
    _, kidless_candidates, kid_table = CONFIGS[config]
    try:
        header = jwt.get_unverified_header(token)
    except Exception:
        return False  # decode() would fail on the same parse
    if "kid" in header:  # checked with that key only (spec section 7)
        secret = kid_table.get(header["kid"])
        candidates = [secret] if secret is not None else []
    else:
        candidates = kidless_candidates
    FrozenClock.now = now
    for secret in candidates:
        try:
            claims = jwt.decode(
                token,
                secret,
                algorithms=["HS256"],
                audience=INSTANCE,
                issuer="svantic",
                leeway=leeway,
                options={"require": REQUIRED, "strict_aud": True},
            )
        except Exception:  # PyJWTError, and e.g. OverflowError on exp=Infinity
            continue
        return claims["jti"] == DISPATCH and claims["cap"] == CAPABILITY
    return False


def our_rejection(
    verifiers: dict[tuple[str, float], DispatchAuthVerifier],
    token: str,
    config: str,
    leeway: float,
    now: float,
) -> str | None:
    """None when we accept, else our `DispatchAuthFailure` value."""
    try:
        verifiers[config, leeway].verify(
            {"type": "svantic_jwt", "token": token},
            dispatch_id=DISPATCH,
            capability=CAPABILITY,
            now=now,
        )
    except DispatchAuthError as exc:
        return exc.reason.value
    return None


def make_verifiers() -> dict[tuple[str, float], DispatchAuthVerifier]:
    return {
        (name, leeway): DispatchAuthVerifier(INSTANCE, hs256_keys=keys, leeway=leeway)
        for name, (keys, _, _) in CONFIGS.items()
        for leeway in LEEWAYS
    }


def lenient_b64decode(segment: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except Exception:
        return None


def strict_json_problem(raw: bytes) -> tuple[Any, bool, bool]:
    """Parse like Python's json; return (value, not_strict_json, has_duplicates)."""
    duplicated = False
    not_strict = False

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        if len({name for name, _ in pairs}) != len(pairs):
            duplicated = True
        return dict(pairs)

    def constant(_: str) -> float:
        nonlocal not_strict
        not_strict = True
        return float("nan")

    value = json.loads(raw, object_pairs_hook=pairs_hook, parse_constant=constant)
    try:
        text = raw.decode("utf-8")
        not_strict = not_strict or text.startswith("\ufeff")
    except UnicodeDecodeError:
        not_strict = True

    def walk(item: Any) -> None:
        nonlocal not_strict
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                not_strict = True
        elif isinstance(item, float) and not math.isfinite(item):
            not_strict = True
        elif isinstance(item, dict):
            for name, member in item.items():
                walk(name)
                walk(member)
        elif isinstance(item, list):
            for member in item:
                walk(member)

    walk(value)
    return value, not_strict, duplicated


def stricter_reasons(token: str) -> set[str]:
    """Which `STRICTER` cases this token falls in, read from its content alone."""
    segments = token.split(".")
    if len(segments) != 3:
        return set()
    reasons: set[str] = set()
    if any("=" in segment for segment in segments):
        reasons.add("padding")
    parsed: list[Any] = []
    for segment in segments[:2]:
        raw = lenient_b64decode(segment.rstrip("="))
        if raw is None:
            return reasons
        try:
            value, not_strict, duplicated = strict_json_problem(raw)
        except (ValueError, RecursionError):
            return reasons
        if not_strict:
            reasons.add("not strict JSON")
        if duplicated:
            reasons.add("duplicate")
        parsed.append(value)
    header, claims = parsed
    if isinstance(header, dict):
        if "typ" in header and header["typ"] != "JWT":
            reasons.add("typ")
        if "crit" in header or "b64" in header:
            reasons.add("crit/b64")
    if isinstance(claims, dict):
        for name in ("exp", "iat", "nbf"):
            if name in claims and claims[name] is not None and type(claims[name]) is not int:
                reasons.add("time claim type")
        tenant = claims.get("tenant_id")
        if tenant is not None and not isinstance(tenant, str):
            reasons.add("tenant_id type")
    return reasons


# ----------------------------------------------------------------------------- generator

ODD_VALUES: list[Any] = [
    "1795000060",
    "",
    "x",
    1795000060.0,
    1795000060.5,
    1.5e9,
    True,
    False,
    None,
    [1],
    [INSTANCE],
    {"a": 1},
    -1,
    0,
    10**20,
    2**63,
    "svantic",
]
EXTRA_VALUES: list[Any] = [
    "extra",
    7,
    2.5,
    None,
    True,
    [1, "two", {"three": 3}],
    {"nested": {"deep": [1]}},
    "pässwörd-✓",
    "\U0001f600",
    float("nan"),
    float("inf"),
    "\ud800",
    1e400,
]
HEADER_ALGS = ["none", "HS512", "HS384", "hs256", "RS256", "ES256", "", "HS256 "]


def make_claims(rng: random.Random, now: float, leeway: float) -> dict[str, Any]:
    lifetime = rng.choice([60, 60, 1, 3600])
    # Put `now` near a boundary most of the time.
    anchor = rng.choice(["exp", "iat", "free", "free", "free"])
    if anchor == "exp":
        exp = round(now - leeway + rng.choice([-1, -0.5, 0, 0, 0.001, 0.5, 1, 2]))
        iat = exp - lifetime
    elif anchor == "iat":
        iat = round(now + leeway + rng.choice([-1, -0.5, 0, 0, 0.001, 0.5, 1, 2]))
        exp = iat + lifetime
    else:
        iat = round(now) - rng.randint(0, 120)
        exp = iat + lifetime
    claims: dict[str, Any] = {
        "iss": "svantic",
        "aud": INSTANCE,
        "sub": "navigator",
        "tenant_id": "tenant_abc",
        "jti": DISPATCH,
        "cap": CAPABILITY,
        "iat": int(iat),
        "exp": int(exp),
    }
    roll = rng.random()
    if roll < 0.08:
        del claims[rng.choice(REQUIRED)]
    elif roll < 0.25:
        claims[rng.choice([*REQUIRED, "nbf"])] = rng.choice(ODD_VALUES)
    elif roll < 0.33:
        name, wrong = rng.choice(
            [
                ("aud", OTHER_INSTANCE),
                ("iss", "evil"),
                ("jti", OTHER_DISPATCH),
                ("cap", "delete_everything"),
                ("aud", [INSTANCE]),
                ("iss", "Svantic"),
            ]
        )
        claims[name] = wrong
    elif roll < 0.40:
        claims["nbf"] = round(now + leeway + rng.choice([-2, -0.5, 0, 0.5, 1, 30]))
    if rng.random() < 0.15:
        for _ in range(rng.randint(1, 3)):
            claims[rng.choice(["extra", "scope", "x", "trace"])] = rng.choice(EXTRA_VALUES)
    return claims


def serialise(rng: random.Random, obj: dict[str, Any]) -> bytes:
    items = list(obj.items())
    roll = rng.random()
    if roll < 0.05 and items:
        # Duplicate a member: an earlier decoy, the genuine value last.
        name, _ = rng.choice(items)
        decoy = rng.choice(["decoy", 0, OTHER_INSTANCE])
        body = ",".join(
            [json.dumps(name) + ":" + json.dumps(decoy)]
            + [json.dumps(k) + ":" + json.dumps(v) for k, v in items]
        )
        return ("{" + body + "}").encode("utf-8")
    if roll < 0.08:
        rng.shuffle(items)
    if roll < 0.02:
        return json.dumps(dict(items)).encode(rng.choice(["utf-16", "utf-32", "utf-8-sig"]))
    separators = rng.choice([(",", ":"), (",", ":"), (", ", ": "), (" ,", " : ")])
    text = json.dumps(dict(items), separators=separators, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.03:
        text = " " + text + "\n"
    return text.encode("utf-8", "surrogatepass")


def make_header(rng: random.Random, config: str) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "HS256"}
    if rng.random() < 0.9:
        header["typ"] = "JWT"
    kid_roll = rng.random()
    named_share = 0.4 if config == "rotating" else 0.03
    if kid_roll < named_share:
        header["kid"] = rng.choice(["a", "b"])
    elif kid_roll < named_share + 0.05:
        header["kid"] = rng.choice(["zzz", "", 1, None, ["a"]])
    roll = rng.random()
    if roll < 0.08:
        header["alg"] = rng.choice(HEADER_ALGS)
    elif roll < 0.11:
        header["typ"] = rng.choice(["jwt", "JWS", "at+jwt", None, 1])
    elif roll < 0.13:
        header["crit"] = rng.choice([["b64"], ["exp"], [], "b64"])
        if rng.random() < 0.5:
            header["b64"] = True
    elif roll < 0.14:
        header["b64"] = rng.choice([True, False])
    elif roll < 0.16:
        header.pop("alg")
    elif roll < 0.20:
        header[rng.choice(["jku", "x5u", "cty", "zip"])] = "https://example.invalid/keys"
    return header


def signing_secret(rng: random.Random, header: dict[str, Any]) -> bytes:
    roll = rng.random()
    if roll < 0.08:
        return SECRET_WRONG
    kid = header.get("kid")
    if isinstance(kid, str) and kid in KEYS_BY_KID:
        if roll < 0.12:
            return KEYS_BY_KID["b" if kid == "a" else "a"]  # right key, wrong kid
        return KEYS_BY_KID[kid]
    return SECRET_B if roll < 0.2 else SECRET_A


def mutate(rng: random.Random, token: str) -> str:
    segments = token.split(".")
    kind = rng.choice(
        [
            "flip",
            "flip",
            "swap",
            "pad",
            "std-alphabet",
            "extra-segment",
            "empty-segment",
            "drop-signature",
            "truncate",
            "whitespace",
            "non-canonical",
            "drop-segment",
            "non-ascii",
            "duplicate-token",
        ]
    )
    index = rng.randrange(3)
    segment = segments[index]
    if kind == "flip" and segment:
        position = rng.randrange(len(segment))
        replacement = rng.choice(B64URL.replace(segment[position], ""))
        segments[index] = segment[:position] + replacement + segment[position + 1 :]
    elif kind == "swap":
        segments[0], segments[1] = segments[1], segments[0]
    elif kind == "pad":
        segments[index] = segment + "=" * max(1, -len(segment) % 4)
    elif kind == "std-alphabet":
        changed = segment.replace("-", "+").replace("_", "/")
        segments[index] = changed if changed != segment else segment[:-1] + "+"
    elif kind == "extra-segment":
        segments.insert(rng.randrange(4), rng.choice(["", "e30", segments[1]]))
    elif kind == "empty-segment":
        segments[index] = ""
    elif kind == "drop-signature":
        segments[2] = ""
    elif kind == "truncate" and segment:
        segments[index] = segment[: rng.randrange(len(segment))]
    elif kind == "whitespace" and segment:
        position = rng.randrange(len(segment) + 1)
        segments[index] = segment[:position] + rng.choice([" ", "\n", "\t"]) + segment[position:]
    elif kind == "non-canonical" and len(segment) % 4 in (2, 3):
        value = B64URL.index(segment[-1])
        unused = 0b1111 if len(segment) % 4 == 2 else 0b11
        segments[index] = segment[:-1] + B64URL[(value & ~unused) | rng.randint(1, unused)]
    elif kind == "drop-segment":
        del segments[index]
    elif kind == "non-ascii":
        segments[index] = segment + "é"
    elif kind == "duplicate-token":
        return token + "." + token
    return ".".join(segments)


def generate(rng: random.Random) -> tuple[str, str, float, float]:
    config = rng.choice(list(CONFIGS))
    leeway = rng.choice(LEEWAYS)
    now = BASE_TIME + rng.choice([0.0, 0.25, 0.5, 0.999])
    header = make_header(rng, config)
    claims = make_claims(rng, now, leeway)
    signing_input = b64url(serialise(rng, header)) + "." + b64url(serialise(rng, claims))
    alg = header.get("alg")
    alg = alg if isinstance(alg, str) and alg in ("HS256", "HS384", "HS512") else "HS256"
    if header.get("alg") == "none":
        alg = "none"
    secret = signing_secret(rng, header)
    token = signing_input + "." + sign(signing_input, secret, alg)
    if rng.random() < 0.25:
        token = mutate(rng, token)
        if rng.random() < 0.5 and "." in token:
            # Re-sign, so the change is judged by parsing rather than by the signature.
            body = token.rsplit(".", 1)[0]
            token = body + "." + sign(body, secret)
    return token, config, leeway, now


# ----------------------------------------------------------------------------- tests


def check_agreement(
    verifiers: dict[tuple[str, float], DispatchAuthVerifier],
    token: str,
    config: str,
    leeway: float,
    now: float,
) -> str:
    """Assert the rule for one token; return its outcome for the coverage counts."""
    rejection = our_rejection(verifiers, token, config, leeway, now)
    ours = rejection is None
    reference = pyjwt_accepts(token, config, leeway, now)
    reasons = stricter_reasons(token)
    context = f"token={token!r} config={config} leeway={leeway} now={now} stricter={reasons}"
    assert not (ours and not reference), "we accept what PyJWT rejects: " + context
    assert not (reasons and ours), "a deliberately stricter case was accepted: " + context
    if reference and not ours:
        assert reasons, f"we reject ({rejection}) what PyJWT accepts, unlisted: " + context
        return "stricter:" + ",".join(sorted(reasons))
    return "accepted" if ours else f"rejected:{rejection}"


def test_differential_against_pyjwt(frozen_pyjwt: type[FrozenClock]) -> None:
    rng = random.Random(20261121)
    verifiers = make_verifiers()
    outcomes: Counter[str] = Counter()
    for _ in range(CASES):
        outcomes[check_agreement(verifiers, *generate(rng))] += 1
    # Not vacuous: many tokens accepted, rejections for every reason a token can earn,
    # and every deliberately stricter case exercised.
    assert sum(outcomes.values()) >= 10_000
    assert outcomes["accepted"] > CASES // 10, outcomes
    rejected_for = {key.removeprefix("rejected:") for key in outcomes if key.startswith("rej")}
    assert rejected_for >= {
        "malformed",
        "bad_header",
        "bad_algorithm",
        "unknown_key",
        "bad_signature",
        "missing_claim",
        "bad_claim_type",
        "wrong_issuer",
        "wrong_audience",
        "wrong_jti",
        "wrong_capability",
        "expired",
        "issued_in_future",
        "not_yet_valid",
    }, outcomes
    exercised = {
        reason
        for key in outcomes
        if key.startswith("stricter:")
        for reason in key.removeprefix("stricter:").split(",")
    }
    assert exercised == set(STRICTER), (exercised, outcomes)


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    overrides=st.dictionaries(
        st.sampled_from([*REQUIRED, "nbf", "extra"]),
        JSON_VALUES | st.sampled_from([BASE_TIME - 10, BASE_TIME + 10, BASE_TIME + 60]),
        max_size=3,
    ),
    drop=st.lists(st.sampled_from(REQUIRED), max_size=2),
    leeway=st.sampled_from(LEEWAYS),
    offset=st.sampled_from([-70.0, -65.0, -60.5, -5.0, 0.0, 5.0, 5.5, 60.0]),
)
def test_claim_values_agree_with_pyjwt(
    frozen_pyjwt: type[FrozenClock],
    overrides: dict[str, Any],
    drop: list[str],
    leeway: float,
    offset: float,
) -> None:
    """Any JSON value in any claim, correctly signed: same verdict as PyJWT or listed."""
    claims: dict[str, Any] = {
        "iss": "svantic",
        "aud": INSTANCE,
        "sub": "navigator",
        "tenant_id": "tenant_abc",
        "jti": DISPATCH,
        "cap": CAPABILITY,
        "iat": BASE_TIME,
        "exp": BASE_TIME + 60,
    }
    claims.update(overrides)
    for name in drop:
        claims.pop(name, None)
    signing_input = (
        b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode())
    )
    token = signing_input + "." + sign(signing_input, SECRET_A)
    check_agreement(make_verifiers(), token, "single", leeway, BASE_TIME + offset)


def test_pyjwt_reference_agrees_with_the_vectors(frozen_pyjwt: type[FrozenClock]) -> None:
    """The reference itself is sound: on the spec's vectors it says what they say."""
    from pathlib import Path

    vectors = json.loads(
        (Path(__file__).parent.parent / "vectors" / "dispatch_auth.json").read_text("utf-8")
    )
    secret = vectors["secret"].encode()
    for case in vectors["svantic_jwt"]:
        expect = case["expect"]
        FrozenClock.now = float(case["now"])
        try:
            claims = jwt.decode(
                case["token"],
                secret,
                algorithms=["HS256"],
                audience=expect["instance_id"],
                issuer="svantic",
                leeway=5,
                options={"require": REQUIRED, "strict_aud": True},
            )
            accepted = (
                claims["jti"] == expect["dispatch_id"] and claims["cap"] == expect["capability"]
            )
        except jwt.PyJWTError:
            accepted = False
        assert accepted is case["valid"], case["name"]

"""Every dispatch-auth vector of the spec (tests/vectors/dispatch_auth.json), section 7."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from svantic_proto.auth import (
    DispatchAuthError,
    DispatchAuthFailure,
    DispatchAuthMinter,
    DispatchAuthVerifier,
    verify_shared_secret,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "vectors" / "dispatch_auth.json").read_text("utf-8")
)

# The reason each invalid vector must be refused with; vectors added later without an
# entry here are still checked for accept/reject.
EXPECTED_REASON = {
    "expired beyond leeway": DispatchAuthFailure.EXPIRED,
    "wrong audience": DispatchAuthFailure.WRONG_AUDIENCE,
    "jti is another dispatch": DispatchAuthFailure.WRONG_JTI,
    "cap is another capability": DispatchAuthFailure.WRONG_CAPABILITY,
    "alg none": DispatchAuthFailure.BAD_ALGORITHM,
    "alg HS512 with the right secret": DispatchAuthFailure.BAD_ALGORITHM,
    "signed with another secret": DispatchAuthFailure.BAD_SIGNATURE,
    "payload tampered": DispatchAuthFailure.BAD_SIGNATURE,
    "missing exp": DispatchAuthFailure.MISSING_CLAIM,
    "iat in the future": DispatchAuthFailure.ISSUED_IN_FUTURE,
    "wrong issuer": DispatchAuthFailure.WRONG_ISSUER,
    "malformed": DispatchAuthFailure.MALFORMED,
    "empty": DispatchAuthFailure.MALFORMED,
}


def by_name(cases: list[dict[str, Any]]) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in cases]


@pytest.mark.parametrize("case", by_name(VECTORS["svantic_jwt"]))
def test_svantic_jwt_vector(case: dict[str, Any]) -> None:
    expect = case["expect"]
    verifier = DispatchAuthVerifier(expect["instance_id"], hs256_keys=[VECTORS["secret"]])
    envelope = {"type": "svantic_jwt", "token": case["token"]}

    def verify() -> None:
        verifier.verify(
            envelope,
            dispatch_id=expect["dispatch_id"],
            capability=expect["capability"],
            now=case["now"],
        )

    if case["valid"]:
        verify()
        return
    with pytest.raises(DispatchAuthError) as caught:
        verify()
    assert caught.value.code == "DISPATCH_AUTH_FAILED"
    if case["name"] in EXPECTED_REASON:
        assert caught.value.reason is EXPECTED_REASON[case["name"]]


@pytest.mark.parametrize("case", by_name(VECTORS["svantic_jwt"]))
def test_svantic_jwt_vector_with_a_rotated_key_list(case: dict[str, Any]) -> None:
    """Holding a previous secret as well changes no verdict (spec section 7, rotation)."""
    expect = case["expect"]
    verifier = DispatchAuthVerifier(
        expect["instance_id"],
        hs256_keys=["previous-signing-secret-0123456789abcdef", VECTORS["secret"]],
    )
    try:
        verifier.verify(
            {"type": "svantic_jwt", "token": case["token"]},
            dispatch_id=expect["dispatch_id"],
            capability=expect["capability"],
            now=case["now"],
        )
        accepted = True
    except DispatchAuthError:
        accepted = False
    assert accepted is case["valid"]


def test_minter_reproduces_the_valid_vector_byte_for_byte() -> None:
    """Our minter writes the spec's exact bytes: header, claim order, compact JSON."""
    valid = next(case for case in VECTORS["svantic_jwt"] if case["name"] == "valid")
    token = DispatchAuthMinter(VECTORS["secret"]).mint_token(
        instance_id=valid["expect"]["instance_id"],
        agent_type="navigator",
        tenant_id="tenant_abc",
        dispatch_id=valid["expect"]["dispatch_id"],
        capability=valid["expect"]["capability"],
        now=1795000000.9,
    )
    assert token == valid["token"]


@pytest.mark.parametrize("case", by_name(VECTORS["shared_secret"]))
def test_shared_secret_vector(case: dict[str, Any]) -> None:
    verifier = DispatchAuthVerifier("navigator-prod-01", shared_secret=case["local"])
    envelope = {"type": "shared_secret", "secret": case["presented"]}
    if case["valid"]:
        verifier.verify(envelope, dispatch_id="d", capability="c", now=0.0)
        verify_shared_secret(case["presented"], case["local"])
        return
    with pytest.raises(DispatchAuthError) as caught:
        verifier.verify(envelope, dispatch_id="d", capability="c", now=0.0)
    assert caught.value.reason is DispatchAuthFailure.SECRET_MISMATCH
    with pytest.raises(DispatchAuthError):
        verify_shared_secret(case["presented"], case["local"])

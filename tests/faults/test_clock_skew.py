"""Clock skew between the mesh and an agent (dispatch auth, spec 7) and between the mesh that
issued a transport token and the one that checks it (spec 1): accepted up to the leeway,
refused beyond it.

Where the leeway lives: `svantic_proto.auth.MAX_LEEWAY` (5 s, the spec's "at most 5 s"), the
default of `DispatchAuthVerifier(leeway=...)`; and `svantic_mesh.tokens.TokenIssuer(leeway=5.0)`
for transport tokens. Both compare with PyJWT's boundaries: expired once
`exp <= now - leeway`, too early while `iat > now + leeway`. The times are passed in (a fake
`now`), except in the last test, where a real mesh process checks tokens with its own clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import jwt
import pytest
from faults_harness import CLIENT, start_mesh
from svantic_mesh.tokens import InvalidToken, TokenIssuer

from svantic_proto.auth import MAX_LEEWAY, DispatchAuthMinter, DispatchAuthVerifier
from svantic_proto.errors import DispatchAuthError

SECRET = "skew-signing-secret-0123456789abcdef"
T = 1_800_000_000.0  # the issuer's clock at minting (a whole second: iat = floor(now))
LIFETIME = 60  # spec 7's default exp - iat
DISPATCH = "01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60"

# Offsets of the checker's clock from the issuer's, and whether the token must pass.
SKEWS = [
    (-MAX_LEEWAY, True),  # the agent's clock 5 s behind: iat is 5 s "in the future"
    (-MAX_LEEWAY - 0.5, False),
    (0.0, True),
    (LIFETIME + MAX_LEEWAY - 0.5, True),  # 4.5 s past exp: still within the leeway
    (LIFETIME + MAX_LEEWAY, False),  # exp <= now - leeway: expired
]


@pytest.mark.parametrize(("skew", "accepted"), SKEWS)
def test_dispatch_auth_accepts_skew_up_to_the_leeway(skew: float, accepted: bool) -> None:
    token = DispatchAuthMinter(SECRET, lifetime=LIFETIME).mint(
        instance_id="agent-1", agent_type="worker", tenant_id="t", dispatch_id=DISPATCH,
        capability="work", now=T)
    verifier = DispatchAuthVerifier("agent-1", hs256_keys=[SECRET])
    if accepted:
        verifier.verify(token, dispatch_id=DISPATCH, capability="work", now=T + skew)
        return
    with pytest.raises(DispatchAuthError) as caught:
        verifier.verify(token, dispatch_id=DISPATCH, capability="work", now=T + skew)
    assert caught.value.code == "DISPATCH_AUTH_FAILED"


@pytest.mark.parametrize(("skew", "accepted"), [
    (-5.0, True), (-5.5, False), (3600 + 4.5, True), (3600 + 5.0, False)])
def test_transport_token_accepts_skew_up_to_the_leeway(skew: float, accepted: bool) -> None:
    issuer = TokenIssuer(b"t" * 32, ttl=3600, leeway=5.0)
    token, _ = issuer.issue("client", "tenant", T)
    if accepted:
        assert issuer.verify(token, T + skew)["tenant_id"] == "tenant"
    else:
        with pytest.raises(InvalidToken):
            issuer.verify(token, T + skew)


def test_a_running_mesh_checks_token_times_with_the_leeway(tmp_path: Path) -> None:
    """Tokens as another mesh process with a skewed clock would issue them (its secret,
    shifted `iat`/`exp`): within the leeway the control plane answers, beyond it 401."""
    mesh = start_mesh(tmp_path)
    try:
        secrets = json.loads((tmp_path / "m.secrets.json").read_text())
        key = secrets["token_secret"].encode()

        def status(iat: float, exp: float) -> int:
            token = jwt.encode({"sub": CLIENT[0], "tenant_id": CLIENT[2], "iat": int(iat),
                                "exp": int(exp), "iss": "svantic-mesh"}, key,
                               algorithm="HS256")
            with httpx.Client(base_url=mesh.url, verify=mesh.context(), trust_env=False,
                              timeout=20) as http:
                return http.post("/agents/get_connection_stats", json={}, headers={
                    "authorization": f"Bearer {token}"}).status_code

        now = time.time()
        # 2 s of margin each side of the 5 s leeway for the real clock between here and there
        assert status(now + 3, now + 3600) == 200  # issued by a clock 3 s ahead
        assert status(now + 8, now + 3600) == 401  # 8 s ahead: beyond the leeway
        assert status(now - 3600, now - 2) == 200  # expired 2 s ago: within the leeway
        assert status(now - 3600, now - 8) == 401
    finally:
        mesh.stop()
    assert "Traceback" not in mesh.log()

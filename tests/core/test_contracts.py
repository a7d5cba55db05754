"""Contracts of the upgrade checks that must fail loudly, not turn into a silent 401.

`check_upgrade`'s `verify_token` may return what PyJWT's `jwt.decode` returns (a dict)
as well as an object with a `tenant_id` attribute; anything else is a bug in the
verifier, raised. The accepted decision carries the record it looked up, so one lookup
per upgrade is enough. `InstanceRecord.deployment_mode` is `connected` or `hosted`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from svantic_proto.errors import LocalProtocolError
from svantic_proto.events import ConnectionClosed, UpgradeRequest
from svantic_proto.handshake import (
    Accept,
    InstanceRecord,
    Reject,
    ServerHandshake,
    UpgradeRequested,
    build_upgrade_request,
    check_upgrade,
)
from svantic_proto.states import MeshState
from svantic_proto.testing import FakeClock, Pair

RECORD = InstanceRecord("inst-1", "tenant-a", "connected", "support")


def _request(instance_id: str = "inst-1") -> UpgradeRequested:
    upgrade = build_upgrade_request(
        "wss://mesh.test/agents/connect", token="the-token", instance_id=instance_id
    )
    event = ServerHandshake().receive_data(upgrade.request_bytes)
    assert isinstance(event, UpgradeRequested)
    return event


class _Registry:
    def __init__(self) -> None:
        self.lookups: list[str] = []

    def __call__(self, instance_id: str) -> InstanceRecord | None:
        self.lookups.append(instance_id)
        return RECORD if instance_id == RECORD.instance_id else None


def test_claims_as_a_dict_like_jwt_decode_returns_are_accepted() -> None:
    claims: dict[str, Any] = {"sub": "client-1", "tenant_id": "tenant-a", "exp": 2_000_000_000}
    decision = check_upgrade(
        _request(), verify_token=lambda token: claims, lookup_instance=_Registry()
    )
    assert isinstance(decision, Accept)
    assert decision.tenant_id == "tenant-a"
    assert decision.claims is claims  # the caller keeps every claim, not only the tenant
    # A dict without a usable tenant is an invalid token, as for an object.
    for bad in ({"sub": "client-1"}, {"tenant_id": ""}, {"tenant_id": 7}):
        refused = check_upgrade(
            _request(), verify_token=lambda token, b=bad: b, lookup_instance=_Registry()
        )
        assert isinstance(refused, Reject) and refused.status == 401


def test_the_accepted_decision_carries_the_one_record_it_looked_up() -> None:
    @dataclass(frozen=True)
    class Claims:
        tenant_id: str

    registry = _Registry()
    decision = check_upgrade(
        _request(), verify_token=lambda token: Claims("tenant-a"), lookup_instance=registry
    )
    assert isinstance(decision, Accept)
    assert decision.record is RECORD
    assert decision.claims == Claims("tenant-a")
    assert registry.lookups == ["inst-1"]


def test_dict_claims_through_a_mesh_set_the_subject_and_arm_the_token_expiry() -> None:
    pair = Pair(auto_accept=False, clock=FakeClock())
    pair.connect()
    (request,) = pair.mesh_events_of(UpgradeRequest)
    claims = {"tenant_id": pair.tenant_id, "sub": "client-1", "exp": pair.clock.wall() + 60}
    decision = check_upgrade(
        request.request,
        verify_token=lambda token: claims,
        lookup_instance=lambda i: InstanceRecord(i, pair.tenant_id, "connected", "support"),
    )
    assert isinstance(decision, Accept)
    pair.mesh.accept(decision, now=pair.clock.now)  # no second lookup: the record is there
    pair.pump()
    assert pair.mesh.state is MeshState.READY
    assert (pair.mesh.subject, pair.mesh.agent_type) == ("client-1", "support")
    pair.advance(60)  # the claims' `exp`: AUTH_EXPIRED, close 1008 (spec 4)
    (closed,) = pair.agent_events_of(ConnectionClosed)
    assert closed.code == 1008


@pytest.mark.parametrize("returned", [True, "tenant-a", ["tenant-a"], object()])
def test_claims_of_no_known_shape_are_a_loud_bug_not_a_401(returned: object) -> None:
    with pytest.raises(LocalProtocolError, match="verify_token returned"):
        check_upgrade(
            _request(), verify_token=lambda token: returned, lookup_instance=_Registry()
        )


@pytest.mark.parametrize("mode", ["Connected", "HOSTED", "", "managed", None])
def test_an_instance_record_refuses_an_unknown_deployment_mode(mode: Any) -> None:
    with pytest.raises(LocalProtocolError, match="deployment_mode"):
        InstanceRecord("inst-1", "tenant-a", mode, "support")


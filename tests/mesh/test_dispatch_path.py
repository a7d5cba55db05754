"""What a dispatch reads: the fleet's memory, never the registry (the database). The fleet
keeps each instance's tenant and dispatch-auth type with its routing state, in step with
every registration, deregistration and start-up load; minting an envelope and the control
plane's ownership check read that. The metrics' labelled children are looked up once."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import pytest
from svantic_mesh.app import MeshParts, MeshSettings
from svantic_mesh.control import Dispatch, Response
from svantic_mesh.metrics import MeshMetrics
from svantic_mesh.model import InstanceRow
from svantic_mesh.registry import SqliteRegistry

from svantic_proto.frames import SharedSecretAuth, SvanticJwtAuth
from svantic_proto.http import HttpRequest
from svantic_proto.mesh import DispatchRoute

SIGNING = b"test-dispatch-auth-secret-0123456789abcdef"


class CountingRegistry(SqliteRegistry):
    """The registry, counting reads of instance rows and secrets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads = 0

    def get_instance(self, instance_id: str) -> Any:
        self.reads += 1
        return super().get_instance(instance_id)

    def instance_secret(self, instance_id: str) -> str | None:
        self.reads += 1
        return super().instance_secret(instance_id)


def make_parts(registry: SqliteRegistry | None = None) -> tuple[MeshParts, CountingRegistry]:
    reg = registry or CountingRegistry(":memory:", secret_key=os.urandom(32), scrypt_n=2**4)
    assert isinstance(reg, CountingRegistry)
    reg.add_client("client-a", "secret-a", "t")
    parts = MeshParts(reg, MeshSettings(public_url="https://127.0.0.1:8443",
                                        token_secret=os.urandom(32), signing_secret=SIGNING))
    return parts, reg


def register(parts: MeshParts, instance_id: str, *, tenant: str = "t",
             secret: str | None = None, created: bool = True) -> None:
    row = InstanceRow(instance_id=instance_id, tenant_id=tenant, agent_type="echo",
                      deployment_mode="connected",
                      dispatch_auth_type="shared_secret" if secret else "svantic_jwt",
                      tools=[{"name": "echo"}])
    parts.fleet.registered(row, secret=secret, created=created, flagged=False, now=0.0,
                           wall=0.0)


def route(instance_id: str) -> DispatchRoute:
    return DispatchRoute(instance_id=instance_id, agent_type="echo", tenant_id="t",
                         dispatch_id="01936f3e-5c4b-7a21-9f3e-2b1c0d4e5f60", capability="echo",
                         now=1_800_000_000.0)


def test_the_fleet_keeps_tenant_and_auth_type_in_step_with_the_record() -> None:
    parts, registry = make_parts()
    fleet = parts.fleet
    assert fleet.dispatch_auth_type("a-1") is None and fleet.tenant_of("a-1") is None
    register(parts, "a-1")
    assert (fleet.tenant_of("a-1"), fleet.dispatch_auth_type("a-1")) == ("t", "svantic_jwt")
    register(parts, "a-1", secret="s3cret", created=False)  # re-registered: the new type
    assert fleet.dispatch_auth_type("a-1") == "shared_secret"
    # A new process: `load` brings the records back into memory.
    again = MeshParts(registry, parts.settings)
    assert (again.fleet.tenant_of("a-1"), again.fleet.dispatch_auth_type("a-1")) == (
        "t", "shared_secret")
    assert fleet.deregister("a-1", reason="test", now=1.0, wall=1.0)
    assert fleet.dispatch_auth_type("a-1") is None and fleet.tenant_of("a-1") is None


def test_a_jwt_envelope_is_minted_without_reading_the_registry() -> None:
    parts, registry = make_parts()
    register(parts, "a-1")
    registry.reads = 0
    assert isinstance(parts.mint(route("a-1")), SvanticJwtAuth)
    assert registry.reads == 0
    with pytest.raises(LookupError):
        parts.mint(route("never-registered"))
    assert registry.reads == 0


def test_a_shared_secret_is_read_from_the_registry_when_minted_never_kept() -> None:
    parts, registry = make_parts()
    register(parts, "s-1", secret="s3cret-value")
    registry.reads = 0
    assert parts.mint(route("s-1")) == SharedSecretAuth(secret="s3cret-value")
    assert registry.reads == 1
    register(parts, "s-1", secret="rotated", created=False)
    assert parts.mint(route("s-1")) == SharedSecretAuth(secret="rotated")
    parts.fleet.deregister("s-1", reason="test", now=1.0, wall=1.0)
    with pytest.raises(LookupError):
        parts.mint(route("s-1"))


def dispatch_request(parts: MeshParts, instance_id: str, token: str) -> Any:
    body = json.dumps({"capability": "echo", "arguments": {"n": 1},
                       "instance_id": instance_id}).encode()
    request = HttpRequest("POST", "/agents/dispatch", "/agents/dispatch", "",
                          (("authorization", f"Bearer {token}"),), body)
    return parts.control.handle(request, now=1.0, wall=1_700_000_000.0)


def test_a_dispatch_to_a_named_instance_checks_ownership_in_memory() -> None:
    parts, registry = make_parts()
    register(parts, "a-1")
    register(parts, "b-1", tenant="other")
    parts.fleet.agent_connected("a-1", capabilities=["echo"], now=0.0, wall=0.0)
    token, _ = parts.tokens.issue("client-a", "t", 1_700_000_000.0)
    registry.reads = 0
    effect = dispatch_request(parts, "a-1", token)
    assert isinstance(effect, Dispatch) and effect.lease.instance_id == "a-1"
    assert registry.reads == 0
    # Another tenant's instance and an unknown one are answered alike.
    for instance_id in ("b-1", "nobody"):
        answer = dispatch_request(parts, instance_id, token)
        assert isinstance(answer, Response) and answer.status == 404
        assert json.loads(answer.body)["error"]["code"] == "INSTANCE_NOT_FOUND"


def test_cached_metric_children_count_as_labels_did() -> None:
    metrics = MeshMetrics()
    codes = [None, "ok", "OK", "DEADLINE_EXCEEDED", "deadline_exceeded", "NEW_CODE", None]
    for transport, code in itertools.product(("ws", "callback"), codes):
        metrics.dispatch_finished(transport, code, 0.01)
    with pytest.raises(ValueError, match="transport"):
        metrics.dispatch_finished("carrier-pigeon", None, 0.01)
    assert ("carrier-pigeon", "ok") not in metrics._finished  # bad labels are never kept
    text = metrics.render()[1].decode()
    for transport in ("ws", "callback"):
        assert (f'svantic_dispatches_total{{outcome="ok",transport="{transport}"}} 4.0'
                in text)
        assert (f'svantic_dispatches_total{{outcome="deadline_exceeded",transport='
                f'"{transport}"}} 2.0' in text)
        assert (f'svantic_dispatches_total{{outcome="other",transport="{transport}"}} 1.0'
                in text)
        assert f'svantic_dispatch_latency_seconds_count{{transport="{transport}"}} 7.0' in text
    assert len(metrics._finished) == 6  # two transports by three labels

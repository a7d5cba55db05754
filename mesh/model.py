"""The records the mesh's parts share: a registered instance, a routing lease, and the
errors a route can end in (spec 6).

Kept apart so the registry, the router and the control plane agree on one shape without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONNECTION_STATUSES",
    "POLICY_MODES",
    "ROUTING_STATUSES",
    "InstanceRow",
    "Lease",
    "RegistryError",
    "RouteError",
]

ROUTING_STATUSES = ("unknown", "available", "busy", "unhealthy", "offline")
"""Seed 001: `unknown` and `available` are routable, the others are not."""
CONNECTION_STATUSES = ("unknown", "online", "healthy", "degraded", "offline")
POLICY_MODES = ("open", "allow-list", "audit")


@dataclass(slots=True)
class InstanceRow:
    """One registered instance as the registry stores it (seed 004 register body).

    The shared secret itself is never here: the registry keeps it encrypted and hands it out
    only through `Registry.instance_secret()`; `has_secret` says whether one is stored.
    """

    instance_id: str
    tenant_id: str
    agent_type: str
    deployment_mode: str  # "connected" | "hosted"
    url: str | None = None
    dispatch_auth_type: str = "svantic_jwt"  # "svantic_jwt" | "shared_secret"
    credentials_ref: str | None = None
    agent_card: dict[str, Any] | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    mcp_servers: dict[str, Any] | None = None
    max_concurrent_sessions: int = 0  # 0: unlimited
    routing_status: str = "unknown"
    connection_status: str = "unknown"
    last_heartbeat_at: float | None = None  # wall-clock seconds
    last_dispatch_error: dict[str, Any] | None = None  # {code, message, at}
    registered_at: float = 0.0
    has_secret: bool = False

    def capabilities(self) -> list[str]:
        """Capability names this instance declared: its `tools[*].name` and its card's
        `skills[*].id` / `capabilities[*].name` (what an A2A card lists)."""
        names: list[str] = []
        for tool in self.tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if isinstance(name, str) and name and name not in names:
                names.append(name)
        card = self.agent_card or {}
        for key, attr in (("skills", "id"), ("capabilities", "name")):
            items = card.get(key)
            if isinstance(items, list):
                for item in items:
                    name = item.get(attr) if isinstance(item, dict) else None
                    if isinstance(name, str) and name and name not in names:
                        names.append(name)
        return names


@dataclass(frozen=True, slots=True)
class Lease:
    """One unit of an instance's capacity, taken by `Router.acquire` for one dispatch and
    given back once with `Router.release`."""

    lease_id: int
    instance_id: str
    tenant_id: str
    agent_type: str
    deployment_mode: str


class RegistryError(Exception):
    """The registry cannot do what was asked: an unknown schema, a damaged file, a
    conflicting write, or its database out of reach. Defined here, beside the records'
    shapes, so that code which only handles it (the fleet) needs no database module."""


class RouteError(Exception):
    """A dispatch that cannot be routed or did not complete, with its spec 6 status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message

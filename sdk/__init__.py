"""svantic: the agent SDK on top of svantic-proto.

Define an agent and its capabilities, then put it on a mesh in one line::

    import svantic

    agent = svantic.Agent(agent_type="tickets", description="Ticket system")

    @agent.capability("get_ticket", parameters={"type": "object",
                                                "required": ["ticket_id"]})
    async def get_ticket(args, ctx):
        return {"id": args["ticket_id"]}

    agent.run(svantic_url="https://mesh.example:8443")   # or: await agent.start(...)

`Agent` holds the capabilities (arguments checked against their JSON Schema before a
handler runs), `MeshConnector` the connection (token, registration, the WebSocket or the
hosted server, token renewal, sessions), `svantic.errors` the control plane's errors.
"""

from __future__ import annotations

from .agent import Agent, CapabilitySpec, Context
from .connector import DEFAULT_SVANTIC_URL, GeventMeshConnector, MeshConnector
from .errors import (
    AgentCardProbeFailedError,
    AgentDisconnectedError,
    AgentTypeNotAllowedError,
    AgentUnavailableError,
    AgentUnhealthyError,
    DeadlineExceededError,
    DeploymentModeMismatchError,
    InstanceNotFoundError,
    InvalidRequestError,
    NotConnectedError,
    SvanticApiError,
    TenantMismatchError,
    UnauthorizedError,
)

__all__ = [
    "DEFAULT_SVANTIC_URL",
    "Agent",
    "AgentCardProbeFailedError",
    "AgentDisconnectedError",
    "AgentTypeNotAllowedError",
    "AgentUnavailableError",
    "AgentUnhealthyError",
    "CapabilitySpec",
    "Context",
    "DeadlineExceededError",
    "DeploymentModeMismatchError",
    "GeventMeshConnector",
    "InstanceNotFoundError",
    "InvalidRequestError",
    "MeshConnector",
    "NotConnectedError",
    "SvanticApiError",
    "TenantMismatchError",
    "UnauthorizedError",
]

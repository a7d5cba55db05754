"""The agent card a hosted agent serves at `GET /.well-known/agent-card.json` (spec 8).

The mesh probes the card when a hosted agent registers and routes by its `skills[*].id`
(`svantic_mesh.model.InstanceRow.capabilities`), so each capability is one skill whose id is
the capability's name. The card is an A2A AgentCard so that A2A tooling can read it too:

* the A2A 1.0 fields (`name`, `description`, `version`, `supportedInterfaces`, `capabilities`,
  `defaultInputModes`, `defaultOutputModes`, `skills` with `id`, `name`, `description`,
  `tags`), in 1.0's camelCase JSON;
* the 0.3 fields `url` and `preferredTransport`, which 1.0 replaced by `supportedInterfaces`,
  so readers of 0.3 find the endpoint too (1.0 readers ignore them, as a2a-sdk does);
* the capabilities' JSON Schemas, which A2A skills have no field for, in an A2A extension of
  ours (`capabilities.extensions[]`: `uri`, `description`, `required`, `params`), so that
  nothing of the card's standard shape is bent to carry them.

The interface is not one of A2A's own bindings (JSON-RPC, gRPC, HTTP+JSON): the mesh POSTs the
svantic.v1 dispatch payload to `{url}/send`. A2A 1.0 asks custom bindings to name themselves
with a URI in `protocolBinding` (its "custom protocol bindings" topic), so an A2A client that
does not know the binding skips the interface rather than sending it JSON-RPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "A2A_PROTOCOL_VERSION",
    "CAPABILITY_SCHEMAS_EXTENSION",
    "HOSTED_BINDING",
    "agent_card",
]

HOSTED_BINDING = "https://svantic.dev/bindings/hosted/v1"
"""`protocolBinding` (1.0) and `preferredTransport` (0.3) of the `/send` interface."""
CAPABILITY_SCHEMAS_EXTENSION = "https://svantic.dev/extensions/capability-schemas/v1"
"""The extension whose `params.schemas` maps each capability to its arguments' JSON Schema."""
A2A_PROTOCOL_VERSION = "1.0"
_JSON = "application/json"
_ANY_ARGUMENTS: Mapping[str, Any] = {"type": "object"}
"""The schema of a capability defined without one: any JSON object of arguments."""


def _capabilities(agent: Any) -> list[tuple[str, str, Mapping[str, Any] | None]]:
    """(name, description, parameters) of each capability, in definition order.

    Read from `agent.registry` (the `svantic_proto` `CapabilityRegistry` the transports run),
    or from the registry itself when one is passed: the card describes exactly what `/send`
    will resolve, never a second list that could drift from it."""
    registry = getattr(agent, "registry", agent)
    table = getattr(registry, "capabilities", None)
    if not isinstance(table, Mapping):
        raise TypeError("agent_card needs an svantic Agent or a CapabilityRegistry")
    return [(name, str(getattr(cap, "description", "") or ""), getattr(cap, "parameters", None))
            for name, cap in table.items()]


def agent_card(agent: Any, url: str, *, name: str | None = None,
               description: str | None = None, version: str | None = None) -> dict[str, Any]:
    """The card of `agent` (an `svantic.Agent`) served at the base `url` (`https://...`, where
    `/send` and the card live). `name`, `description` and `version` default to the agent's
    `agent_type`, `description` and `version`.

    A JSON object of plain types: encode it with any JSON encoder. Built anew on each call,
    since capabilities may change while the agent runs (`MeshConnector.re_register`)."""
    capabilities = _capabilities(agent)
    agent_type = str(name or getattr(agent, "agent_type", None) or "svantic-agent")
    text = description or getattr(agent, "description", None) or f"svantic agent {agent_type}"
    card_version = str(version or getattr(agent, "version", None) or "0.0.0")
    base = url.rstrip("/")
    skills = [{
        "id": cap_name,
        "name": cap_name,
        # A2A requires a description; a capability defined without one is named instead.
        "description": cap_description or f"the {cap_name} capability of {agent_type}",
        "tags": ["svantic", agent_type],
        "inputModes": [_JSON],
        "outputModes": [_JSON],
    } for cap_name, cap_description, _ in capabilities]
    schemas = {cap_name: dict(parameters) if parameters is not None else dict(_ANY_ARGUMENTS)
               for cap_name, _, parameters in capabilities}
    return {
        "name": agent_type,
        "description": str(text),
        "version": card_version,
        "supportedInterfaces": [{
            "url": base, "protocolBinding": HOSTED_BINDING,
            "protocolVersion": A2A_PROTOCOL_VERSION,
        }],
        "capabilities": {
            "streaming": True,  # `Accept: text/event-stream` on /send streams chunks
            "pushNotifications": False,
            "extensions": [{
                "uri": CAPABILITY_SCHEMAS_EXTENSION,
                "description": "JSON Schema of each capability's arguments, by skill id",
                "required": False,
                "params": {"schemas": schemas},
            }],
        },
        "defaultInputModes": [_JSON],
        "defaultOutputModes": [_JSON],
        "skills": skills,
        # A2A 0.3 readers: the endpoint before `supportedInterfaces` existed.
        "url": base,
        "preferredTransport": HOSTED_BINDING,
    }

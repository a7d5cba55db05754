"""Every state of the two connection machines and every legal move between them.

One place for the rules (as h11's `_state.py`): the connections call
`transition()` and never assign a state directly, and the Mermaid diagram in
docs/state-machines.md is generated from these tables (a test fails when the
two drift apart).
"""

from __future__ import annotations

import enum

from .errors import LocalProtocolError

__all__ = [
    "AgentState",
    "MeshState",
    "AGENT_TRANSITIONS",
    "MESH_TRANSITIONS",
    "transition",
    "mermaid_diagram",
]


class AgentState(enum.Enum):
    CONNECTING = "connecting"
    """Upgrade request sent, waiting for the 101 (spec 1)."""
    HELLO_SENT = "hello_sent"
    """Upgraded, hello sent, waiting for welcome."""
    READY = "ready"
    """Welcome seen: dispatches flow."""
    DRAINING = "draining"
    """A close_request was sent: in-flight work finishes, then close 1000."""
    CLOSING = "closing"
    """Our close frame is sent, waiting for the peer's."""
    CLOSED = "closed"


class MeshState(enum.Enum):
    HANDSHAKE = "handshake"
    """Reading the upgrade request."""
    UPGRADE_PENDING = "upgrade_pending"
    """The application decides: accept() or reject()."""
    AWAITING_HELLO = "awaiting_hello"
    """101 sent; hello must come first, within the hello timeout."""
    READY = "ready"
    DRAINING = "draining"
    CLOSING = "closing"
    CLOSED = "closed"


# state -> {input: next state}. Inputs are named after what happens, not who does it.
AGENT_TRANSITIONS: dict[AgentState, dict[str, AgentState]] = {
    AgentState.CONNECTING: {
        "upgrade_accepted": AgentState.HELLO_SENT,
        "upgrade_rejected": AgentState.CLOSED,
        "transport_lost": AgentState.CLOSED,
    },
    AgentState.HELLO_SENT: {
        "welcome": AgentState.READY,
        "send_close": AgentState.CLOSING,
        "peer_close": AgentState.CLOSED,
        "transport_lost": AgentState.CLOSED,
    },
    AgentState.READY: {
        "send_close_request": AgentState.DRAINING,
        "send_close": AgentState.CLOSING,
        "peer_close": AgentState.CLOSED,
        "transport_lost": AgentState.CLOSED,
    },
    AgentState.DRAINING: {
        "send_close": AgentState.CLOSING,
        "peer_close": AgentState.CLOSED,
        "transport_lost": AgentState.CLOSED,
    },
    AgentState.CLOSING: {
        "peer_close": AgentState.CLOSED,
        "transport_lost": AgentState.CLOSED,
    },
    AgentState.CLOSED: {},
}

MESH_TRANSITIONS: dict[MeshState, dict[str, MeshState]] = {
    MeshState.HANDSHAKE: {
        "upgrade_requested": MeshState.UPGRADE_PENDING,
        "handshake_refused": MeshState.CLOSED,
        "http_request": MeshState.CLOSED,
        "transport_lost": MeshState.CLOSED,
    },
    MeshState.UPGRADE_PENDING: {
        "accept": MeshState.AWAITING_HELLO,
        "reject": MeshState.CLOSED,
        "transport_lost": MeshState.CLOSED,
    },
    MeshState.AWAITING_HELLO: {
        "hello": MeshState.READY,
        "send_close": MeshState.CLOSING,
        "peer_close": MeshState.CLOSED,
        "transport_lost": MeshState.CLOSED,
    },
    MeshState.READY: {
        "send_close_request": MeshState.DRAINING,
        "send_close": MeshState.CLOSING,
        "peer_close": MeshState.CLOSED,
        "transport_lost": MeshState.CLOSED,
    },
    MeshState.DRAINING: {
        "send_close": MeshState.CLOSING,
        "peer_close": MeshState.CLOSED,
        "transport_lost": MeshState.CLOSED,
    },
    MeshState.CLOSING: {
        "peer_close": MeshState.CLOSED,
        "transport_lost": MeshState.CLOSED,
    },
    MeshState.CLOSED: {},
}


def transition(
    table: dict[AgentState, dict[str, AgentState]] | dict[MeshState, dict[str, MeshState]],
    state: AgentState | MeshState,
    what: str,
) -> AgentState | MeshState:
    """The next state, or LocalProtocolError when `what` is not legal in `state`."""
    moves: dict[str, AgentState | MeshState] = table[state]  # type: ignore[index, assignment]
    try:
        return moves[what]
    except KeyError:
        raise LocalProtocolError(f"cannot {what.replace('_', ' ')} in state {state.name}") from None


def mermaid_diagram(
    table: dict[AgentState, dict[str, AgentState]] | dict[MeshState, dict[str, MeshState]],
) -> str:
    """A Mermaid `stateDiagram-v2` drawn from a transition table."""
    lines = ["stateDiagram-v2"]
    states = list(table)
    lines.append(f"    [*] --> {states[0].name}")
    for state, moves in table.items():
        for what, target in moves.items():
            lines.append(f"    {state.name} --> {target.name}: {what}")
    lines.append(f"    {states[-1].name} --> [*]")
    return "\n".join(lines) + "\n"

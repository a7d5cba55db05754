"""A svantic.v1 mesh endpoint inside a python-websockets server, in message mode.

python-websockets answers the HTTP upgrade, frames the messages, sends the WebSocket pings
and runs the closing handshake. `MeshMessages` makes every svantic.v1 decision: the spec 1
checks and their JSON refusals, hello/welcome, dispatches, liveness and close codes. The
agents are kept in a dict in this process; each connection has one timer.

    python examples/websockets_mesh.py CERTFILE KEYFILE
    # serves wss://127.0.0.1:8443/agents/connect (token "demo-token", instance "echo-1"),
    # waits for the agent, dispatches `echo` once and prints the result
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from svantic_proto import (
    Config,
    DispatchAuthMinter,
    DispatchCompleted,
    DispatchError,
    DispatchFailed,
    DispatchTimedOut,
    Event,
    InstanceRecord,
    SessionStarted,
    UpgradeRequest,
    check_upgrade,
    jwt_dispatch_auth,
)
from svantic_proto import ConnectionClosed as Closed
from svantic_proto.handshake import Reject
from svantic_proto.mesh import MintDispatchAuth
from svantic_proto.messages import Close, MeshMessages, UpgradeAccepted, UpgradeRefused


class Link:
    """One agent's WebSocket: `read()` runs in the handler's task, `write()` in another."""

    def __init__(self, mesh: Mesh, ws: ServerConnection, messages: MeshMessages) -> None:
        self.mesh, self.ws, self.messages = mesh, ws, messages
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    def step(self) -> None:
        """After every call into `messages`: its events, its output, its one timer."""
        for event in self.messages.events_received():
            self.mesh.on_event(self, event)
        self.wake.set()
        if self.timer is not None:
            self.timer.cancel()
        deadline = self.messages.next_deadline()
        self.timer = None if deadline is None else self.loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        self.messages.handle_timer(self.loop.time())
        self.step()

    async def read(self) -> None:
        writer = asyncio.create_task(self.write())
        self.step()
        try:
            while True:
                message = await self.ws.recv()
                self.messages.receive_message(message, self.loop.time())
                self.step()
        except ConnectionClosed as closed:  # python-websockets answered the peer's close
            if closed.rcvd is None:
                self.messages.receive_eof(self.loop.time())
            else:
                self.messages.receive_close(
                    closed.rcvd.code, closed.rcvd.reason, now=self.loop.time()
                )
            self.step()
        finally:
            if self.timer is not None:
                self.timer.cancel()
            writer.cancel()

    async def write(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.wake.wait()
                self.wake.clear()
                for item in self.messages.messages_to_send():
                    if isinstance(item, str):
                        await self.ws.send(item)
                    elif isinstance(item, Close):  # always the last item
                        if item.code is None:
                            self.ws.transport.abort()
                        else:
                            await self.ws.close(item.code, item.reason)
                        return


@dataclass
class Mesh:
    """The endpoint: spec 1 before the upgrade, then one `Link` per agent, and dispatches."""

    verify_token: Callable[[str], Any]  # transport JWT -> claims with tenant_id, or raise
    lookup_instance: Callable[[str], InstanceRecord | None]
    dispatch_auth: MintDispatchAuth
    config: Config = field(default_factory=Config)

    def __post_init__(self) -> None:
        self.agents: dict[str, Link] = {}  # instance id -> its live link
        self.arrived = asyncio.Event()
        self._upgrades: weakref.WeakKeyDictionary[ServerConnection, MeshMessages] = (
            weakref.WeakKeyDictionary()
        )
        self._waiters: dict[str, asyncio.Future[Any]] = {}

    def serve(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> Server:
        """The python-websockets server: `async with mesh.serve(...) as server:`."""
        return serve(
            self._handler, host, port, ssl=ssl_context,
            process_request=self._process_request, select_subprotocol=self._select_subprotocol,
            compression=None, max_size=self.config.max_message_bytes,
            ping_interval=self.config.ws_ping_interval,  # spec 4: the server's WebSocket pings
        )

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Spec 1, before the upgrade: accept, or answer the refusal's status and JSON body."""
        now = asyncio.get_running_loop().time()
        messages = MeshMessages(
            request.path, headers=request.headers.raw_items(), dispatch_auth=self.dispatch_auth,
            now=now, wall_clock=time.time, config=self.config,
        )
        for event in messages.events_received():
            if isinstance(event, UpgradeRequest):
                decision = check_upgrade(
                    event.request, verify_token=self.verify_token,
                    lookup_instance=self.lookup_instance,
                )
                if isinstance(decision, Reject):
                    messages.reject(decision, now=now)
                else:
                    messages.accept(decision, now=now)
        refused = messages.outcome
        if not isinstance(refused, UpgradeRefused):
            self._upgrades[connection] = messages
            return None  # python-websockets answers 101
        response = connection.respond(refused.status, refused.body.decode())
        del response.headers["Content-Type"]
        response.headers.update(refused.headers)  # application/json, and Upgrade on a 426
        return response

    def _select_subprotocol(
        self, connection: ServerConnection, offered: Any
    ) -> Subprotocol | None:
        outcome = self._upgrades[connection].outcome
        if isinstance(outcome, UpgradeAccepted) and outcome.subprotocol:
            return Subprotocol(outcome.subprotocol)
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        await Link(self, ws, self._upgrades.pop(ws)).read()

    def on_event(self, link: Link, event: Event) -> None:
        if isinstance(event, SessionStarted):
            self.agents[event.instance_id] = link
            self.arrived.set()
        elif isinstance(event, DispatchCompleted):
            self._settle(event.dispatch_id, event.result, None)
        elif isinstance(event, DispatchFailed):
            self._settle(event.dispatch_id, None, DispatchError(
                event.dispatch_id, event.code, event.message, event.detail))
        elif isinstance(event, DispatchTimedOut):
            self._settle(event.dispatch_id, None, DispatchError(
                event.dispatch_id, "DEADLINE_EXCEEDED", "the agent did not answer in time"))
        elif isinstance(event, Closed):
            instance_id = link.messages.connection.instance_id
            if instance_id is not None and self.agents.get(instance_id) is link:
                del self.agents[instance_id]

    def _settle(self, dispatch_id: str, result: Any, error: DispatchError | None) -> None:
        waiter = self._waiters.pop(dispatch_id, None)
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(result)
            else:
                waiter.set_exception(error)

    async def dispatch(
        self, instance_id: str, capability: str, arguments: dict[str, Any],
        *, deadline_ms: int = 30_000,
    ) -> Any:
        """Run `capability` on the agent; its result, or a `DispatchError`."""
        link = self.agents.get(instance_id)
        if link is None:
            raise DispatchError("", "AGENT_UNAVAILABLE", f"{instance_id} is not connected")
        dispatch_id = link.messages.send_dispatch(
            capability, arguments, deadline_ms=deadline_ms, now=link.loop.time()
        )
        waiter = self._waiters[dispatch_id] = link.loop.create_future()
        link.step()
        return await waiter

    async def wait_for_agent(self, instance_id: str) -> None:
        while instance_id not in self.agents:
            self.arrived.clear()
            await self.arrived.wait()


# -- run it --------------------------------------------------------------------------------------

DEMO_SECRET = "demo-signing-secret-change-me-0123456789"  # signs dispatch auth (spec 7)


@dataclass(frozen=True)
class DemoClaims:
    tenant_id: str
    sub: str


def demo_verify(token: str) -> DemoClaims | None:  # a real mesh verifies a JWT (spec 1)
    return DemoClaims("tenant-demo", "demo-client") if token == "demo-token" else None


DEMO_INSTANCES = {"echo-1": InstanceRecord("echo-1", "tenant-demo", "connected", "echo-agent")}


async def main(certfile: str, keyfile: str) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certfile, keyfile)
    mesh = Mesh(demo_verify, DEMO_INSTANCES.get, jwt_dispatch_auth(DispatchAuthMinter(DEMO_SECRET)))
    async with mesh.serve("127.0.0.1", 8443, tls) as server:
        print("listening on wss://127.0.0.1:8443/agents/connect", server.sockets[0].getsockname())
        await mesh.wait_for_agent("echo-1")
        print(await mesh.dispatch("echo-1", "echo", {"hello": "world"}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))

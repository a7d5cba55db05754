"""A svantic.v1 agent on python-websockets' client, in message mode, with an `echo` capability.

python-websockets opens the WebSocket, frames the messages, pings and runs the closing
handshake. `AgentMessages` makes every svantic.v1 decision: what the upgrade sends, what its
answer means, hello/welcome, dispatch auth, heartbeats, liveness, close codes, resume, and
which ends are retried (spec 5).

    python examples/websockets_agent.py wss://127.0.0.1:8443/agents/connect CAFILE
    # token "demo-token", instance "echo-1": see examples/websockets_mesh.py
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from svantic_proto import (
    AgentSession,
    AgentState,
    Config,
    DispatchAuthVerifier,
    DispatchReceived,
    RetryDecision,
)
from svantic_proto import ConnectionClosed as Closed
from svantic_proto.messages import AgentMessages, Close


class Link:
    """One connection: `run()` reads in this task and writes in another, with one timer."""

    def __init__(self, ws: ClientConnection, messages: AgentMessages) -> None:
        self.ws, self.messages = ws, messages
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None
        self.closed: Closed | None = None

    def step(self) -> None:
        """After every call into `messages`: its events, its output, its one timer."""
        for event in self.messages.events_received():
            if isinstance(event, DispatchReceived) and event.capability == "echo":
                self.messages.send_result(event.dispatch_id, dict(event.arguments))
            elif isinstance(event, DispatchReceived):
                self.messages.send_error(event.dispatch_id, "CAPABILITY_NOT_FOUND")
            elif isinstance(event, Closed):
                self.closed = event
        self.wake.set()
        if self.timer is not None:
            self.timer.cancel()
        deadline = self.messages.next_deadline()
        self.timer = None if deadline is None else self.loop.call_at(deadline, self.on_timer)

    def on_timer(self) -> None:
        self.messages.handle_timer(self.loop.time())
        self.step()

    def stop(self) -> None:
        """Take no new dispatches, finish the running ones, then close 1000 (spec 3)."""
        if self.messages.state is AgentState.READY:
            self.messages.close_request(now=self.loop.time())
        elif self.messages.state is AgentState.HELLO_SENT:  # no session yet: nothing to drain
            self.messages.close(1000, "stopping", now=self.loop.time())
        self.step()

    async def run(self) -> None:
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


async def connect_once(
    url: str, session: AgentSession, *, token: str, instance_id: str,
    dispatch_auth: DispatchAuthVerifier, ssl_context: ssl.SSLContext | None,
    stop: asyncio.Event,
) -> Closed:
    """One connection, from the upgrade to its end; returns how it ended."""
    loop = asyncio.get_running_loop()
    config = session.config
    messages = AgentMessages(
        url, token=token, instance_id=instance_id, agent_type="echo-agent",
        capabilities=["echo"], dispatch_auth=dispatch_auth, session=session,
        now=loop.time(), wall_clock=time.time,
    )
    upgrade = messages.upgrade_request()
    try:
        ws = await connect(
            upgrade.url, ssl=ssl_context, additional_headers=upgrade.headers,
            subprotocols=[Subprotocol(p) for p in upgrade.subprotocols],
            compression=None, max_size=config.max_message_bytes,
            open_timeout=config.hello_timeout, proxy=None,
        )
    except InvalidStatus as refused:  # an HTTP answer: spec 1's status and JSON body
        response = refused.response
        messages.refused(response.status_code, bytes(response.body), now=loop.time())
    except (OSError, TimeoutError, InvalidHandshake):  # no answer, or not a WebSocket one
        messages.receive_eof(loop.time())
    else:
        messages.accepted(ws.subprotocol, now=loop.time())
        link = Link(ws, messages)
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: link.stop())
        try:
            await link.run()
        finally:
            stopping.cancel()
        if link.closed is not None:
            return link.closed
    (closed,) = [e for e in messages.events_received() if isinstance(e, Closed)]
    return closed


async def run_agent(
    url: str, *, token: str, instance_id: str, dispatch_auth: DispatchAuthVerifier,
    ssl_context: ssl.SSLContext | None, stop: asyncio.Event, config: Config | None = None,
) -> None:
    """Serve `echo` until `stop` is set, reconnecting as spec 5 says; raises a final refusal
    (such as `InstanceNotFound` for a 404)."""
    session = AgentSession(config)
    while not stop.is_set():
        closed = await connect_once(
            url, session, token=token, instance_id=instance_id, dispatch_auth=dispatch_auth,
            ssl_context=ssl_context, stop=stop,
        )
        if closed.retry is RetryDecision.FINAL:
            if closed.error is not None:
                raise closed.error
            return
        with contextlib.suppress(TimeoutError):  # the backoff delay, cut short by stop
            await asyncio.wait_for(stop.wait(), session.next_delay())


async def main(url: str, cafile: str) -> None:
    tls = ssl.create_default_context(cafile=cafile)
    secret = "demo-signing-secret-change-me-0123456789"  # the mesh's dispatch-auth key
    verifier = DispatchAuthVerifier("echo-1", hs256_keys=[secret])
    await run_agent(url, token="demo-token", instance_id="echo-1", dispatch_auth=verifier,
                    ssl_context=tls, stop=asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))

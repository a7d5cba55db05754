"""An agent in a process of its own for the scale-out tests: it registers (connected mode,
with a concurrency cap), connects to one mesh URL and serves until stdin closes.

  python agent_worker.py URL CA_FILE CLIENT_ID CLIENT_SECRET INSTANCE AGENT_TYPE CAP
  (SVANTIC_SIGNING_SECRET in the environment: the mesh's dispatch-auth secret)

It prints `ready` once connected, and `session resumed=<bool>` at every session start, so
a test sees a reconnect resume. `slow` counts how many of its calls run at once: `peak`
answers the most it ever saw (what the shared capacity must bound).
"""

from __future__ import annotations

import os
import ssl
import sys
from typing import Any

import anyio
import httpx


def register(url: str, ca: str, client_id: str, secret: str, *, instance: str,
             agent_type: str, cap: int, capabilities: list[str]) -> tuple[str, str]:
    with httpx.Client(verify=ssl.create_default_context(cafile=ca), trust_env=False,
                      timeout=20) as client:
        token = client.post(f"{url}/auth/token", json={
            "client_id": client_id, "client_secret": secret}).raise_for_status().json()
        answer = client.post(f"{url}/agents/register", headers={
            "authorization": f"Bearer {token['access_token']}"}, json={
            "agent_type": agent_type, "instance_id": instance,
            "max_concurrent_sessions": cap,
            "tools": [{"name": name} for name in capabilities]}).raise_for_status().json()
    return token["access_token"], answer["connect_url"]


CAPABILITIES = ["echo", "count", "slow", "peak", "ask"]


def main() -> int:
    url, ca, client_id, secret, instance, agent_type, cap = sys.argv[1:8]
    from svantic_adapters import asyncio as adapter

    from svantic_proto import DispatchAuthVerifier
    from svantic_proto.events import SessionStarted

    token, connect_url = register(url, ca, client_id, secret, instance=instance,
                                  agent_type=agent_type, cap=int(cap),
                                  capabilities=CAPABILITIES)
    # Dial where we were told (a load balancer may stand in front of the meshes), on the
    # path the mesh answered.
    path = connect_url.split("://", 1)[1].split("/", 1)[1]
    connect_url = f"{url.replace('https://', 'wss://', 1)}/{path}"
    signing = os.environ["SVANTIC_SIGNING_SECRET"]
    running = {"now": 0, "peak": 0}

    async def run() -> None:
        agent = adapter.Agent(
            connect_url, token=token, instance_id=instance, agent_type=agent_type,
            dispatch_auth=DispatchAuthVerifier(instance, hs256_keys=[signing]),
            ssl_context=ssl.create_default_context(cafile=ca))

        def on_event(event: Any) -> None:
            if isinstance(event, SessionStarted):
                print(f"session resumed={event.resumed}", flush=True)

        agent.on_event = on_event

        @agent.capability("echo")
        async def echo(args: Any, ctx: Any) -> Any:
            return {"echo": args, "instance": instance}

        @agent.capability("count")
        async def count(args: Any, ctx: Any) -> Any:
            for n in range(int(args.get("to", 3))):
                ctx.chunk(n)
            return {"counted": int(args.get("to", 3)), "instance": instance}

        @agent.capability("slow")
        async def slow(args: Any, ctx: Any) -> Any:
            print(f"slow {ctx.dispatch_id} attempt={ctx.attempt}", flush=True)
            running["now"] += 1
            running["peak"] = max(running["peak"], running["now"])
            try:
                await anyio.sleep(float(args.get("ms", 100)) / 1000)
            finally:
                running["now"] -= 1
            return {"slept": args.get("ms", 100), "instance": instance,
                    "attempt": ctx.attempt}

        @agent.capability("peak")
        async def peak(args: Any, ctx: Any) -> Any:
            return {"peak": running["peak"]}

        @agent.capability("ask")
        async def ask(args: Any, ctx: Any) -> Any:
            return {"asked": await ctx.call_tool("echo", {"from": instance},
                                                 instance_id=args.get("instance_id"))}

        async with agent:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)

    anyio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An agent in a process of its own, as a user would run one next to `svantic mesh`.

It gets a token from the mesh, registers its instance (connected mode), connects with an
adapter and serves a few capabilities until it is told to stop (stdin closes). Prints
`ready` once connected. Used by tests/mesh/test_end_to_end.py.

  python agent_process.py URL CA_FILE CLIENT_ID CLIENT_SECRET INSTANCE AGENT_TYPE ADAPTER
  (SVANTIC_SIGNING_SECRET in the environment: the mesh's dispatch-auth secret)
"""

from __future__ import annotations

import os
import ssl
import sys
from typing import Any

import httpx


def register(url: str, ca: str, client_id: str, secret: str, *, instance: str,
             agent_type: str, capabilities: list[str]) -> tuple[str, str]:
    with httpx.Client(verify=ssl.create_default_context(cafile=ca), trust_env=False) as client:
        token = client.post(f"{url}/auth/token", json={
            "client_id": client_id, "client_secret": secret}).raise_for_status().json()
        answer = client.post(f"{url}/agents/register", headers={
            "authorization": f"Bearer {token['access_token']}"}, json={
            "agent_type": agent_type, "instance_id": instance,
            "tools": [{"name": name} for name in capabilities]}).raise_for_status().json()
    return token["access_token"], answer["connect_url"]


def define(agent: Any, blocking: bool) -> None:
    def echo(args: Any, ctx: Any) -> Any:
        return {"echo": args, "instance": agent.instance_id}

    def count(args: Any, ctx: Any) -> Any:
        for n in range(int(args.get("to", 3))):
            ctx.chunk(n)
        return {"counted": int(args.get("to", 3))}

    def fail(args: Any, ctx: Any) -> Any:
        raise RuntimeError("internal detail that must not leak")

    if blocking:
        def ask(args: Any, ctx: Any) -> Any:
            return {"asked": ctx.call_tool("echo", {"from": agent.instance_id},
                                           agent_type=args.get("agent_type"))}

        def loop(args: Any, ctx: Any) -> Any:
            return ctx.call_tool("loop", {})
    else:
        async def ask(args: Any, ctx: Any) -> Any:  # type: ignore[misc]
            return {"asked": await ctx.call_tool("echo", {"from": agent.instance_id},
                                                 agent_type=args.get("agent_type"))}

        async def loop(args: Any, ctx: Any) -> Any:  # type: ignore[misc]
            return await ctx.call_tool("loop", {})

    for name, handler in (("echo", echo), ("count", count), ("fail", fail), ("ask", ask),
                          ("loop", loop)):
        if blocking:
            agent.capability(name)(handler)
        else:
            async def wrapped(args: Any, ctx: Any, handler: Any = handler) -> Any:
                result = handler(args, ctx)
                if hasattr(result, "__await__"):
                    result = await result
                return result
            agent.capability(name)(wrapped)


CAPABILITIES = ["echo", "count", "fail", "ask", "loop"]


def main() -> int:
    url, ca, client_id, secret, instance, agent_type, adapter = sys.argv[1:8]
    signing = os.environ["SVANTIC_SIGNING_SECRET"]
    if adapter == "gevent":
        from gevent import monkey

        monkey.patch_all()
    from svantic_proto import DispatchAuthVerifier

    token, connect_url = register(url, ca, client_id, secret, instance=instance,
                                  agent_type=agent_type, capabilities=CAPABILITIES)
    context = ssl.create_default_context(cafile=ca)
    options: dict[str, Any] = {
        "token": token, "instance_id": instance, "agent_type": agent_type,
        "dispatch_auth": DispatchAuthVerifier(instance, hs256_keys=[signing]),
        "ssl_context": context}
    if adapter == "gevent":
        import gevent
        from svantic_adapters import gevent as module

        agent = module.Agent(connect_url, **options)
        define(agent, blocking=True)
        agent.start().wait_ready(20)
        print("ready", flush=True)
        gevent.get_hub().threadpool.spawn(sys.stdin.read).get()
        agent.stop()
        return 0
    import anyio

    module_name = "asyncio" if adapter == "asyncio" else "anyio"
    module = __import__(f"svantic_adapters.{module_name}", fromlist=["Agent"])

    async def run() -> None:
        agent = module.Agent(connect_url, **options)
        define(agent, blocking=False)
        async with agent:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)

    anyio.run(run, backend="trio" if adapter == "trio" else "asyncio")
    return 0


if __name__ == "__main__":
    sys.exit(main())

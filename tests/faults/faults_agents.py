"""Many agents in one process, for the fault and load tests: what a test counts lives here.

Two kinds, by the spec's `mode`:

* `sdk`: `count` agents built as users build them (`svantic.Agent` with a `MeshConnector`, on
  the `asyncio`, `anyio` or `gevent` adapter), each registering and dialling by itself;
* `raw`: `count` agents of the asyncio adapter (`svantic_adapters.asyncio.Agent`) registered
  by one shared control-plane client first, so that thousands fit in one process.

Every agent serves `work`: it counts its runs per dispatch id (a second run of one id is the
bug the no-loss test looks for), optionally sleeps `sleep` seconds, and returns
`{"k": k, "v": 3 * k + 1}`. On stdout, one line per event the tests wait on:
`run DISPATCH_ID` (when `tell` is in the arguments), `up INSTANCE fresh`,
`up INSTANCE resumed REPLAYED` (how many dispatches the resume re-delivered),
`down INSTANCE`, `rejected INSTANCE STATUS` (a refused handshake), `ready COUNT` once all
are connected, and on stdin's end `runs {JSON}` (dispatch id -> runs) before it exits.

  python faults_agents.py '{"mode": "sdk", "adapter": "gevent", "url": ..., "ca": ...,
      "client_id": ..., "client_secret": ..., "prefix": "a", "count": 8,
      "agent_type": "worker", "config": {...}}'
  (SVANTIC_SIGNING_SECRET in the environment: the mesh's dispatch-auth secret)
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import Counter
from typing import Any

SPEC: dict[str, Any] = json.loads(sys.argv[1])
if SPEC.get("adapter") == "gevent":
    from gevent import monkey

    monkey.patch_all()

RUNS: Counter[str] = Counter()
_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def started(args: Any, dispatch_id: str) -> None:
    RUNS[dispatch_id] += 1
    if args.get("tell"):
        say(f"run {dispatch_id}")


def value(args: Any) -> dict[str, Any]:
    k = int(args["k"])
    return {"k": k, "v": 3 * k + 1}


def on_event(instance: str) -> Any:
    from svantic_proto.errors import HandshakeRejected
    from svantic_proto.events import ConnectionClosed, SessionStarted

    def told(event: Any) -> None:
        if isinstance(event, SessionStarted):
            if event.resumed:
                say(f"up {instance} resumed {len(event.replayed_dispatches)}")
            else:
                say(f"up {instance} fresh")
        elif isinstance(event, ConnectionClosed):
            if isinstance(event.error, HandshakeRejected):
                say(f"rejected {instance} {event.error.status}")
            else:
                say(f"down {instance}")
    return told


def finish() -> None:
    say("runs " + json.dumps(dict(RUNS)))
    os._exit(0)  # the sockets die with the process; the tests want no drain here


def config() -> Any:
    from svantic_proto import Config

    return Config(**SPEC.get("config", {}))


def names() -> list[str]:
    return [f"{SPEC['prefix']}-{n}" for n in range(SPEC["count"])]


def sdk_options(instance: str) -> dict[str, Any]:
    return {"svantic_url": SPEC["url"], "client_id": SPEC["client_id"],
            "client_secret": SPEC["client_secret"], "instance_id": instance,
            "cafile": SPEC["ca"], "adapter": SPEC["adapter"], "config": config(),
            "signing_secret": os.environ["SVANTIC_SIGNING_SECRET"], "connect_timeout": 60.0}


def run_gevent() -> None:
    import gevent
    import svantic

    def start(instance: str) -> None:
        agent = svantic.Agent(SPEC["agent_type"])

        @agent.capability("work")
        def work(args: Any, ctx: Any) -> Any:
            started(args, ctx.dispatch_id)
            if args.get("sleep"):
                gevent.sleep(float(args["sleep"]))
            return value(args)

        connector = svantic.GeventMeshConnector(agent, **sdk_options(instance))
        connector.on_event = on_event(instance)
        connector.connect()

    gevent.joinall([gevent.spawn(start, name) for name in names()], raise_error=True)
    say(f"ready {SPEC['count']}")
    gevent.get_hub().threadpool.spawn(sys.stdin.read).get()
    finish()


async def run_sdk_async() -> None:
    """Each connector lives in a task of its own, which stays until the end: on anyio the
    transport's task group is the task's that called `connect()`."""
    import anyio
    import svantic

    connected = 0
    all_connected = anyio.Event()

    async def keep(instance: str) -> None:
        nonlocal connected
        agent = svantic.Agent(SPEC["agent_type"])

        @agent.capability("work")
        async def work(args: Any, ctx: Any) -> Any:
            started(args, ctx.dispatch_id)
            if args.get("sleep"):
                await anyio.sleep(float(args["sleep"]))
            return value(args)

        connector = svantic.MeshConnector(agent, **sdk_options(instance))
        connector.on_event = on_event(instance)
        await connector.connect()
        connected += 1
        if connected == SPEC["count"]:
            all_connected.set()
        await anyio.sleep_forever()  # until the process ends (finish)

    async with anyio.create_task_group() as group:
        for name in names():
            group.start_soon(keep, name)
        await all_connected.wait()
        say(f"ready {SPEC['count']}")
        await anyio.to_thread.run_sync(sys.stdin.read)
        finish()


async def run_raw() -> None:
    """Thousands of adapter agents: one control-plane client registers them (32 at a time),
    then they dial in waves of `wave` so that the first connect does not overrun the mesh's
    handshake cap (a reconnect storm later is the test's business)."""
    import asyncio
    import ssl

    import httpx
    from svantic_adapters.asyncio import Agent

    from svantic_proto import DispatchAuthVerifier

    context = ssl.create_default_context(cafile=SPEC["ca"])
    signing = os.environ["SVANTIC_SIGNING_SECRET"]
    limit = asyncio.Semaphore(32)
    async with httpx.AsyncClient(base_url=SPEC["url"], verify=context, trust_env=False,
                                 timeout=60) as http:
        grant = (await http.post("/auth/token", json={
            "client_id": SPEC["client_id"], "client_secret": SPEC["client_secret"]})).json()
        token = grant["access_token"]

        async def register(instance: str) -> str:
            async with limit:
                answer = await http.post("/agents/register", headers={
                    "authorization": f"Bearer {token}"}, json={
                    "agent_type": SPEC["agent_type"], "instance_id": instance,
                    "tools": [{"name": "work"}]})
            return str(answer.raise_for_status().json()["connect_url"])

        urls = await asyncio.gather(*(register(name) for name in names()))
    say("registered")
    agents = []
    for instance, url in zip(names(), urls, strict=True):
        agent = Agent(url, token=token, instance_id=instance, agent_type=SPEC["agent_type"],
                      dispatch_auth=DispatchAuthVerifier(instance, hs256_keys=[signing]),
                      ssl_context=context, config=config())

        async def work(args: Any, ctx: Any) -> Any:
            started(args, ctx.dispatch_id)
            if args.get("sleep"):
                await asyncio.sleep(float(args["sleep"]))
            return value(args)

        agent.add("work", work)
        agent.on_event = on_event(instance)
        agents.append(agent)
    tasks = []
    wave = int(SPEC.get("wave", 200))
    for start in range(0, len(agents), wave):
        batch = agents[start:start + wave]
        tasks += [asyncio.ensure_future(agent.run()) for agent in batch]
        await asyncio.wait_for(asyncio.gather(*(agent.ready.wait() for agent in batch)), 120)
    say(f"ready {SPEC['count']}")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finish()


def main() -> None:
    if SPEC["mode"] == "raw":
        import asyncio

        asyncio.run(run_raw())
    elif SPEC["adapter"] == "gevent":
        run_gevent()
    else:
        import anyio

        anyio.run(run_sdk_async, backend=SPEC.get("backend", "asyncio"))


if __name__ == "__main__":
    main()

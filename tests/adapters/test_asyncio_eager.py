"""The asyncio adapter runs a plain-function handler at once; every handler behaves as a task's.

Real TLS from trustme on 127.0.0.1. What a user relies on: a plain function answers with no
task; a coroutine handler runs in a task from its first line (`asyncio.timeout` and
`current_task()` work there, the dispatch's deadline cancels it); each handler has its own
copy of the context, as a task would.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trustme
from svantic_adapters.asyncio import Agent, DispatchError, MeshServer, connect

from svantic_proto import (
    DispatchAuthMinter,
    DispatchAuthVerifier,
    InstanceRecord,
    jwt_dispatch_auth,
)

SECRET = "eager-test-signing-secret-of-32+bytes"
TOKEN = "eager-transport-token"
INSTANCE = "eager-agent-1"
REQUEST = contextvars.ContextVar("REQUEST", default="unset")


class _Claims:
    tenant_id = "t-1"
    sub = "eager"
    exp = time.time() + 3600


@asynccontextmanager
async def mesh_and_agent(**handlers: Any) -> AsyncIterator[tuple[MeshServer, Agent]]:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    server = MeshServer(
        ssl_context=server_tls,
        verify_token=lambda token: _Claims() if token == TOKEN else None,
        lookup_instance=lambda i: InstanceRecord(i, "t-1", "connected", "eager-agent"),
        dispatch_auth=jwt_dispatch_auth(DispatchAuthMinter(SECRET)),
    )
    host, port = await server.start("127.0.0.1", 0)
    agent = connect(f"wss://{host}:{port}/agents/connect", token=TOKEN, instance_id=INSTANCE,
                    agent_type="eager-agent", ssl_context=client_tls,
                    dispatch_auth=DispatchAuthVerifier(INSTANCE, hs256_keys=[SECRET]))
    for name, handler in handlers.items():
        agent.add(name, handler)
    try:
        async with agent:
            await server.wait_for_agent(INSTANCE, timeout=10)
            yield server, agent
    finally:
        await server.close(grace=0)


def test_a_plain_function_handler_runs_without_a_task() -> None:
    tasks: list[asyncio.Task[Any] | None] = []

    def at_once(arguments: Any, context: Any) -> Any:
        tasks.append(asyncio.current_task())
        return arguments

    async def scenario() -> None:
        async with mesh_and_agent(at_once=at_once) as (server, agent):
            assert await server.dispatch(INSTANCE, "at_once", {"n": 1}) == {"n": 1}
            assert agent._handlers == {}

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert tasks == [None]


def test_a_coroutine_handler_is_in_a_task_from_its_first_line() -> None:
    """`async with asyncio.timeout(...)` first thing: it needs a task at once."""
    tasks: list[asyncio.Task[Any] | None] = []

    async def bounded(arguments: Any, context: Any) -> Any:
        tasks.append(asyncio.current_task())
        async with asyncio.timeout(arguments["seconds"]):
            await asyncio.sleep(arguments["sleep"])
            return "in time"

    async def scenario() -> None:
        async with mesh_and_agent(bounded=bounded) as (server, agent):
            assert await server.dispatch(
                INSTANCE, "bounded", {"seconds": 5, "sleep": 0}) == "in time"
            with pytest.raises(DispatchError, match="TimeoutError"):
                await server.dispatch(INSTANCE, "bounded", {"seconds": 0.01, "sleep": 60})
            assert agent._handlers == {}

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(tasks) == 2 and None not in tasks


def test_a_handler_that_waits_goes_on_in_a_task_and_its_deadline_cancels_it() -> None:

    async def waits(arguments: Any, context: Any) -> Any:
        await asyncio.sleep(0)
        assert asyncio.current_task() is not None  # the rest runs in a task
        if arguments.get("forever"):
            contexts.append(context)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
        return "done"

    seen: list[str] = []
    contexts: list[Any] = []

    async def scenario() -> None:
        async with mesh_and_agent(waits=waits) as (server, _):
            assert await server.dispatch(INSTANCE, "waits", {}) == "done"
            with pytest.raises(DispatchError):
                await server.dispatch(INSTANCE, "waits", {"forever": True}, deadline_ms=200)
            for _ in range(200):  # the agent's cancel follows the mesh's deadline
                if seen and contexts[0].cancelled:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert seen == ["cancelled"]
    assert contexts[0].cancelled  # DispatchContext.cancelled, as every adapter sets it


def test_each_handler_has_its_own_context() -> None:
    async def sets(arguments: Any, context: Any) -> Any:
        before = REQUEST.get()
        REQUEST.set(arguments["id"])
        await asyncio.sleep(0)
        return [before, REQUEST.get()]

    async def scenario() -> list[Any]:
        async with mesh_and_agent(sets=sets) as (server, _):
            return list(await asyncio.gather(
                *(server.dispatch(INSTANCE, "sets", {"id": f"r{i}"}) for i in range(3))))

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [
        ["unset", "r0"], ["unset", "r1"], ["unset", "r2"]]
    assert REQUEST.get() == "unset"


def test_a_coroutine_handler_cancelled_before_its_task_first_ran_answers_cancelled() -> None:
    """Started eagerly from a loop callback, then cancelled in the same pass."""
    from svantic_adapters._tasks import start_handler

    started: list[asyncio.Task[Any] | None] = []

    async def waits(arguments: Any, context: Any) -> Any:
        started.append(asyncio.current_task())
        await asyncio.sleep(60)

    async def scenario() -> list[tuple[Any, ...]]:
        answers: list[tuple[Any, ...]] = []
        loop = asyncio.get_running_loop()
        begun: asyncio.Future[asyncio.Task[None] | None] = loop.create_future()

        def from_a_callback() -> None:  # as the read callback does: no task is current
            task = start_handler(waits, {}, None, lambda *answer: answers.append(answer))
            assert task is not None
            task.cancel()
            begun.set_result(task)

        loop.call_soon(from_a_callback)
        task = await begun
        assert task is not None and started == [task]
        await asyncio.wait([task], timeout=5)
        return answers

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [("cancelled",)]


def test_a_coroutine_handler_that_answers_at_once_answers_before_start_handler_returns() -> None:
    """Eagerly, in its task: the answer joins the write of the read it came from."""
    from svantic_adapters._tasks import start_handler

    async def at_once(arguments: Any, context: Any) -> Any:
        return [arguments, asyncio.current_task() is not None]

    async def scenario() -> tuple[Any, list[tuple[Any, ...]]]:
        answers: list[tuple[Any, ...]] = []
        loop = asyncio.get_running_loop()
        returned: asyncio.Future[Any] = loop.create_future()

        def from_a_callback() -> None:
            task = start_handler(at_once, {"n": 1}, None, lambda *answer: answers.append(answer))
            returned.set_result((task, list(answers)))

        loop.call_soon(from_a_callback)
        return await returned, answers

    (task, answers_then), answers = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert task is None
    assert answers_then == answers == [("send_result", [{"n": 1}, True])]


def test_a_coroutine_handler_started_from_a_task_runs_in_a_task_of_its_own() -> None:
    """One task may not step another: from inside a task, the handler's task starts later."""
    from svantic_adapters._tasks import start_handler

    async def handler(arguments: Any, context: Any) -> Any:
        return asyncio.current_task()

    async def scenario() -> None:
        answers: list[tuple[Any, ...]] = []
        task = start_handler(handler, {}, None, lambda *answer: answers.append(answer))
        assert task is not None and answers == []  # not run inside this task
        await asyncio.wait([task], timeout=5)
        assert answers == [("send_result", task)]
        assert task is not asyncio.current_task()

    asyncio.run(asyncio.wait_for(scenario(), 30))

"""The demo agent: one capability for each thing a svantic agent does.

    svantic mesh            # prints its local CA file and a development client's id and secret
    svantic agent examples.demo_agent:agent --cafile CA --client-id ID --client-secret SECRET
    svantic call echo '{"hello": "world"}' --ca CA --client-id ID --client-secret SECRET
    svantic call count '{"n": 3}' --stream ...

(from the repository's root; SVANTIC_SIGNING_SECRET, the mesh's dispatch-auth secret, in the
agent's environment). `echo` answers, `count` streams, `fail` fails, `sleep` can be cancelled
and `ask` calls another agent's `echo` through the mesh.

The handlers are plain functions, so the same file runs on every adapter (`--adapter
asyncio|anyio|trio|gevent`): the async adapters run a plain handler in a worker thread (its
`ctx.chunk` and `ctx.tool_call` reach the loop from there), gevent in a greenlet of its own.
An `async def` handler is as welcome on asyncio and trio.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import svantic

agent = svantic.Agent(agent_type="demo", description="The svantic demo agent", version="0.1.0")


@agent.capability(parameters={"type": "object"})
def echo(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
    """Return the arguments as they came."""
    return dict(args)


@agent.capability(parameters={
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 10_000}},
    "required": ["n"],
    "additionalProperties": False,
})
def count(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
    """Stream {"i": k} for k in 0..n-1, then return {"count": n}."""
    n = args["n"]
    for k in range(n):
        ctx.chunk({"i": k})
    return {"count": n}


@agent.capability(parameters={
    "type": "object",
    "properties": {"message": {"type": "string"}},
    "required": ["message"],
})
def fail(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
    """Raise with `message`: the caller gets DISPATCH_FAILED, the agent's log the traceback."""
    raise RuntimeError(args["message"])


@agent.capability(parameters={
    "type": "object",
    "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 3600}},
    "required": ["seconds"],
    "additionalProperties": False,
})
def sleep(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
    """Wait `seconds`, or less: a `cancel` or the deadline ends the wait within 50 ms."""
    until = time.monotonic() + args["seconds"]
    while (left := until - time.monotonic()) > 0:
        if ctx.cancelled:  # the mesh cancelled the dispatch, or its deadline passed
            return {"slept": round(args["seconds"] - left, 3), "cancelled": True}
        time.sleep(min(left, 0.05))
    return {"slept": args["seconds"]}


@agent.capability(parameters={
    "type": "object",
    "properties": {
        "agent_type": {"type": "string", "description": "whose echo to call (default: any)"},
        "message": {"description": "what to send it"},
    },
    "additionalProperties": False,
})
def ask(args: Mapping[str, Any], ctx: svantic.Context) -> Any:
    """Call `echo` on another agent through the mesh (a tool call) and return its answer."""
    answer = ctx.tool_call("echo", {"message": args.get("message", "hello")},
                                 agent_type=args.get("agent_type"))
    return {"asked": args.get("agent_type"), "answer": answer}

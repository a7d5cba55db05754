"""Handlers as asyncio tasks, for the asyncio adapter and the anyio adapter on the asyncio
backend: a plain function answers at once, a coroutine runs in a task of its own from its
first line, started eagerly, and a capability marked `blocking` runs in the loop's default
executor (a worker thread), its `chunk` and `call_tool` handed back to the loop's thread."""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from svantic_proto.agent_runtime import StartHandler

__all__ = ["loop_portal", "spawn_handler", "start_handler", "start_in_thread"]


def start_handler(handler: Callable[..., Any], arguments: Any, context: Any,
                  answer: Callable[..., None]) -> asyncio.Task[None] | None:
    """Run a handler as a task would, in its own copy of the context; returns the task while
    it runs.

    A plain function is called here and answered at once: no task, no extra loop pass. A
    coroutine runs in a task from its first line (`asyncio.timeout`, `current_task()` and
    cancellation need one), started eagerly as Python 3.12's `eager_start` does: one that
    answers without waiting answers in this pass, in the write of the read it came from.
    """
    handler_context = contextvars.copy_context()
    try:
        result = handler_context.run(handler, arguments, context)
    except Exception as exc:  # a handler failure is the dispatch's failure, not ours
        answer("raised", exc)
        return None
    if not inspect.isawaitable(result):
        answer("send_result", result)
        return None
    loop = asyncio.get_running_loop()
    runner = finish_handler(result, answer)
    if sys.version_info >= (3, 12):
        task = asyncio.Task(runner, loop=loop, context=handler_context, eager_start=True)
    elif asyncio.current_task(loop) is not None:  # one task may not step another
        task = loop.create_task(runner, context=handler_context)
    else:
        eager = _EagerStart(runner)
        task = loop.create_task(eager, context=handler_context)
        handler_context.run(eager.first_step, loop, task)
        if eager.finished:
            return None
    return None if task.done() else task


class _EagerStart(collections.abc.Coroutine[Any, Any, None]):
    """Python 3.11's stand-in for 3.12's `eager_start`: the task's first step is run at once,
    by `first_step` with the task as the current one; the task then takes what that step
    awaits (or its end) as its own first step, and drives the coroutine from there."""

    __slots__ = ("_coroutine", "_first", "_outcome", "finished")

    def __init__(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self._coroutine, self._first, self.finished = coroutine, True, False
        self._outcome: Any = None  # what the first step awaits, or the exception it raised

    def first_step(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
        asyncio.tasks._enter_task(loop, task)
        try:
            self._outcome = self._coroutine.send(None)
        except StopIteration:
            self.finished = True
        except BaseException as exc:  # the task raises it, as its own step would
            self._outcome = exc
        finally:
            asyncio.tasks._leave_task(loop, task)

    def send(self, value: Any) -> Any:
        if self._first:
            self._first = False
            if self.finished:
                raise StopIteration
            if isinstance(self._outcome, BaseException):
                raise self._outcome
            return self._outcome
        return self._coroutine.send(value)

    def throw(self, *exc: Any) -> Any:  # a cancellation: to the coroutine, unless it ended
        self._first = False
        if self.finished:
            raise StopIteration
        return self._coroutine.throw(*exc)

    def close(self) -> None:
        self._coroutine.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("driven by its task only")


async def finish_handler(awaitable: Awaitable[Any], answer: Callable[..., None]) -> None:
    """The rest of a coroutine handler, in its task: its outcome becomes the answer."""
    try:
        result = await awaitable
    except asyncio.CancelledError:  # ours (the runtime's CancelHandler) or anyone's
        answer("cancelled")
    except Exception as exc:  # a handler failure is the dispatch's failure, not ours
        answer("raised", exc)
    else:
        answer("send_result", result)


def _answer(agent: Any, dispatch_id: str, kind: str, *args: Any) -> None:
    if kind == "send_result":
        agent._returned(dispatch_id, *args)
    elif kind == "raised":
        agent._raised(dispatch_id, *args)
    else:
        agent._cancelled(dispatch_id)


def loop_portal(loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """`DispatchContext.portal` for a handler in a worker thread: `portal(function, *args)`
    runs `function` in `loop`'s thread (the runtime is not thread-safe), awaits what it
    returns if that is awaitable, and blocks the worker thread for the result (or raises
    its exception there). Called from the loop's own thread it calls straight through."""

    def portal(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return function(*args, **kwargs)

        async def call() -> Any:
            result = function(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(call(), loop).result()

    return portal


def start_in_thread(handler: Callable[..., Any], arguments: Any, context: Any,
                    answer: Callable[..., None]) -> asyncio.Task[None]:
    """Run a plain handler that may block in the loop's default executor, so the loop (and
    every other dispatch) keeps going; the task that waits for it is the one to cancel.
    A cancelled wait answers at once; the thread cannot be interrupted, sees
    `context.cancelled`, and its late chunks fail (the dispatch has ended)."""
    loop = asyncio.get_running_loop()
    context.portal = loop_portal(loop)
    thread_context = contextvars.copy_context()  # its own: a context runs in one thread

    async def in_thread() -> Any:
        return await loop.run_in_executor(None, thread_context.run, handler, arguments,
                                          context)

    return loop.create_task(finish_handler(in_thread(), answer))


def spawn_handler(agent: Any, start: StartHandler) -> None:
    """`start_handler` for an agent: its task, while it runs, is the agent's to cancel."""
    dispatch_id = start.dispatch_id
    answer = functools.partial(_answer, agent, dispatch_id)
    task: asyncio.Task[None] | None
    if start.blocking:
        task = start_in_thread(start.handler, start.arguments, start.context, answer)
    else:
        task = start_handler(start.handler, start.arguments, start.context, answer)
    if task is not None:
        handlers = agent._handlers
        handlers[dispatch_id] = task
        task.add_done_callback(lambda _: handlers.pop(dispatch_id, None))

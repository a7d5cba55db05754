"""Scale-out: several mesh processes (on one machine or many) sharing one Redis, so that a
dispatch entering any of them reaches an agent connected to any other.

What Redis holds (keys under a configurable prefix, `svantic` by default):

* `{p}:node:{id}`: one key per live mesh process, set with a short TTL (`node_ttl`, 3 s) and
  refreshed every `beat_interval` (1 s). A process whose key is gone is dead: that is the
  dead-process bound, `node_ttl + beat_interval`.
* `{p}:nodes`: the set of process ids, so each can check the others' keys.
* `{p}:loc`: instance id -> the process holding its socket. Set on session start; removed on
  disconnect only by the process that set it (a Lua compare-and-delete), so a disconnect
  reported late never removes a newer connection on another process.
* `{p}:caps`: instance id -> the capabilities its hello announced (what a process that
  (re)loads the state routes by, with the registered ones).
* `{p}:lease:{instance}`: the instance's capacity, as a sorted set of lease -> expiry (ms).
  `ACQUIRE` (Lua, one round trip) drops expired leases and adds one only while fewer than the
  cap are held, so processes never over-fill an instance together; a crashed process's leases
  expire with their dispatch's deadline plus `lease_margin`. Instances without a cap take no
  lease at all (nothing to over-fill).
* `{p}:inbox:{id}`: each process's list of messages from the others (a dispatch to carry,
  its chunks, its outcome), read with `BLMPOP` (up to 256 at a time) by one reader per process.
* `{p}:bus`: one pub/sub channel for what every process mirrors: connections, heartbeats,
  registrations, lifecycle events (for every process's `/events`) and resume tokens.

Each process keeps its own `Router` (through its `Fleet`) as a mirror of every instance,
fed by the channel and by a load of `{p}:loc` at start and after Redis comes back: the local
router picks, and the Lua acquire is the truth for capacity.

Redis away: dispatches carried to another process fail at once with `AGENT_DISCONNECTED`
(the caller cannot know whether the agent ran it: the same answer as a socket that drops),
dispatches to agents on this process keep working (capacity then counted by this process's
router alone), and every Redis task reconnects with the protocol's backoff, logging each
attempt's reason, and retries at once when the beat finds Redis again. Events published
while Redis is away reach only this process's `/events`. Redis back (perhaps restarted,
empty): for one dead-process bound no process is counted dead (every key went at once; each
rejoins at its next beat); the writer checks its one connection (PING) before writing after
an outage or a second idle, and a batch that fails anyway writes its outcomes and chunks
once more (their receiver takes each once), never a carried dispatch (it could run twice).

Every routine is written once, as a generator of the Redis calls and waits it makes; a driver
runs it on asyncio (`redis.asyncio`, a blocking connection pool, tasks) or on gevent (redis-py's
blocking client on patched sockets, greenlets). anyio-on-trio meshes stay single-process (see
docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from svantic_proto.backoff import backoff_delays
from svantic_proto.errors import DispatchError, LocalProtocolError
from svantic_proto.frames import DispatchPayload
from svantic_proto.resume import HeldDispatch, ResumeClaim, ResumeStore

from .events import EventBus
from .registry import RegistryError

__all__ = [
    "ACQUIRE_LUA",
    "FORGET_LOCATION_LUA",
    "RELEASE_LUA",
    "ClusterBus",
    "ClusterResumeStore",
    "ClusterSettings",
    "MeshCluster",
    "REDIS_UNAVAILABLE",
]

log = logging.getLogger("svantic.mesh.cluster")

REDIS_UNAVAILABLE = "the mesh lost its link to the agent's mesh process (Redis): try again"
"""The message of a carried dispatch failed because Redis went away (code
`AGENT_DISCONNECTED`: whether the agent ran it is unknown, as for a dropped socket)."""

ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local cap = tonumber(ARGV[2])
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""
"""KEYS: the lease set. ARGV: lease id, cap (0: none), lease lifetime in ms. 1: taken."""

RELEASE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""
"""KEYS: the lease set. ARGV: lease id. Returns the leases still held."""

FORGET_LOCATION_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
"""
"""KEYS: the location hash, the capabilities hash. ARGV: instance, the process that had it.
Deletes only that process's claim: a newer connection elsewhere stays."""

FORGET_NODE_LUA = """
local removed = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if all[i + 1] == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    redis.call('HDEL', KEYS[2], all[i])
    table.insert(removed, all[i])
  end
end
redis.call('SREM', KEYS[3], ARGV[1])
return removed
"""
"""KEYS: location hash, capabilities hash, the node set. ARGV: a dead process. Its
instances' locations go; returns them."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(dict[str, Any]).decode


@dataclass(slots=True)
class ClusterSettings:
    """How one mesh process joins the others (see `svantic mesh --redis`)."""

    redis_url: str
    prefix: str = "svantic"
    node_id: str | None = None
    """This process's id (default: host name, pid and a random suffix: unique per start)."""
    node_ttl: float = 3.0
    beat_interval: float = 1.0
    lease_margin: float = 5.0
    """A lease outlives its dispatch's deadline by this much, then expires by itself."""
    max_connections: int = 32
    """The command pool's bound (a blocked caller waits for a connection)."""
    max_message_bytes: int = 8 << 20
    """A message between processes (a dispatch, a chunk, an outcome) larger is refused."""
    max_outbox_bytes: int = 64 << 20
    """Messages queued for Redis at most; past it new ones are refused (and logged)."""
    inbox_ttl: float = 60.0
    """A dead process's inbox is dropped by Redis this long after the last write."""


class ClusterBus(EventBus):
    """The event bus of a clustered process: what it publishes is also handed to
    `forward` (for the other processes), and what they publish is `deliver`ed here only."""

    def __init__(self, *, max_subscribers: int = 256) -> None:
        super().__init__(max_subscribers=max_subscribers)
        self.forward: Callable[[str, str, dict[str, Any], float], None] | None = None
        self._muted = 0
        self._local = 0

    def publish(self, kind: str, tenant_id: str, data: Mapping[str, Any], wall: float) -> None:
        if self._muted:
            return
        super().publish(kind, tenant_id, data, wall)
        if self.forward is not None and not self._local:
            self.forward(kind, tenant_id, dict(data), wall)

    def deliver(self, kind: str, tenant_id: str, data: Mapping[str, Any], wall: float) -> None:
        """An event another process published: to this process's subscribers only."""
        super().publish(kind, tenant_id, data, wall)

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Publishes dropped: a mirrored change (the process it happened on publishes)."""
        self._muted += 1
        try:
            yield
        finally:
            self._muted -= 1

    @contextlib.contextmanager
    def local_only(self) -> Iterator[None]:
        """Publishes kept here: every process sees the same fact (a process died)."""
        self._local += 1
        try:
            yield
        finally:
            self._local -= 1


@dataclass(slots=True)
class _RemoteToken:
    instance_id: str
    tenant_id: str
    node: str
    expires_at: float | None  # monotonic, this process's clock; None: its connection is up
    held: tuple[HeldDispatch, ...] = ()
    """What that process holds under the token, to re-send here if the agent resumes here."""


_MAX_HELD_ANNOUNCED = 256 << 10
"""A held dispatch whose payload is larger is not announced: it can only be re-sent by the
process that holds it, and fails if the agent resumes elsewhere."""


class ClusterResumeStore(ResumeStore):
    """The resume store, plus the tokens other processes issued (spec 5 on any process).

    The core claims a token synchronously inside the hello; so every process keeps a mirror
    of the others' live tokens (one per instance), fed by the channel. A token from another
    process resumes here (`resumed: true`) while its connection is up or within the window
    after it ended (or after its process died). Dispatches held under it stay with the
    process that held them: it fails them `AGENT_DISCONNECTED` when it hears the claim, so
    each still ends exactly once."""

    def __init__(self, *, window: float = 30.0,
                 token_factory: Callable[[], str] | None = None) -> None:
        super().__init__(window=window, token_factory=token_factory)
        self.announce: Callable[[dict[str, Any]], None] | None = None
        self.adopt: Callable[[str, str, tuple[HeldDispatch, ...]], None] | None = None
        """Told `(holder process, token, dispatches)` when a claim here re-sends what another
        process held: their outcomes must reach that process's waiters."""
        self._remote: dict[str, _RemoteToken] = {}
        self._remote_key: dict[tuple[str, str], str] = {}

    def issue(self, instance_id: str, tenant_id: str) -> str:
        token = super().issue(instance_id, tenant_id)
        self._drop_remote((instance_id, tenant_id))
        self._tell({"t": "tok", "k": token, "i": instance_id, "n": tenant_id})
        return token

    def hold(self, token: str, dispatches: Any, now: float) -> list[HeldDispatch]:
        dispatches = list(dispatches)
        failed = super().hold(token, dispatches, now)
        if self.owns(token):
            gone = {h.dispatch_id for h in failed}
            held = []
            for h in dispatches:
                payload = msgspec.to_builtins(h.payload)
                if h.dispatch_id not in gone and len(_encode(payload)) <= _MAX_HELD_ANNOUNCED:
                    held.append([payload, h.deadline_at - now])
            self._tell({"t": "held", "k": token, "w": self.window, "d": held})
        return failed

    def claim(self, token: str | None, instance_id: str, tenant_id: str,
              now: float) -> ResumeClaim:
        if token is not None and not self.owns(token):
            remote = self._remote.get(token)
            if (remote is not None and remote.instance_id == instance_id
                    and remote.tenant_id == tenant_id
                    and (remote.expires_at is None or now < remote.expires_at)):
                self._drop_remote((instance_id, tenant_id))
                own = super().claim(None, instance_id, tenant_id, now)
                replay = tuple(h for h in remote.held if h.deadline_at > now)
                if replay and self.adopt is not None:
                    self.adopt(remote.node, token, replay)
                self._tell({"t": "claimed", "k": token,
                            "ids": [h.dispatch_id for h in replay]})
                log.info("agent %s resumes here with a token from process %s; %d held "
                         "dispatches re-sent", instance_id, remote.node, len(replay))
                return ResumeClaim(True, replay, own.failed)
        claim = super().claim(token, instance_id, tenant_id, now)
        if claim.resumed and token is not None:
            self._tell({"t": "claimed", "k": token, "ids": []})
        return claim

    # -- what the other processes said -------------------------------------------------------

    def remote_issued(self, token: str, instance_id: str, tenant_id: str, node: str) -> None:
        key = (instance_id, tenant_id)
        self._drop_remote(key)
        self._remote[token] = _RemoteToken(instance_id, tenant_id, node, None)
        self._remote_key[key] = token

    def remote_held(self, token: str, window: float, now: float,
                    held: list[Any] | None = None) -> None:
        remote = self._remote.get(token)
        if remote is None:
            return
        remote.expires_at = now + min(window, self.window)
        kept = []
        for payload, remaining in held or ():
            try:
                kept.append(HeldDispatch(msgspec.convert(payload, DispatchPayload),
                                         now + float(remaining)))
            except (msgspec.ValidationError, TypeError, ValueError):
                log.warning("cluster: a held dispatch announced for %s was not understood",
                            remote.instance_id)
        remote.held = tuple(kept)

    def remote_claimed(self, token: str, kept: list[str], now: float) -> None:
        remote = self._remote.pop(token, None)
        if remote is not None:
            self._remote_key.pop((remote.instance_id, remote.tenant_id), None)
        self.hand_over(token, kept, now)

    def node_died(self, node: str, now: float) -> None:
        """Its connections ended with it: their tokens get the window from now."""
        for remote in self._remote.values():
            if remote.node == node and remote.expires_at is None:
                remote.expires_at = now + self.window

    def remote_count(self) -> int:
        return len(self._remote)

    def _drop_remote(self, key: tuple[str, str]) -> None:
        old = self._remote_key.pop(key, None)
        if old is not None:
            self._remote.pop(old, None)

    def _tell(self, message: dict[str, Any]) -> None:
        if self.announce is not None:
            self.announce(message)


@dataclass(slots=True)
class _Waiting:
    """A dispatch carried to another process, waiting for its chunks and outcome here."""

    dispatch_id: str
    future: Any  # an asyncio future or a gevent AsyncResult of (Outcome, remote seconds)
    on_chunk: Callable[[Any], object] | None
    node: str
    next_seq: int = 0


Step = Any
Routine = Generator[Any, Any, Any]
"""What the cluster's routines yield to their driver: an awaitable (the asyncio driver
awaits it) or a value already there (the gevent driver's calls block, then it sends the value
straight back). Either way the routine gets the result, or the exception, at its `yield`.
`Routine`: a generator of steps, returning what the routine returns."""


class _AsyncioDriver:
    """The cluster's waits on asyncio: `redis.asyncio` clients, tasks, futures."""

    def __init__(self, url: str, max_connections: int) -> None:
        import redis.asyncio as aioredis

        self.cmd = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5, socket_connect_timeout=2))
        # BLMPOP holds its connection while it waits: a pool of its own.
        self.reader = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=2, timeout=5, socket_connect_timeout=2))
        # The writer is one task sending in order: one connection of its own, no pool.
        self.writer = aioredis.Redis.from_url(url, single_connection_client=True,
                                              socket_connect_timeout=2)
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, routine: Routine) -> None:
        task = asyncio.get_running_loop().create_task(self.run(routine))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, routine: Routine) -> Any:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = routine.throw(error) if error is not None else routine.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = await step if inspect.isawaitable(step) else step
            except asyncio.CancelledError:
                routine.close()
                raise
            except Exception as exc:
                error = exc

    def event(self) -> Any:
        return asyncio.Event()

    def future(self) -> Any:
        return asyncio.get_running_loop().create_future()

    @staticmethod
    def done(future: Any) -> bool:
        return bool(future.done())

    @staticmethod
    def resolve(future: Any, value: Any) -> None:
        if not future.done():
            future.set_result(value)

    @staticmethod
    async def wait(future: Any, timeout: float) -> Any:
        # Not `asyncio.wait_for`: it wakes its waiter through a second future, one more turn
        # of the loop for every carried dispatch. A timer that resolves the future instead.
        handle = asyncio.get_running_loop().call_later(timeout, _time_out, future)
        try:
            value = await future
        finally:
            handle.cancel()
        if value is _TIMED_OUT:
            raise TimeoutError
        return value

    @staticmethod
    def sleep(seconds: float) -> Step:
        return asyncio.sleep(seconds)

    @staticmethod
    async def nap(event: Any, seconds: float) -> None:
        """Sleep, or less if `event` is set meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    async def stop(self) -> None:
        """Cancel every routine and wait at most 2 s: a routine cancelled inside a redis-py
        call that never completes (seen just after joining) must not hold the drain."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=2.0)
        for task in done:  # retrieved, so none is reported as "never retrieved"
            if not task.cancelled():
                task.exception()
        if pending:
            log.warning("cluster: %d Redis routines did not stop within 2 s: left behind",
                        len(pending))

    async def close(self) -> None:
        for client in (self.cmd, self.reader, self.writer):
            await client.aclose()


_TIMED_OUT = object()

_SENT_AGAIN = frozenset({"o", "c", "ho", "hc"})
"""Inbox messages written again once when their batch fails: outcomes and chunks, which their
receiver takes once each (by dispatch id and sequence number)."""

_WRITER_IDLE = 1.0
"""Seconds after which the writer's connection is checked (PING) before it writes."""


def _time_out(future: Any) -> None:
    if not future.done():
        future.set_result(_TIMED_OUT)


class _GeventDriver:
    """The cluster's waits on gevent: redis-py's blocking clients on gevent's patched
    sockets, greenlets, `AsyncResult`s."""

    def __init__(self, url: str, max_connections: int) -> None:
        import gevent
        import redis

        self._gevent = gevent
        self.cmd = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=5, socket_connect_timeout=2))
        self.reader = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=2, timeout=5, socket_connect_timeout=2))
        self.writer = redis.Redis.from_url(url, single_connection_client=True,
                                           socket_connect_timeout=2)
        self.greenlets: set[Any] = set()

    def spawn(self, routine: Routine) -> None:
        greenlet = self._gevent.spawn(self.run, routine)
        self.greenlets.add(greenlet)
        greenlet.link(self.greenlets.discard)

    @staticmethod
    def run(routine: Routine) -> Any:
        # Each step already ran (blocking this greenlet); its exception, if any, was raised
        # inside the routine at the call.
        value: Any = None
        while True:
            try:
                value = routine.send(value)
            except StopIteration as stop:
                return stop.value

    def event(self) -> Any:
        import gevent.event

        return gevent.event.Event()

    def future(self) -> Any:
        import gevent.event

        return gevent.event.AsyncResult()

    @staticmethod
    def done(future: Any) -> bool:
        return bool(future.ready())

    @staticmethod
    def resolve(future: Any, value: Any) -> None:
        if not future.ready():
            future.set(value)

    def wait(self, future: Any, timeout: float) -> Step:
        try:
            return future.get(timeout=timeout)
        except self._gevent.Timeout as exc:
            raise TimeoutError from exc

    def sleep(self, seconds: float) -> Step:
        self._gevent.sleep(seconds)

    @staticmethod
    def nap(event: Any, seconds: float) -> Step:
        """Sleep, or less if `event` is set meanwhile."""
        event.wait(timeout=seconds)

    def stop(self) -> None:
        self._gevent.killall(list(self.greenlets), timeout=5)

    def close(self) -> None:
        for client in (self.cmd, self.reader, self.writer):
            client.close()


class MeshCluster:
    """One mesh process's part of the cluster: its Redis routines, the mirror it keeps, and
    the dispatches it carries to or for the others.

    Made by `svantic mesh --redis` (mesh/serve.py): `bind(parts, server, local_outcome)`,
    then `async with cluster:` around the asyncio serving, or `start()` / `stop()` around
    the gevent one (`gevent=True`). Every routine is written once, as a generator of the
    Redis calls and waits it makes; a driver per concurrency model runs it."""

    def __init__(self, settings: ClusterSettings, store: ClusterResumeStore, *,
                 gevent: bool = False) -> None:
        from redis.exceptions import RedisError

        self.settings = settings
        self.store = store
        self.node_id = settings.node_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
        p = settings.prefix
        self._k_node = f"{p}:node:"
        self._k_nodes = f"{p}:nodes"
        self._k_loc = f"{p}:loc"
        self._k_caps = f"{p}:caps"
        self._k_lease = f"{p}:lease:"
        self._k_inbox = f"{p}:inbox:"
        self._k_bus = f"{p}:bus"
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        driver = _GeventDriver if gevent else _AsyncioDriver
        self.io: Any = driver(settings.redis_url, settings.max_connections)
        self.redis = self.io.cmd
        self._acquire = self.redis.register_script(ACQUIRE_LUA)  # EVALSHA, loaded on demand
        self.parts: Any = None
        self.server: Any = None
        self._local_outcome: Callable[[str, Any, BaseException | None], Any] | None = None
        self._loc: dict[str, str] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._outbox: deque[tuple[str, str, Any]] = deque()
        self._outbox_bytes = 0
        self._renewed: dict[str, float] = {}  # inbox -> when its TTL was last renewed
        self._wake: Any = None
        self._back: Any = None  # set when the beat finds Redis again: retries stop waiting
        self._mirroring = 0
        self._down: str | None = None  # why Redis is unreachable, while it is
        self._written_at = 0.0  # when the writer's connection last answered
        self._writer_suspect = False  # Redis failed since: the writer's socket may be dead
        self._spare_until = 0.0  # no death checks before (Redis came back, perhaps empty)
        # Agents connected on other processes that this one could not route to yet (its
        # records were unreachable): instance -> capabilities, tried again every beat.
        self._unmirrored: dict[str, list[str]] = {}
        self._republish = False
        self._rand = random.Random()

    # -- wiring ---------------------------------------------------------------------------------

    def bind(self, parts: Any, server: Any,
             local_outcome: Callable[[str, Any, BaseException | None], Any]) -> None:
        """The process's parts (its `ClusterBus`, fleet, metrics) and the adapter's server."""
        self.parts, self.server, self._local_outcome = parts, server, local_outcome
        parts.events.forward = self._forward_event
        parts.fleet.observer = self
        self.store.announce = self._announce_token
        self.store.adopt = self._adopt

    async def __aenter__(self) -> MeshCluster:
        await self.io.run(self._start())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.io.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.io.run(self._leave())
        await self.io.close()
        log.info("cluster: process %s left", self.node_id)

    def start(self) -> None:
        """Join (gevent): the routines run in greenlets of their own."""
        self.io.run(self._start())

    def stop(self) -> None:
        """Leave (gevent): the routines end, the others are told."""
        import gevent

        self.io.stop()
        with gevent.Timeout(2, False):
            self.io.run(self._leave())
        self.io.close()
        log.info("cluster: process %s left", self.node_id)

    def _start(self) -> Routine:
        self._wake = self.io.event()
        self._back = self.io.event()
        try:
            yield from self._join()
        except self._errors as exc:
            self._lost(exc)
        for routine in (self._writer, self._reader, self._subscriber, self._beat):
            self.io.spawn(routine())
        log.info("cluster: process %s joined (Redis %s, prefix %s)", self.node_id,
                 _safe_url(self.settings.redis_url), self.settings.prefix)

    def _leave(self) -> Routine:
        """Tell the others this process is gone (its key, its agents)."""
        self._fail_waiting("the mesh process is shutting down")
        try:
            if self._outbox:
                batch = list(self._outbox)
                self._outbox.clear()
                yield from self._write(batch)
            yield self.redis.eval(FORGET_NODE_LUA, 3, self._k_loc, self._k_caps,
                                  self._k_nodes, self.node_id)
            yield self.redis.delete(self._k_node + self.node_id)
        except self._errors as exc:
            log.info("cluster: could not say goodbye: %s", _reason(exc))

    # -- carrying dispatches --------------------------------------------------------------------

    def locate(self, instance_id: str) -> str | None:
        """The process holding the instance's socket, as this process knows it."""
        return self._loc.get(instance_id)

    def owns_socket_elsewhere(self, instance_id: str) -> bool:
        """Another process holds the instance's socket now (a late disconnect here is
        then not the instance's)."""
        node = self._loc.get(instance_id)
        return node is not None and node != self.node_id

    def perform(self, dispatch: Any, dispatch_id: str,
                on_chunk: Callable[[Any], object] | None, local: Callable[[], Any]) -> Any:
        """Carry one routed socket dispatch (an awaitable on asyncio, the `Outcome` on
        gevent): take its lease (when the instance has a cap), then send it on this process's
        socket (`local()`) or to the process that holds it."""
        return self.io.run(self._perform(dispatch, dispatch_id, on_chunk, local))

    def _perform(self, dispatch: Any, dispatch_id: str,
                 on_chunk: Callable[[Any], object] | None,
                 local: Callable[[], Any]) -> Routine:
        from .app import Outcome

        lease = dispatch.lease
        instance_id = lease.instance_id
        here = instance_id in self.server.runtime.agents
        state = self.parts.router.get(instance_id)
        cap = state.max_concurrent_sessions if state is not None else 0
        member: str | None = None
        if cap > 0:
            member = f"{self.node_id}:{dispatch_id}"
            ttl_ms = int(dispatch.deadline_ms + self.settings.lease_margin * 1000)
            try:
                taken = yield self._acquire(keys=[self._k_lease + instance_id],
                                            args=[member, cap, ttl_ms])
            except self._errors as exc:
                self._lost(exc)
                if not here:
                    self.parts.fleet.neutral.add(lease.lease_id)
                    return Outcome(dispatch_id, code="AGENT_DISCONNECTED",
                                   message=REDIS_UNAVAILABLE)
                member = None  # this process's router counted it: local work goes on
            else:
                if not taken:
                    self.parts.fleet.neutral.add(lease.lease_id)
                    return Outcome(dispatch_id, code="AGENT_UNAVAILABLE",
                                   message="the instance is at capacity: try again")
        try:
            if here:
                return (yield local())
            node = self._loc.get(instance_id)
            if node is None or node == self.node_id:
                return Outcome(dispatch_id, code="AGENT_DISCONNECTED",
                               message=f"{instance_id} is not connected")
            return (yield from self._carry(node, dispatch, dispatch_id, on_chunk))
        finally:
            if member is not None:
                self._queue("eval", self._k_lease + instance_id, member)

    def _carry(self, node: str, dispatch: Any, dispatch_id: str,
               on_chunk: Callable[[Any], object] | None) -> Routine:
        from .app import Outcome

        if self._down is not None:
            self.parts.fleet.neutral.add(dispatch.lease.lease_id)
            return Outcome(dispatch_id, code="AGENT_DISCONNECTED", message=REDIS_UNAVAILABLE)
        future = self.io.future()
        self._waiting[dispatch_id] = _Waiting(dispatch_id, future, on_chunk, node)
        started = time.perf_counter()
        sent = self._send(node, {
            "t": "d", "id": dispatch_id, "r": self.node_id, "i": dispatch.lease.instance_id,
            "c": dispatch.capability, "a": dispatch.arguments, "dl": dispatch.deadline_ms,
            "sc": dispatch.session_context, "s": on_chunk is not None,
        })
        try:
            if not sent:
                return Outcome(dispatch_id, code="DISPATCH_FAILED",
                               message="the dispatch is too large to carry between processes")
            try:
                outcome, remote_seconds = yield self.io.wait(
                    future, dispatch.deadline_ms / 1000 + 1.0)
            except TimeoutError:
                return Outcome(dispatch_id, code="DEADLINE_EXCEEDED", message="no answer in time")
            if remote_seconds >= 0:
                self.parts.metrics.interprocess_hop(
                    time.perf_counter() - started - remote_seconds)
            else:
                # Failed here (Redis away, the other process gone): not the agent's doing,
                # so its health is left alone.
                self.parts.fleet.neutral.add(dispatch.lease.lease_id)
            return outcome
        finally:
            self._waiting.pop(dispatch_id, None)

    def _serve_carried(self, message: dict[str, Any]) -> Routine:
        """A dispatch another process routed to an agent whose socket is here."""
        reply, dispatch_id = str(message["r"]), str(message["id"])
        seq = [0]

        def on_chunk(data: Any) -> None:
            self._send(reply, {"t": "c", "id": dispatch_id, "d": data, "q": seq[0]})
            seq[0] += 1

        started = time.perf_counter()
        result: Any = None
        error: BaseException | None = None
        try:
            result = yield self.server.dispatch(
                str(message["i"]), str(message["c"]), message.get("a") or {},
                deadline_ms=int(message["dl"]), on_chunk=on_chunk if message.get("s") else None,
                session_context=self.parts.session_context(message.get("sc")),
                dispatch_id=dispatch_id)
        except (DispatchError, LocalProtocolError) as exc:
            error = exc
        assert self._local_outcome is not None
        outcome = self._local_outcome(dispatch_id, result, error)
        answer = {"t": "o", "id": dispatch_id, "res": outcome.result, "code": outcome.code,
                  "msg": outcome.message, "sec": time.perf_counter() - started}
        if not self._send(reply, answer):
            self._send(reply, {"t": "o", "id": dispatch_id, "code": "DISPATCH_FAILED",
                               "msg": "the result is too large to carry between processes",
                               "sec": -1.0})

    def _on_inbox(self, data: bytes) -> None:
        from .app import Outcome

        try:
            message = _decode(data)
            kind = message["t"]
            if kind == "d":
                self.io.spawn(self._serve_carried(message))
                return
            if kind == "hc":  # a chunk of one of ours, held, re-sent where its agent resumed
                self.server.runtime.deliver_chunk(str(message["id"]), int(message["q"]),
                                                  message.get("d"))
                return
            if kind == "ho":
                self._settle_held(message)
                return
            waiting = self._waiting.get(str(message["id"]))
            if waiting is None:
                return  # the caller gave up (deadline, dead process): nothing to deliver
            if kind == "c":
                seq = int(message["q"])
                if seq >= waiting.next_seq:
                    waiting.next_seq = seq + 1
                    if waiting.on_chunk is not None:
                        waiting.on_chunk(message.get("d"))
            elif kind == "o" and not self.io.done(waiting.future):
                code = message.get("code")
                self.io.resolve(waiting.future, (Outcome(
                    str(message["id"]), result=message.get("res"),
                    code=str(code) if code is not None else None,
                    message=message.get("msg")), float(message.get("sec", -1.0))))
        except Exception:  # a malformed message must not stop the reader
            log.exception("cluster: a message in this process's inbox was not understood")

    # -- held dispatches re-sent on another process (spec 5 across processes) -----------------

    def _adopt(self, holder: str, token: str, replay: tuple[HeldDispatch, ...]) -> None:
        """The agent resumed here with `holder`'s token: wait here for what is re-sent, and
        carry each chunk and the one outcome to the holder, whose caller waits."""
        runtime = self.server.runtime
        for held in replay:
            relay = _Relay(self, holder, token, held.dispatch_id)
            runtime.adopt(held.dispatch_id, relay, relay.chunk)

    def _settle_held(self, message: dict[str, Any]) -> None:
        dispatch_id = str(message["id"])
        if self.store.settle(str(message["k"]), dispatch_id) is None:
            return  # it failed here already (its deadline): it ended once, here
        code = message.get("code")
        error = None if code is None else (str(code), str(message.get("msg") or code))
        self.server.runtime.settle(dispatch_id, result=message.get("res"), error=error)

    # -- the mirror: what this process tells the others ----------------------------------------

    @property
    def mirroring(self) -> bool:
        """A change from another process is being applied: the fleet's hooks stay quiet."""
        return self._mirroring > 0

    def connected(self, instance_id: str, capabilities: list[str]) -> None:
        self._loc[instance_id] = self.node_id
        self._queue("hset", self._k_loc, (instance_id, self.node_id))
        self._queue("hset", self._k_caps, (instance_id, _encode(capabilities)))
        self._publish({"t": "conn", "i": instance_id, "cap": capabilities})

    def disconnected(self, instance_id: str) -> None:
        if self._loc.get(instance_id) == self.node_id:
            del self._loc[instance_id]
        self._queue("forget", self._k_loc, instance_id)
        self._publish({"t": "disc", "i": instance_id})

    def heartbeat(self, instance_id: str, fields: dict[str, Any]) -> None:
        self._publish({"t": "hb", "i": instance_id, **fields})

    def registered(self, instance_id: str) -> None:
        self._publish({"t": "reg", "i": instance_id})

    def deregistered(self, instance_id: str, reason: str) -> None:
        self._publish({"t": "dereg", "i": instance_id, "why": reason})

    def _forward_event(self, kind: str, tenant_id: str, data: dict[str, Any],
                       wall: float) -> None:
        self._publish({"t": "ev", "k": kind, "n": tenant_id, "d": data, "w": wall})

    def _announce_token(self, message: dict[str, Any]) -> None:
        self._publish(message)

    def _publish(self, message: dict[str, Any]) -> None:
        message["o"] = self.node_id
        self._queue("publish", self._k_bus, _encode(message))

    # -- the mirror: what the others said -------------------------------------------------------

    @contextlib.contextmanager
    def _mirror(self) -> Iterator[None]:
        self._mirroring += 1
        try:
            with self.parts.events.muted():
                yield
        finally:
            self._mirroring -= 1

    def _on_bus(self, data: bytes) -> None:
        try:
            message = _decode(data)
            origin = str(message["o"])
            if origin == self.node_id:
                return
            self._apply(message, origin)
        except RegistryError as exc:  # the records away: an outage, not a bug
            log.warning("cluster: a change from another process not fully applied here: "
                        "the records are unavailable (%s)", _reason(exc))
        except Exception:  # one bad message must not stop the mirror
            log.exception("cluster: a message on the bus was not understood")

    def _apply(self, message: dict[str, Any], origin: str) -> None:
        kind = message["t"]
        now, wall = time.monotonic(), time.time()
        fleet = self.parts.fleet
        if kind == "ev":
            self.parts.events.deliver(str(message["k"]), str(message["n"]), message["d"],
                                      float(message["w"]))
        elif kind == "conn":
            self._remote_connected(str(message["i"]), origin, list(message.get("cap") or []))
        elif kind == "disc":
            instance_id = str(message["i"])
            if self._loc.get(instance_id) == origin:
                del self._loc[instance_id]
                with self._mirror():
                    self._remote_disconnected(instance_id, now, wall)
        elif kind == "hb":
            instance_id = str(message["i"])
            if instance_id in self.parts.router:
                with self._mirror(), contextlib.suppress(Exception):
                    fleet.heartbeat(instance_id, status=message.get("st"),
                                    active_sessions=int(message.get("as", 0)),
                                    max_concurrent_sessions=message.get("mx"),
                                    load=message.get("ld"), now=now, wall=wall)
        elif kind == "reg":
            with self._mirror():
                fleet.learn(str(message["i"]), now)
        elif kind == "dereg":
            with self._mirror():
                fleet.deregister(str(message["i"]), reason=str(message.get("why", "")),
                                 now=now, wall=wall)
        elif kind == "tok":
            self.store.remote_issued(str(message["k"]), str(message["i"]), str(message["n"]),
                                     origin)
        elif kind == "held":
            self.store.remote_held(str(message["k"]), float(message["w"]), now,
                                   list(message.get("d") or []))
        elif kind == "claimed":
            self.store.remote_claimed(str(message["k"]),
                                      [str(i) for i in message.get("ids") or []], now)

    def _remote_connected(self, instance_id: str, node: str, capabilities: list[str]) -> None:
        self._loc[instance_id] = node
        handle = self.server.agents.get(instance_id) if self.server is not None else None
        if handle is not None:
            # The agent reconnected to another process: this older socket is replaced.
            with contextlib.suppress(Exception):
                handle.conn.close(1001, "replaced by a newer connection", now=time.monotonic())
                handle.link.pump.service()
            log.info("agent %s moved to process %s: its socket here is closed", instance_id,
                     node)
        retried = self._unmirrored.pop(instance_id, None) is not None
        with self._mirror():
            try:
                self.parts.fleet.agent_connected(instance_id, capabilities=capabilities,
                                                 now=time.monotonic(), wall=time.time(),
                                                 remote=True)
            except ValueError:
                log.info("cluster: %s is not a connected-mode instance here", instance_id)
            except RegistryError as exc:
                # The agent is live there; this process reads its record to route to it.
                # Tried again every beat until the records answer (or the agent goes).
                self._unmirrored[instance_id] = capabilities
                if not retried:
                    log.warning("cluster: %s connected on process %s is not routable here "
                                "until the records answer (%s); retrying", instance_id, node,
                                _reason(exc))
            else:
                if retried:
                    log.info("cluster: %s (on process %s) routable here again", instance_id,
                             node)

    def _mirror_unmirrored(self) -> None:
        """Try again the agents whose connection this process could not mirror."""
        for instance_id, capabilities in list(self._unmirrored.items()):
            node = self._loc.get(instance_id)
            if node is None or node == self.node_id:
                del self._unmirrored[instance_id]  # gone since, or here now
            else:
                try:
                    self._remote_connected(instance_id, node, capabilities)
                except Exception:  # the beat must go on
                    self._unmirrored.pop(instance_id, None)
                    log.exception("cluster: %s (on process %s) could not be mirrored here",
                                  instance_id, node)

    def _remote_disconnected(self, instance_id: str, now: float, wall: float) -> None:
        """Mirror an agent's disconnect. The router forgets it in memory first; a record
        that cannot be written now (the database away) is not worth a traceback."""
        self._unmirrored.pop(instance_id, None)
        try:
            self.parts.fleet.agent_disconnected(instance_id, now, wall)
        except RegistryError as exc:
            log.warning("cluster: %s disconnected, its status not saved: the records are "
                        "unavailable (%s)", instance_id, _reason(exc))

    def _node_died(self, node: str) -> None:
        gone = [iid for iid, where in self._loc.items() if where == node]
        log.warning("cluster: process %s is gone (no liveness key): %d agents, %d "
                    "dispatches waiting on it", node, len(gone),
                    sum(1 for w in self._waiting.values() if w.node == node))
        now, wall = time.monotonic(), time.time()
        for instance_id in gone:
            del self._loc[instance_id]
            # Every process sees the death by itself: each tells its own subscribers once.
            self._mirroring += 1
            try:
                with self.parts.events.local_only():
                    self._remote_disconnected(instance_id, now, wall)
            finally:
                self._mirroring -= 1
        self.store.node_died(node, now)
        self._renewed.pop(self._k_inbox + node, None)
        for waiting in list(self._waiting.values()):
            if waiting.node == node:
                self._fail(waiting, "the agent's mesh process is gone")

    # -- Redis routines -------------------------------------------------------------------------

    def _join(self) -> Routine:
        """Set this process's key (and its place in the set); returns False when the key
        had gone (a first start, a Redis that lost its data, or a stall past the TTL that
        made the others count this process dead and forget its agents)."""
        ttl = int(self.settings.node_ttl * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self._k_node + self.node_id, b"1", px=ttl, get=True)
        pipe.sadd(self._k_nodes, self.node_id)
        previous, _ = yield pipe.execute()
        return previous is not None

    def _beat(self) -> Routine:
        """Keep this process's key alive; find the processes whose key is gone."""
        while True:
            if self._unmirrored:
                self._mirror_unmirrored()
            try:
                joined = yield from self._join()
                if not joined and self.server is not None:
                    self._republish = True
                    self._spare()  # Redis lost its data (or us): the others rejoin too
                if self._republish:
                    self._republish_state()
                self._recovered()
                if time.monotonic() >= self._spare_until:
                    yield from self._find_dead()
            except self._errors as exc:
                self._lost(exc)
            yield self.io.sleep(self.settings.beat_interval)

    def _find_dead(self) -> Routine:
        """Forget the processes whose key is gone, and those another process forgot."""
        nodes = [_text(n) for n in (yield self.redis.smembers(self._k_nodes))]
        others = [n for n in nodes if n != self.node_id]
        if others:
            pipe = self.redis.pipeline(transaction=False)
            for node in others:
                pipe.exists(self._k_node + node)
            alive = yield pipe.execute()
            for node, up in zip(others, alive, strict=True):
                if not up:
                    yield self.redis.eval(FORGET_NODE_LUA, 3, self._k_loc, self._k_caps,
                                          self._k_nodes, node)
                    self._node_died(node)
        # A process another one already found dead is out of the set: whatever this
        # process still routes to it, or waits on, is then gone too.
        known = set(nodes)
        suspects = set(self._loc.values()) | {w.node for w in self._waiting.values()}
        for node in suspects - known - {self.node_id}:
            self._node_died(node)

    def _republish_state(self) -> None:
        """Redis came back (perhaps empty): say again what this process holds."""
        self._republish = False
        agents = list(self.server.runtime.agents) if self.server is not None else []
        for instance_id in agents:
            state = self.parts.router.get(instance_id)
            caps = list(state.capabilities) if state is not None else []
            self.connected(instance_id, caps)
        tokens = self.store.tokens()
        for token, instance_id, tenant_id in tokens:
            self._publish({"t": "tok", "k": token, "i": instance_id, "n": tenant_id})
        log.info("cluster: %d agents and %d resume tokens announced again", len(agents),
                 len(tokens))

    def _reader(self) -> Routine:
        """This process's inbox: dispatches to carry, chunks and outcomes to deliver."""
        inbox = self._k_inbox + self.node_id
        delays: Iterator[float] | None = None
        while True:
            try:
                # One round trip for up to 256 messages (BLMPOP, Redis 7).
                item = yield self.io.reader.blmpop(1, 1, inbox, direction="LEFT", count=256)
                delays = None
                if item:
                    for data in item[1]:
                        self._on_inbox(data)
            except self._errors as exc:
                self._lost(exc)
                delays = delays or self._delays()
                yield self.io.nap(self._back, next(delays))

    def _subscriber(self) -> Routine:
        """The bus: mirror what the others say, after (re)loading the shared state."""
        delays: Iterator[float] | None = None
        while True:
            pubsub = self.redis.pubsub()
            try:
                yield pubsub.subscribe(self._k_bus)
                yield from self._load()
                delays = None
                while True:
                    message = yield pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_bus(message["data"])
            except self._errors as exc:
                self._lost(exc)
                delays = delays or self._delays()
                yield self.io.nap(self._back, next(delays))
                with contextlib.suppress(Exception):
                    if hasattr(pubsub, "aclose"):
                        yield pubsub.aclose()
                    else:
                        pubsub.close()

    def _load(self) -> Routine:
        """Every other process's agents, from `{p}:loc` (at start, after an outage)."""
        locations: dict[Any, Any] = yield self.redis.hgetall(self._k_loc)
        caps: dict[Any, Any] = yield self.redis.hgetall(self._k_caps)
        seen: dict[str, str] = {}
        for raw_id, raw_node in locations.items():
            instance_id, node = _text(raw_id), _text(raw_node)
            if node == self.node_id:
                continue
            seen[instance_id] = node
            if self._loc.get(instance_id) != node:
                try:
                    capabilities = list(msgspec.msgpack.decode(caps.get(raw_id, b"\x90")))
                except msgspec.DecodeError:
                    capabilities = []
                self._remote_connected(instance_id, node, capabilities)
        now, wall = time.monotonic(), time.time()
        for instance_id, node in list(self._loc.items()):
            if node != self.node_id and seen.get(instance_id) != node:
                del self._loc[instance_id]
                with self._mirror():
                    self._remote_disconnected(instance_id, now, wall)
        log.info("cluster: %d agents on other processes", len(seen))

    def _writer(self) -> Routine:
        """Everything this process sends, in the order it was queued, pipelined."""
        while True:
            yield self._wake.wait()
            self._wake.clear()
            while self._outbox:
                batch = list(self._outbox)
                self._outbox.clear()
                self._outbox_bytes = 0
                try:
                    yield from self._write(batch)
                except self._errors as exc:
                    # Outcomes and chunks go again, once, ahead of what came since: the
                    # callers on the other processes wait for them.
                    again = [("rpush", key, value) for op, key, value in batch
                             if op == "again"]
                    self._outbox.extendleft(reversed(again))
                    self._outbox_bytes += sum(len(value) for _, _, value in again)
                    if len(again) < len(batch):
                        log.warning("cluster: %d messages for Redis dropped: %s",
                                    len(batch) - len(again), _reason(exc))
                    if again:
                        log.info("cluster: %d outcomes and chunks for Redis to send again",
                                 len(again))
                    self._lost(exc)

    def _write(self, batch: list[tuple[str, str, Any]]) -> Routine:
        ttl = int(self.settings.inbox_ttl * 1000)
        now = time.monotonic()
        # An inbox's TTL is renewed now and then, not with every message: a live process
        # drains its inbox, a dead one's goes `inbox_ttl` after the last renewal.
        stale = {key for op, key, _ in batch
                 if op in ("rpush", "again") and self._renewed.get(key, 0.0) < now - ttl / 3000}
        writer = self.io.writer
        if self._writer_suspect or now - self._written_at > _WRITER_IDLE:
            # Its one connection may have died with a Redis restart, unseen while idle: a
            # PING finds out (and drops it), so the write below gets a fresh connection
            # instead of losing its batch.
            self._writer_suspect = False
            with contextlib.suppress(*self._errors):
                yield writer.ping()
        if len(batch) == 1 and not stale and batch[0][0] in ("rpush", "again"):
            yield writer.rpush(batch[0][1], batch[0][2])  # the hot path: one command
            self._written_at = now
            return
        pipe = writer.pipeline(transaction=False)
        for op, key, value in batch:
            if op in ("rpush", "again"):
                pipe.rpush(key, value)
            elif op == "publish":
                pipe.publish(key, value)
            elif op == "hset":
                pipe.hset(key, value[0], value[1])
            elif op == "forget":
                pipe.eval(FORGET_LOCATION_LUA, 2, key, self._k_caps, value, self.node_id)
            elif op == "eval":
                pipe.eval(RELEASE_LUA, 1, key, value)
        for key in stale:
            pipe.pexpire(key, ttl)
            self._renewed[key] = now
        yield pipe.execute()
        self._written_at = now

    def _send(self, node: str, message: dict[str, Any]) -> bool:
        """Queue a message for `node`'s inbox; False when it is over the size bound."""
        data = _encode(message)
        if len(data) > self.settings.max_message_bytes:
            log.warning("cluster: a %d-byte message for %s refused (bound %d)", len(data),
                        node, self.settings.max_message_bytes)
            return False
        # An outcome or a chunk may be written twice (its receiver takes each once); a
        # carried dispatch never is: a second copy could run twice.
        self._queue("again" if message["t"] in _SENT_AGAIN else "rpush",
                    self._k_inbox + node, data)
        return True

    def _queue(self, op: str, key: str, value: Any) -> None:
        size = len(value) if isinstance(value, bytes) else 64
        if self._outbox_bytes + size > self.settings.max_outbox_bytes:
            log.warning("cluster: outbox full (%d bytes): a %s for %s dropped",
                        self._outbox_bytes, op, key)
            return
        self._outbox.append((op, key, value))
        self._outbox_bytes += size
        if self._wake is not None:
            self._wake.set()

    # -- outages --------------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        reason = _reason(exc)
        if self._down is None:
            log.warning("cluster: Redis unavailable (%s): dispatches to other processes "
                        "fail until it is back; retrying", reason)
        else:
            log.info("cluster: Redis still unavailable (%s)", reason)
        self._down = reason
        self._republish = True
        self._writer_suspect = True
        if self._back is not None:
            self._back.clear()
        self._fail_waiting(REDIS_UNAVAILABLE)

    def _recovered(self) -> None:
        if self._down is not None:
            self._down = None
            self._spare()
            if self._back is not None:
                self._back.set()  # the reader and the subscriber retry now, not at backoff
            log.info("cluster: Redis reachable again")

    def _spare(self) -> None:
        """No death checks for one dead-process bound: after an outage every process's key
        may be gone (a restarted Redis is empty) until its next beat rejoins; counting them
        dead would disconnect their agents and start their tokens' windows for nothing."""
        self._spare_until = max(self._spare_until, time.monotonic() + self.settings.node_ttl
                                + self.settings.beat_interval)

    def _fail_waiting(self, message: str) -> None:
        for waiting in list(self._waiting.values()):
            self._fail(waiting, message)

    def _fail(self, waiting: _Waiting, message: str) -> None:
        from .app import Outcome

        self.io.resolve(waiting.future, (Outcome(
            waiting.dispatch_id, code="AGENT_DISCONNECTED", message=message), -1.0))

    def _delays(self) -> Iterator[float]:
        return backoff_delays(self._rand.random, base=0.2, cap=5.0)

    @property
    def waiting(self) -> int:
        """Dispatches carried to other processes and not yet ended."""
        return len(self._waiting)


class _Relay:
    """The waiter of a dispatch another process held and this one re-sent: its chunks and
    its outcome go back to that process."""

    __slots__ = ("_cluster", "_dispatch_id", "_holder", "_token")

    def __init__(self, cluster: MeshCluster, holder: str, token: str, dispatch_id: str) -> None:
        self._cluster, self._holder = cluster, holder
        self._token, self._dispatch_id = token, dispatch_id

    def chunk(self, numbered: tuple[int, Any]) -> None:
        seq, data = numbered
        self._cluster._send(self._holder, {"t": "hc", "id": self._dispatch_id, "q": seq,
                                           "d": data})

    def set_result(self, result: Any) -> None:
        self._cluster._send(self._holder, {"t": "ho", "k": self._token,
                                           "id": self._dispatch_id, "res": result})

    def set_exception(self, error: BaseException) -> None:
        code = error.code if isinstance(error, DispatchError) else "AGENT_DISCONNECTED"
        message = error.message if isinstance(error, DispatchError) else None
        self._cluster._send(self._holder, {"t": "ho", "k": self._token,
                                           "id": self._dispatch_id, "code": code,
                                           "msg": message})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _reason(exc: BaseException) -> str:
    """Our own short words for a Redis failure (its class, and errno text if any)."""
    text = str(exc).split("\n", 1)[0][:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _safe_url(url: str) -> str:
    """The Redis URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest

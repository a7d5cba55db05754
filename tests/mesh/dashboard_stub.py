"""A stand-in for the mesh's dashboard-facing surface, for tests/mesh/test_dashboard.py.

It serves the real ``mesh/dashboard.html`` at ``GET /dashboard`` with the CSP the mesh sends,
answers ``POST /agents/list_connections`` and ``POST /agents/get_connection_stats`` from an
in-memory table, and streams lifecycle events on ``GET /events`` as Server-Sent Events
(close-delimited HTTP/1.0). Every call but the page itself checks ``Authorization: Bearer``.

``connect()`` / ``disconnect()`` change the table and publish ``agent.connected`` /
``agent.disconnected``, as a real agent dialling the real mesh does (test_dashboard.py runs its
shared cases on both). The stub stays for what only it can stage, such as a dropped stream.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DASHBOARD_HTML = Path(__file__).resolve().parents[2] / "mesh" / "dashboard.html"
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)
CONNECTION_STATUSES = ("unknown", "online", "healthy", "degraded", "offline")
KEEPALIVE_EVERY_S = 5.0
POLL_S = 0.1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DashboardStub:
    """The fixture object: ``.url``, ``.token``, ``.connect()``, ``.disconnect()``."""

    tenant_id = "t-stub"

    def __init__(self) -> None:
        self.token = "stub-" + secrets.token_urlsafe(16)
        self.request_paths: list[str] = []
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}
        self._subscribers: list[queue.Queue[bytes]] = []
        self._event_id = 0
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": POLL_S}, daemon=True
        )
        self._thread.start()

    # -- the test-facing API ---------------------------------------------------------------

    def connect(self, instance_id: str, agent_type: str = "echo") -> None:
        now = _now()
        with self._lock:
            self._rows[instance_id] = {
                "instance_id": instance_id,
                "agent_type": agent_type,
                "deployment_mode": "connected",
                "transport": "ws",
                "connection_status": "online",
                "routing_status": "available",
                "active_sessions": 0,
                "last_heartbeat_at": now,
                "last_dispatch_error": None,
            }
        self._publish("agent.connected", instance_id=instance_id, agent_type=agent_type)

    def disconnect(self, instance_id: str) -> None:
        # As the mesh does: the connection goes offline; the routing status (what the agent
        # last said of itself) stays, since a connected instance without a socket is not
        # routed to whatever it says.
        with self._lock:
            row = self._rows[instance_id]
            row["connection_status"] = "offline"
            agent_type = row["agent_type"]
        self._publish("agent.disconnected", instance_id=instance_id, agent_type=agent_type)

    def drop_streams(self) -> None:
        """End every open event stream (as a mesh restart would)."""
        with self._lock:
            for q in self._subscribers:
                q.put(b"")

    @property
    def stream_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- internals -------------------------------------------------------------------------

    def _publish(self, event_type: str, **fields: Any) -> None:
        with self._lock:
            self._event_id += 1
            body = {"type": event_type, "tenant_id": self.tenant_id, "at": _now(), **fields}
            frame = (
                f"id: {self._event_id}\nevent: {event_type}\n"
                f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
            ).encode()
            for q in self._subscribers:
                q.put(frame)

    def _subscribe(self) -> queue.Queue[bytes]:
        q: queue.Queue[bytes] = queue.Queue()
        with self._lock:
            self._subscribers.append(q)
        return q

    def _unsubscribe(self, q: queue.Queue[bytes]) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def _list(self, body: dict[str, Any]) -> dict[str, Any]:
        limit = max(1, min(int(body.get("limit", 100)), 500))
        start = int(body.get("cursor") or 0)
        with self._lock:
            rows = [dict(r) for r in self._rows.values()]
        page = rows[start : start + limit]
        more = start + limit < len(rows)
        return {"items": page, "next_cursor": str(start + limit) if more else None}

    def _stats(self) -> dict[str, Any]:
        with self._lock:
            rows = list(self._rows.values())
        by_status = dict.fromkeys(CONNECTION_STATUSES, 0)
        by_mode = {"connected": 0, "hosted": 0}
        by_transport = {"ws": 0, "callback": 0}
        for r in rows:
            by_status[r["connection_status"]] += 1
            by_mode[r["deployment_mode"]] += 1
            by_transport[r["transport"]] += 1
        return {
            "total": len(rows),
            "by_deployment_mode": by_mode,
            "by_connection_status": by_status,
            "by_transport": by_transport,
        }


def _handler_for(stub: DashboardStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection; SSE is close-delimited

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {stub.token}":
                return True
            self._json(401, {"error": {"code": "UNAUTHORIZED", "message": "bad token"}})
            return False

        def do_GET(self) -> None:
            stub.request_paths.append(self.path)
            if self.path == "/dashboard":
                body = DASHBOARD_HTML.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Security-Policy", CSP)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Referrer-Policy", "no-referrer")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/events":
                if self._authorized():
                    self._stream()
            else:
                self._json(404, {"error": {"code": "NOT_FOUND", "message": "no such path"}})

        def do_POST(self) -> None:
            stub.request_paths.append(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b"{}"
            if not self._authorized():
                return
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                self._json(400, {"error": {"code": "INVALID_REQUEST", "message": "bad json"}})
                return
            if self.path == "/agents/list_connections":
                self._json(200, stub._list(body))
            elif self.path == "/agents/get_connection_stats":
                self._json(200, stub._stats())
            else:
                self._json(404, {"error": {"code": "NOT_FOUND", "message": "no such path"}})

        def _stream(self) -> None:
            q = stub._subscribe()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(b": stream open\n\n")
                idle = 0.0
                while not stub._stop.is_set():
                    try:
                        frame = q.get(timeout=POLL_S)
                    except queue.Empty:
                        idle += POLL_S
                        if idle >= KEEPALIVE_EVERY_S:
                            self.wfile.write(b": keepalive\n\n")
                            idle = 0.0
                        continue
                    if not frame:
                        break
                    self.wfile.write(frame)
                    idle = 0.0
            except OSError:
                pass  # the browser went away
            finally:
                stub._unsubscribe(q)
                self.close_connection = True

    return Handler

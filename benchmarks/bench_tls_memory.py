"""OpenSSL's own memory per idle server-side TLS connection: the floor under every adapter.

    python benchmarks/bench_tls_memory.py              # 2,000 connections, a few seconds
    python benchmarks/bench_tls_memory.py --count 200

Server and client `ssl.SSLObject`s between `ssl.MemoryBIO`s (what `adapters/_tls.py`
uses) finish a TLS 1.3 handshake with a trustme certificate and move one byte of
application data; then the clients are dropped and the servers kept, idle. Reported per
server connection: the growth of the C heap in use (glibc's `mallinfo2`), so what OpenSSL
and the three Python wrappers hold. Not RSS: the clients' memory, once freed, stays in the
process. No sockets, no event loop, no adapter: whatever an adapter adds comes on top.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trustme

Side = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not had back (glibc 2.33+), else None."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().uordblks)


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def connected(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> tuple[Side, Side]:
    """A server and a client after a full handshake and one byte of application data."""
    server = (ssl.MemoryBIO(), ssl.MemoryBIO())
    client = (ssl.MemoryBIO(), ssl.MemoryBIO())
    s = server_context.wrap_bio(*server, server_side=True)
    c = client_context.wrap_bio(*client, server_hostname="127.0.0.1")
    for _ in range(10):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server[0].write(client[1].read())
        client[0].write(server[1].read())
    if not (s.version() == c.version() == "TLSv1.3"):
        raise RuntimeError(f"handshake did not finish: {s.version()}")
    c.write(b"x")
    server[0].write(client[1].read())
    s.read()
    client[0].write(server[1].read())  # the session tickets, so the client is idle too
    return (s, *server), (c, *client)


def measure(count: int) -> dict[str, Any]:
    server_context, client_context = contexts()
    servers: list[Side] = []

    def open_idle(n: int) -> int | None:
        """Open `n` connections, keep the servers, drop the clients: the heap in use after."""
        clients = []
        for _ in range(n):
            server, client = connected(server_context, client_context)
            servers.append(server)
            clients.append(client)
        del clients, client
        gc.collect()
        return heap_in_use()

    heap0 = open_idle(50)  # warm-up: caches, the first allocations of each kind
    heap1 = open_idle(count)
    return {
        "count": count,
        "openssl": ssl.OPENSSL_VERSION,
        "heap_kib": None if heap0 is None or heap1 is None else (heap1 - heap0) / count / 1024,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2_000)
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    result = measure(args.count)
    heap = result["heap_kib"]
    print(f"{result['openssl']}, Python {sys.version.split()[0]}; {args.count:,} idle server "
          "connections after a TLS 1.3 handshake (SSLObject + two MemoryBIOs each)\n")
    print("| per connection | KiB |\n|---|---:|")
    print(f"| C heap in use (mallinfo2) | {'n/a' if heap is None else f'{heap:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))

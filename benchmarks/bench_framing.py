"""Per-message cost of WebSocket framing: svantic's Framing vs wsproto vs websockets.

`Framing` (`svantic_proto/framing.py`) owns its parser and serialiser; wsproto, its
differential reference in the tests, and python-websockets' sans-IO core are the
baselines, run in the same process.

Each variant sends one text message from one side and parses it on the other,
ending with the message as `str` in hand (websockets' sans-IO core leaves UTF-8
decoding to its I/O layers, so the decode is done here to compare like with like).
Both directions are measured: client to server (masked: what the mesh receives
from agents) and server to client (unmasked).

The machine's speed drifts over time, so the variants run interleaved, repeat
after repeat, and the report gives medians and ratios from the same run.

    python benchmarks/bench_framing.py [--size 300] [--messages 20000] [--repeats 9]

It prints which build ran: `SVANTIC_PURE_PYTHON=1` measures the sources even where a
compiled build is installed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from websockets.frames import Opcode as WebsocketsOpcode
from websockets.protocol import Protocol, Side, State
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from svantic_proto import COMPILED
from svantic_proto.framing import Framing, TextReceived

Round = Callable[[str], None]


def svantic_round(sender_is_client: bool) -> Round:
    sender = Framing(client=sender_is_client)
    receiver = Framing(client=not sender_is_client)

    def one(text: str) -> None:
        sender.send_text(text)
        events = receiver.receive_data(sender.data_to_send())
        if type(events[0]) is not TextReceived:
            raise RuntimeError(events)

    return one


def wsproto_round(sender_is_client: bool) -> Round:
    client = Connection(ConnectionType.CLIENT)
    server = Connection(ConnectionType.SERVER)
    sender, receiver = (client, server) if sender_is_client else (server, client)

    def one(text: str) -> None:
        receiver.receive_data(sender.send(TextMessage(data=text)))
        events = list(receiver.events())
        if type(events[0]) is not TextMessage:
            raise RuntimeError(events)

    return one


def websockets_round(sender_is_client: bool) -> Round:
    client = Protocol(Side.CLIENT, state=State.OPEN, max_size=1 << 20)
    server = Protocol(Side.SERVER, state=State.OPEN, max_size=1 << 20)
    sender, receiver = (client, server) if sender_is_client else (server, client)

    def one(text: str) -> None:
        sender.send_text(text.encode())
        for chunk in sender.data_to_send():
            receiver.receive_data(chunk)
        frame = receiver.events_received()[0]
        if frame.opcode is not WebsocketsOpcode.TEXT:  # type: ignore[union-attr]
            raise RuntimeError(frame)
        frame.data.decode()  # type: ignore[union-attr]

    return one


VARIANTS: dict[str, Callable[[bool], Round]] = {
    "svantic Framing": svantic_round,
    "wsproto Connection": wsproto_round,
    "websockets Protocol": websockets_round,
}


def measure(one: Round, text: str, messages: int) -> float:
    """Microseconds per message over `messages` sends and receives."""
    start = time.perf_counter()
    for _ in range(messages):
        one(text)
    return (time.perf_counter() - start) / messages * 1e6


JSON_DATA: dict[str, dict[str, object]] = {}
"""Raw figures for `--json PATH` (see `_jsonout.py`)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=300, help="message size in bytes")
    parser.add_argument("--messages", type=int, default=20000, help="messages per repeat")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the figures to PATH as JSON")
    args = parser.parse_args()
    text = ('{"v":1,"type":"dispatch_result","payload":{"result":"' + "x" * args.size)[: args.size]

    for sender_is_client, label in (
        (True, "client -> server (masked)"),
        (False, "server -> client"),
    ):
        rounds = {name: make(sender_is_client) for name, make in VARIANTS.items()}
        for one in rounds.values():  # warm up
            measure(one, text, 2000)
        samples: dict[str, list[float]] = {name: [] for name in rounds}
        for _ in range(args.repeats):
            for name, one in rounds.items():
                samples[name].append(measure(one, text, args.messages))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        base = medians["svantic Framing"]
        JSON_DATA.setdefault("directions", {})[label] = {
            "size": args.size, "us_per_message": medians, "us_per_message_per_repeat": samples,
        }
        build = "compiled" if COMPILED else "pure Python"
        print(f"\n{args.size}-byte text message, send + receive, {label}, {build} build")
        print(f"{'variant':<24}{'us/msg (median)':>16}{'vs Framing':>12}")
        for name, value in medians.items():
            print(f"{name:<24}{value:>16.2f}{value / base:>11.2f}x")
        print(
            f"Framing / wsproto: {base / medians['wsproto Connection']:.2f}x; "
            f"/ websockets: {base / medians['websockets Protocol']:.2f}x"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _jsonout import run_main  # --json PATH: the same figures as JSON

    sys.exit(run_main(main))

"""Out-of-order `dispatch_chunk` frames are bounded per dispatch in bytes, not only in count.

A chunk that skips a `seq` waits in the mesh until the gap fills. `Config.max_pending_chunks`
bounds how many wait; `Config.max_pending_chunk_bytes` bounds their size (the data's JSON
encoding), with the same answer: `BAD_FRAME`, then close 1002.
"""

from __future__ import annotations

from svantic_proto.config import Config
from svantic_proto.errors import RemoteProtocolError
from svantic_proto.events import ChunkReceived, ConnectionClosed, DispatchCompleted
from svantic_proto.testing import FakeClock, Pair

BIG = "x" * 900_000
"""A chunk's data of 900 KB (900,002 bytes as JSON): one fits in a 1 MiB message."""


def _streaming(config: Config | None = None) -> tuple[Pair, str]:
    pair = Pair(config, clock=FakeClock())
    pair.connect()
    dispatch_id = pair.mesh.send_dispatch("stream", deadline_ms=60_000, now=pair.clock.now)
    pair.pump()
    return pair, dispatch_id


def _send_chunk_lost(pair: Pair, dispatch_id: str, data: object) -> list[bytes]:
    """The agent sends a chunk whose bytes never reach the mesh; returns them."""
    pair.agent.send_chunk(dispatch_id, data)
    return pair.agent.data_to_send()


def _mesh_closed(pair: Pair) -> list[ConnectionClosed]:
    return pair.mesh_events_of(ConnectionClosed)


def test_gap_skipping_big_chunks_close_the_connection_at_the_byte_bound() -> None:
    pair, dispatch_id = _streaming()
    _send_chunk_lost(pair, dispatch_id, "lost")  # seq 0: everything after waits behind it
    budget = Config().max_pending_chunk_bytes
    held = 0
    while held + len(BIG) + 2 <= budget:  # these fit: well under the count bound too
        pair.agent.send_chunk(dispatch_id, BIG)
        pair.pump()
        held += len(BIG) + 2
        assert _mesh_closed(pair) == []
    pair.agent.send_chunk(dispatch_id, BIG)  # the one that would pass 4 MiB
    pair.pump()
    [closed] = _mesh_closed(pair)
    assert closed.code == 1002 and closed.in_flight == (dispatch_id,)
    assert isinstance(closed.error, RemoteProtocolError) and closed.error.close_code == 1002
    assert "out of order" in str(closed.error)
    assert pair.mesh_events_of(ChunkReceived) == []
    assert pair.mesh.stats.bad_frames == 1


def test_the_byte_bound_is_exact_and_answers_like_the_count_bound() -> None:
    # Two chunks of 50 JSON bytes fill a 100-byte budget exactly; the third is refused.
    pair, dispatch_id = _streaming(Config(max_pending_chunk_bytes=100))
    _send_chunk_lost(pair, dispatch_id, "lost")
    for _ in range(2):
        pair.agent.send_chunk(dispatch_id, "y" * 48)
        pair.pump()
    assert _mesh_closed(pair) == []
    pair.agent.send_chunk(dispatch_id, "z")
    pair.pump()
    [closed] = _mesh_closed(pair)
    assert closed.code == 1002
    assert isinstance(closed.error, RemoteProtocolError) and closed.error.code == "BAD_FRAME"


def test_filling_the_gap_gives_the_budget_back() -> None:
    pair, dispatch_id = _streaming(Config(max_pending_chunk_bytes=100))
    for _round in range(3):
        held = _send_chunk_lost(pair, dispatch_id, "late")  # delayed, not lost
        for _ in range(2):
            pair.agent.send_chunk(dispatch_id, "y" * 48)
            pair.pump()
        for data in held:
            pair.mesh.receive_data(data, pair.clock.now)
        pair.pump()
    assert _mesh_closed(pair) == []
    assert [c.seq for c in pair.mesh_events_of(ChunkReceived)] == list(range(9))


def test_a_terminal_frame_delivers_what_waits_and_in_order_chunks_are_never_bounded() -> None:
    pair, dispatch_id = _streaming()
    for _ in range(8):  # 7.2 MB in order: nothing waits, so nothing is measured
        pair.agent.send_chunk(dispatch_id, BIG)
        pair.pump()
    _send_chunk_lost(pair, dispatch_id, "lost")
    pair.agent.send_chunk(dispatch_id, BIG)
    pair.agent.send_result(dispatch_id, "done")
    pair.pump()
    assert _mesh_closed(pair) == []
    assert [c.seq for c in pair.mesh_events_of(ChunkReceived)] == [*range(8), 9]
    assert pair.mesh_events_of(DispatchCompleted) == [DispatchCompleted(dispatch_id, "done")]

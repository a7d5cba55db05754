"""The sans-IO TLS layer (`svantic_adapters._tls`) over memory, and its timeouts in the asyncio
adapter: real TLS from trustme certificates, no network beyond loopback, no sleeps."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from svantic_adapters._tls import CHUNK, TlsError, TlsSession
from svantic_adapters.asyncio import MeshServer

from svantic_proto import Config, InstanceRecord
from svantic_proto.errors import InvalidState, LocalProtocolError

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Contexts:
    server: ssl.SSLContext
    client: ssl.SSLContext
    stranger: ssl.SSLContext
    """A client that trusts another CA: the server's certificate does not verify for it."""


@pytest.fixture(scope="module")
def tls() -> Contexts:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    return Contexts(server, client, stranger)


def pair(tls: Contexts, client_context: ssl.SSLContext | None = None,
         server_hostname: str = HOST) -> tuple[TlsSession, TlsSession]:
    server = TlsSession(tls.server, server_side=True)
    client = TlsSession(client_context or tls.client, server_side=False,
                        server_hostname=server_hostname)
    return server, client


def handshake(server: TlsSession, client: TlsSession) -> None:
    """Carry each side's bytes to the other until both are done (a few flights)."""
    client.start()
    server.start()
    for _ in range(10):
        assert server.receive_data(client.data_to_send()) == b""
        assert client.receive_data(server.data_to_send()) == b""
        if server.handshake_complete and client.handshake_complete:
            return
    raise AssertionError("the handshake did not complete")


def test_handshake_over_memory_then_plaintext_both_ways(tls: Contexts) -> None:
    server, client = pair(tls)
    assert not server.handshake_complete and not client.handshake_complete
    handshake(server, client)

    client.send(b"GET /agents/connect HTTP/1.1\r\n\r\n")
    assert server.receive_data(client.data_to_send()) == b"GET /agents/connect HTTP/1.1\r\n\r\n"
    server.send(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    server.send(b"and more")
    assert client.receive_data(server.data_to_send()) == (
        b"HTTP/1.1 101 Switching Protocols\r\n\r\nand more")
    assert server.data_to_send() == b"" and client.data_to_send() == b""


def test_plaintext_that_arrives_with_the_handshake_end_is_returned(tls: Contexts) -> None:
    server, client = pair(tls)
    client.start()
    server_flight = server.receive_data(client.data_to_send())
    assert server_flight == b"" and not server.handshake_complete
    assert client.receive_data(server.data_to_send()) == b""
    assert client.handshake_complete  # a TLS 1.3 client may send right after its Finished
    client.send(b"early request")
    assert server.receive_data(client.data_to_send()) == b"early request"
    assert server.handshake_complete


def test_messages_larger_than_a_chunk_arrive_whole(tls: Contexts) -> None:
    server, client = pair(tls)
    handshake(server, client)
    message = bytes(range(256)) * (5 * CHUNK // 256 + 7)  # several records, odd length
    client.send(message)
    ciphertext = client.data_to_send()
    assert len(ciphertext) > len(message)
    assert server.receive_data(ciphertext) == message


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=3000), max_size=12),
       sizes=st.lists(st.integers(min_value=1, max_value=2 * CHUNK), min_size=1, max_size=4))
def test_any_chunking_of_the_ciphertext_yields_the_same_plaintext(
        tls: Contexts, cuts: list[int], sizes: list[int]) -> None:
    server, client = pair(tls)
    handshake(server, client)
    messages = [bytes([index % 251]) * size for index, size in enumerate(sizes)]
    for message in messages:
        client.send(message)
    ciphertext = client.data_to_send()
    received, start = [], 0
    for cut in [*cuts, len(ciphertext)]:
        received.append(server.receive_data(ciphertext[start:start + cut]))
        start += cut
    if start < len(ciphertext):
        received.append(server.receive_data(ciphertext[start:]))
    assert b"".join(received) == b"".join(messages)


def test_a_certificate_the_client_does_not_trust_is_refused_with_a_typed_error(
        tls: Contexts) -> None:
    server, client = pair(tls, client_context=tls.stranger)
    client.start()
    server.receive_data(client.data_to_send())
    with pytest.raises(TlsError) as caught:
        client.receive_data(server.data_to_send())
    error = caught.value
    assert error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert error.during_handshake and error.code == "TLS_FAILED"
    assert isinstance(error, ConnectionError)  # retried like any failed dial (spec 5)
    assert isinstance(error.__cause__, ssl.SSLCertVerificationError)
    assert "certificate authority" in str(error)
    with pytest.raises(InvalidState):
        client.receive_data(b"")

    alert = client.data_to_send()  # the client tells the server why
    with pytest.raises(TlsError) as told:
        server.receive_data(alert)
    assert told.value.during_handshake and "ALERT" in (told.value.reason or "")


def test_a_certificate_for_another_host_is_refused(tls: Contexts) -> None:
    server, client = pair(tls, server_hostname="mesh.example")
    client.start()
    server.receive_data(client.data_to_send())
    with pytest.raises(TlsError) as caught:
        client.receive_data(server.data_to_send())
    assert caught.value.reason == "CERTIFICATE_VERIFY_FAILED"
    assert "mesh.example" in str(caught.value)


@pytest.mark.parametrize(("garbage", "not_tls"), [
    (b"GET /agents/connect HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", True),  # ws:// to wss://
    (bytes(range(256)), True),
    (b"\x16\x03\x01\x00\x05hello", False),  # a handshake record, but no ClientHello
])
def test_a_peer_that_sends_garbage_gets_a_typed_error_not_plaintext(
        tls: Contexts, garbage: bytes, not_tls: bool) -> None:
    server = TlsSession(tls.server, server_side=True)
    server.start()
    with pytest.raises(TlsError) as caught:
        server.receive_data(garbage)
    assert caught.value.during_handshake and caught.value.reason
    assert ("does not speak TLS" in str(caught.value)) is not_tls
    with pytest.raises(InvalidState):  # a failed session is not used again
        server.receive_data(garbage)


def test_garbage_after_the_handshake_fails_the_session(tls: Contexts) -> None:
    server, client = pair(tls)
    handshake(server, client)
    with pytest.raises(TlsError) as caught:
        server.receive_data(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)  # fails to decrypt
    assert not caught.value.during_handshake


def test_close_notify_both_ways(tls: Contexts) -> None:
    server, client = pair(tls)
    handshake(server, client)
    client.send(b"last words")
    client.close()
    assert client.close_sent and not client.closed
    assert server.receive_data(client.data_to_send()) == b"last words"
    assert server.peer_closed and not server.closed
    server.close()  # the answer: then both may close TCP
    assert server.closed
    assert client.receive_data(server.data_to_send()) == b""
    assert client.peer_closed and client.closed
    client.close()  # again: nothing more
    assert client.data_to_send() == b""
    with pytest.raises(InvalidState):
        client.send(b"after close")


def test_plaintext_still_arrives_while_waiting_for_the_peers_close_notify(tls: Contexts) -> None:
    server, client = pair(tls)
    handshake(server, client)
    server.close()
    client.send(b"crossed in flight")
    assert server.receive_data(client.data_to_send()) == b"crossed in flight"
    assert not server.closed
    client.receive_data(server.data_to_send())
    client.close()
    server.receive_data(client.data_to_send())
    assert server.closed


def test_eof_during_the_handshake_is_a_typed_error_after_it_a_truncation(tls: Contexts) -> None:
    server, client = pair(tls)
    client.start()
    server.receive_data(client.data_to_send())
    with pytest.raises(TlsError) as caught:
        server.receive_eof()
    assert caught.value.during_handshake

    server, client = pair(tls)
    handshake(server, client)
    server.receive_eof()  # no close_notify: the layer above sees its own framing cut short
    assert not server.peer_closed


def test_api_misuse_raises_local_protocol_error(tls: Contexts) -> None:
    with pytest.raises(LocalProtocolError):
        TlsSession(tls.server, server_side=True, server_hostname=HOST)
    with pytest.raises(LocalProtocolError):
        TlsSession(tls.client, server_side=False)  # check_hostname needs the host dialled
    _, client = pair(tls)
    with pytest.raises(LocalProtocolError):
        client.send(b"before the handshake")


# -- the asyncio adapter's timeouts around the TLS layer (spec 4) ---------------------------


def _no_instances(instance_id: str) -> InstanceRecord | None:
    return None


def _refuse(token: str) -> object:
    raise ValueError("no tokens in this test")


async def _serve(tls: Contexts, config: Config) -> tuple[MeshServer, int]:
    server = MeshServer(ssl_context=tls.server, verify_token=_refuse,
                        lookup_instance=_no_instances, dispatch_auth=None, config=config)
    _, port = await server.start(HOST, 0)
    return server, port


async def _read_until_eof(reader: asyncio.StreamReader) -> bytes:
    received = bytearray()
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionError:
        pass
    return bytes(received)


@pytest.mark.timeout(30)
def test_asyncio_mesh_drops_a_peer_that_never_finishes_the_tls_handshake(tls: Contexts) -> None:
    config = Config(hello_timeout=0.3, close_timeout=0.3)

    async def scenario() -> float:
        server, port = await _serve(tls, config)
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)  # plain TCP, no hello
            started = loop.time()
            async with asyncio.timeout(10):
                await _read_until_eof(reader)
            writer.close()
            return loop.time() - started
        finally:
            await server.close(grace=0)

    assert asyncio.run(scenario()) < 5  # hello_timeout (0.3 s), not never


@pytest.mark.timeout(30)
def test_asyncio_mesh_closes_with_close_notify_and_drops_a_peer_that_never_answers(
        tls: Contexts) -> None:
    config = Config(hello_timeout=0.3, close_timeout=0.3)

    async def scenario() -> tuple[TlsSession, float]:
        server, port = await _serve(tls, config)
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            client = TlsSession(tls.client, server_side=False, server_hostname=HOST)
            client.start()
            writer.write(client.data_to_send())
            async with asyncio.timeout(10):
                while not client.handshake_complete:
                    client.receive_data(await reader.read(65536))
                    writer.write(client.data_to_send())
                # no upgrade request: the mesh gives up after hello_timeout, sends its
                # close_notify, and must not wait for ours longer than close_timeout
                while not client.peer_closed:
                    chunk = await reader.read(65536)
                    assert chunk, "TCP ended without close_notify"
                    client.receive_data(chunk)
                close_notify_at = loop.time()
                await _read_until_eof(reader)  # we never answer it
            writer.close()
            return client, loop.time() - close_notify_at
        finally:
            await server.close(grace=0)

    client, waited = asyncio.run(scenario())
    assert client.peer_closed and not client.close_sent
    assert waited < 3  # close_timeout (0.3 s), not forever


@pytest.mark.timeout(30)
def test_asyncio_mesh_closes_on_a_plain_http_request_to_its_tls_port(tls: Contexts) -> None:
    config = Config(hello_timeout=10.0)  # the TLS failure, not a timeout, ends it

    async def scenario() -> bytes:
        server, port = await _serve(tls, config)
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(b"GET /agents/connect?instance_id=a1 HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(5):
                answer = await _read_until_eof(reader)
            writer.close()
            assert not server.links  # nothing reached the core
            return answer
        finally:
            await server.close(grace=0)

    assert not asyncio.run(scenario()).startswith(b"HTTP/")

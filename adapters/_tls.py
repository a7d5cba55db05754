"""TLS without I/O: an `ssl.SSLObject` between two `ssl.MemoryBIO`s.

Why: asyncio's TLS transport (`asyncio/sslproto.py`) preallocates a 256 KiB read buffer per
connection, so an idle `wss://` connection (spec 1) cost about 290 KiB on the mesh. An
adapter that owns a plain TCP transport (or socket) instead feeds this object the
ciphertext it read and writes the ciphertext it is given; TLS itself stays OpenSSL's. It
reads no clock and knows no event loop, so asyncio, anyio or gevent can share it: the
handshake and shutdown timeouts (`Config.hello_timeout`, `Config.close_timeout`, spec 4)
are the adapter's timers.

Memory while idle: nothing is preallocated, and bytes go through OpenSSL in pieces of at
most `CHUNK`: ciphertext fed in, and plaintext to encrypt (one record per piece). A memory
BIO keeps the largest size it ever held, so the pieces bound what each BIO keeps after a
burst.
"""

from __future__ import annotations

import ssl

from svantic_proto.errors import InvalidState, LocalProtocolError, TlsError

__all__ = ["CHUNK", "PLAINTEXT_READ", "TlsError", "TlsSession"]

CHUNK = 4096
"""Bytes handed to OpenSSL at once, both ways: bounds what each memory BIO keeps."""
PLAINTEXT_READ = 16384
"""One `read()`: a TLS record carries at most 2**14 bytes of plaintext (RFC 8446 5.1)."""


class TlsSession:
    """One side of a TLS connection over memory: ciphertext in and out, plaintext in and out.

    After `start()`, `receive_data()`, `send()` and `close()`, call `data_to_send()` and
    write what it returns (handshake flights, session tickets, records, alerts).
    Verification is the context's (`verify_mode`, `check_hostname`); a client names the
    host it dialled as `server_hostname` (SNI and the host-name check).
    """

    __slots__ = (
        "_ciphertext",
        "_failed",
        "_incoming",
        "_outgoing",
        "_stalled",
        "_tls",
        "close_sent",
        "handshake_complete",
        "peer_closed",
    )

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        if server_side and server_hostname is not None:
            raise LocalProtocolError("a server-side TLS session takes no server_hostname")
        if not server_side and context.check_hostname and not server_hostname:
            raise LocalProtocolError(
                "this context checks the server's host name: pass server_hostname "
                "(the host dialled)")
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._ciphertext: list[bytes] | None = None
        """Records taken out of the outgoing BIO while encrypting a large send."""
        self._stalled = b""
        """Plaintext OpenSSL could not encrypt before reading (a TLS 1.2 renegotiation)."""
        self._failed = False
        self.handshake_complete = False
        self.peer_closed = False
        """The peer sent close_notify: no more plaintext comes (RFC 8446 6.1)."""
        self.close_sent = False

    @property
    def closed(self) -> bool:
        """Both close_notify alerts went their way: the transport can be closed."""
        return self.close_sent and self.peer_closed

    @property
    def failed(self) -> bool:
        """A `TlsError` was raised: the session takes nothing more."""
        return self._failed

    def start(self) -> None:
        """Begin the handshake; a client's first flight is then in `data_to_send()`."""
        self._usable()
        self._handshake()

    def receive_data(self, data: bytes | memoryview) -> bytes:
        """Ciphertext read from the transport in; the plaintext it completes out (`b""` if none).

        Drives the handshake first: check `handshake_complete` (plaintext may follow the
        handshake in the same bytes) and `peer_closed`; then call `data_to_send()`.
        Raises `TlsError` when the peer's bytes are not an acceptable TLS session.
        """
        self._usable()
        if len(data) <= CHUNK:  # the usual case: one message or a few
            self._incoming.write(data)
            return self._decrypt()
        pieces = []
        view = memoryview(data)
        for start in range(0, len(data), CHUNK):
            self._incoming.write(view[start:start + CHUNK])
            piece = self._decrypt()
            if piece:
                pieces.append(piece)
            if self.peer_closed:
                break
        return b"".join(pieces)

    def receive_eof(self) -> None:
        """The transport reached EOF. During the handshake that is a `TlsError`; after it,
        an EOF without close_notify leaves `peer_closed` false (a truncation the layer
        above detects by its own framing, e.g. a missing WebSocket close)."""
        self._usable()
        self._incoming.write_eof()
        if not self.handshake_complete:
            self._failed = True
            raise TlsError("the peer closed the connection during the TLS handshake",
                           during_handshake=True)

    def send(self, data: bytes) -> None:
        """Plaintext to encrypt (records of at most `CHUNK`); then call `data_to_send()`."""
        self._usable()
        if not self.handshake_complete:
            raise LocalProtocolError("send() before the TLS handshake completed: "
                                     "wait for handshake_complete")
        if self.close_sent:
            raise InvalidState("send() after close(): this TLS session is closing")
        if self._stalled:  # keep the order: behind what is waiting
            self._stalled += data
            return
        if len(data) <= CHUNK:
            self._encrypt(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), CHUNK):
            if not self._encrypt(view[start:start + CHUNK]):
                self._stalled += view[start + CHUNK:]
                return
            self._take_ciphertext()

    def data_to_send(self) -> bytes:
        """The ciphertext to write to the transport now (`b""` if none)."""
        ciphertext = self._outgoing.read()
        if self._ciphertext is not None:
            self._ciphertext.append(ciphertext)
            ciphertext = b"".join(self._ciphertext)
            self._ciphertext = None
        return ciphertext

    def close(self) -> None:
        """Send close_notify (RFC 8446 6.1), then read on until the peer's (`closed`).

        Before the handshake completed there is nothing to close: it only marks the
        session closed. Calling it again does nothing.
        """
        if self.close_sent:
            return
        self.close_sent = True
        if not self.handshake_complete or self._failed:
            self.peer_closed = True  # nothing to wait for
            return
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            return  # ours is out; theirs has not come yet
        except ssl.SSLError:
            self.peer_closed = True  # a broken session: nothing more to wait for
            return
        self.peer_closed = True

    # -- inside ------------------------------------------------------------------------

    def _usable(self) -> None:
        if self._failed:
            raise InvalidState("this TLS session failed: open a new connection")

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise self._failure(exc) from exc
        self.handshake_complete = True
        return True

    def _decrypt(self) -> bytes:
        """All the plaintext the incoming BIO completes; it is empty afterwards."""
        if not self.handshake_complete and not self._handshake():
            return b""
        pieces = []
        read, incoming = self._tls.read, self._incoming
        try:
            while True:
                piece = read(PLAINTEXT_READ)
                if not piece:  # close_notify
                    self.peer_closed = True
                    break
                pieces.append(piece)
                if not incoming.pending:  # OpenSSL reads no further ahead than one record
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify after ours
            self.peer_closed = True
        except ssl.SSLError as exc:
            raise self._failure(exc) from exc
        if self._stalled and not self.close_sent:
            self._unstall()
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    def _encrypt(self, data: bytes | memoryview) -> bool:
        """Encrypt into the outgoing BIO; False when OpenSSL must read first."""
        try:
            self._tls.write(data)
        except ssl.SSLWantReadError:
            self._stalled += data
            return False
        except ssl.SSLError as exc:
            raise self._failure(exc) from exc
        return True

    def _unstall(self) -> None:
        """Retry the stalled plaintext now that OpenSSL has read (same bytes first, as it
        requires)."""
        stalled, self._stalled = self._stalled, b""
        self._take_ciphertext()
        self.send(stalled)

    def _take_ciphertext(self) -> None:
        """Move the outgoing BIO's bytes aside, so the BIO stays about one CHUNK large."""
        ciphertext = self._outgoing.read()
        if ciphertext:
            if self._ciphertext is None:
                self._ciphertext = [ciphertext]
            else:
                self._ciphertext.append(ciphertext)

    def _failure(self, exc: ssl.SSLError) -> TlsError:
        """A typed error whose message says what failed and what to check."""
        self._failed = True
        during = not self.handshake_complete
        reason = exc.reason
        what = f"{reason or type(exc).__name__}"
        verify_message = getattr(exc, "verify_message", None)
        if verify_message:
            what += f": {verify_message}"
        hint = ""
        if isinstance(exc, ssl.SSLCertVerificationError):
            hint = ": check the certificate authority (cafile / ssl_context) and the host name"
        elif reason in _NOT_TLS:
            hint = ": the peer does not speak TLS (ws:// and wss:// mixed up?)"
        elif reason is not None and "_ALERT_" in reason:
            hint = ": the peer refused the session (its TLS alert)"
        return TlsError(f"TLS {'handshake' if during else 'session'} failed ({what}){hint}",
                        reason=reason, during_handshake=during)


_NOT_TLS = frozenset({"HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL",
                      "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})

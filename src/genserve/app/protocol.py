"""HTTP/1.1 connections with bounds: uvicorn's httptools protocol, plus the limits it lacks.

uvicorn with httptools accepts a header of any size (httptools buffers a header until it ends: eight
unfinished 64 MB headers held 518 MB) and any number of headers, and a client that sends its request
head a byte at a time holds the connection for as long as it likes (slowloris: the keep-alive timer
stops at the first byte). Before a request's head is complete, this protocol counts its bytes and its
headers and times it:

- more than ``max_header_bytes`` (request line and headers) → 431, connection closed;
- more than ``max_headers`` headers → 431, connection closed;
- no complete head ``header_timeout_s`` after the connection opened or the previous response ended
  → 408, connection closed. A response still being sent (a long stream) is never cut by it;
- a request body that pauses longer than ``body_timeout_s`` between two pieces (while the server is
  reading it) → 408, connection closed: a slow link may take as long as it needs, a stalled one not.

All of it happens before the app sees the request, so it costs a client without a key nothing and
the server little. A refusal closes as HTTP servers should (RFC 9112, 9.6): the answer, then the
sending side, then what the client still sends is read and dropped, up to ``LINGER_BYTES`` or
``LINGER_S``, before the connection closes. Closed at once with unread bytes, the kernel would reset the
connection, and a client still sending its 100 KB header could lose the 431 before reading it.
Everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
import json
from asyncio import TimerHandle
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

LINGER_S = 2.0
LINGER_BYTES = 1 << 20


class _TooLarge(Exception):
    pass


class _Clock:
    """One restartable timer on the event loop: ``start`` (re)arms it, ``stop`` cancels it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, on_expiry: Callable[[], None]) -> None:
        self.loop, self.seconds, self.on_expiry = loop, seconds, on_expiry
        self._handle: TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        self.stop()
        self._handle = self.loop.call_later(self.seconds, self._expired)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expired(self) -> None:
        self._handle = None
        self.on_expiry()


def bounded_protocol(max_header_bytes: int, max_headers: int, header_timeout_s: float,
                     body_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` protocol class with these limits (``uvicorn.Config(http=...)``)."""

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._waiting_head = True  # between messages, or inside a head not yet complete
            self._head_bytes = 0  # raw bytes of a head still incomplete: bounds what the parser buffers
            self._head_count = 0
            self._head_size = 0  # request line and headers as parsed: exact, where _head_bytes counts raw chunks
            self._too_large: str | None = None
            self._ended_here = False
            self._head_clock = _Clock(self.loop, header_timeout_s, self._head_timed_out)
            self._body_clock = _Clock(self.loop, body_timeout_s, self._body_timed_out)
            self._linger: TimerHandle | None = None  # set once refused: what arrives now is dropped
            self._linger_left = LINGER_BYTES

        # the head's clock --------------------------------------------------------------------
        def _head_timed_out(self) -> None:
            responding = self.cycle is not None and not self.cycle.response_complete
            if not self._waiting_head or responding or self.transport.is_closing():
                return
            if not self._head_bytes:  # an idle connection: closed as keep-alive closes it, without a reply a
                self.transport.close()  # client could take for its next request's
                return
            self._refuse(408, "request_timeout", f"The request's headers did not arrive within {header_timeout_s:g} s.")

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_clock.start()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_clock.stop()
            self._body_clock.stop()
            if self._linger is not None:
                self._linger.cancel()
            super().connection_lost(exc)

        # the body's clock: the longest pause between two pieces of a body ---------------------------
        def _body_timed_out(self) -> None:
            cycle = self.cycle
            if self._waiting_head or cycle is None or self.transport.is_closing():
                return
            if self.flow.read_paused or cycle.waiting_for_100_continue:  # waiting on the app, not the client
                self._body_clock.start()
                return
            if cycle.response_started:  # an early answer (a 401, a 413) went out: nothing more to say
                self.transport.close()
                return
            self._refuse(408, "request_timeout", f"The request's body stopped for {body_timeout_s:g} s.")

        def _expects_body(self) -> bool:
            for name, value in self.headers:
                if name == b"content-length":
                    return value.strip() not in (b"", b"0")
                if name == b"transfer-encoding":
                    return True
            return False

        def on_body(self, body: bytes) -> None:
            if self._body_clock.running:
                self._body_clock.start()  # a pause is timed, not the whole upload: a slow link may take long
            super().on_body(body)

        # counting ----------------------------------------------------------------------------
        def data_received(self, data: bytes) -> None:
            if self._linger is not None:  # refused: drained, not parsed
                self._linger_left -= len(data)
                if self._linger_left <= 0:
                    self.transport.close()
                return
            # Counted after parsing: a chunk in which the head completes (and the body begins) is not the
            # head's, and neither is one in which the previous message ended.
            self._ended_here = False
            super().data_received(data)
            if self._waiting_head and not self._ended_here and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, "request_header_fields_too_large",
                                 f"The request's headers exceed {max_header_bytes} bytes.")

        def on_url(self, url: bytes) -> None:
            self._head_size += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_count += 1
            self._head_size += len(name) + len(value) + 4
            if self._head_count > max_headers:
                self._too_large = f"The request has more than {max_headers} headers."
            elif self._head_size > max_header_bytes:
                self._too_large = f"The request's headers exceed {max_header_bytes} bytes."
            if self._too_large is not None:
                raise _TooLarge  # httptools stops parsing; uvicorn answers its parser errors with send_400_response
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._waiting_head = False
            self._head_clock.stop()
            super().on_headers_complete()
            if self._expects_body():
                self._body_clock.start()

        def on_message_complete(self) -> None:
            self._body_clock.stop()
            self._waiting_head, self._ended_here = True, True
            self._head_bytes = self._head_count = self._head_size = 0
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._waiting_head and not self.transport.is_closing():
                self._head_clock.start()

        # refusing ----------------------------------------------------------------------------
        def send_400_response(self, msg: str) -> None:
            if self._too_large is not None:
                return self._refuse(431, "request_header_fields_too_large", self._too_large)
            super().send_400_response(msg)

        def _refuse(self, status: int, code: str, message: str) -> None:
            self._head_clock.stop()
            self._body_clock.stop()
            body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                         "code": code}}).encode()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [b"content-type: application/json\r\n", b"content-length: ", str(len(body)).encode(), b"\r\n",
                     b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            if not self.transport.can_write_eof():
                self.transport.close()
                return
            self.transport.write_eof()  # the answer, then FIN; the client's remaining bytes are drained
            self._linger = self.loop.call_later(LINGER_S, self.transport.close)

    return BoundedHttpToolsProtocol

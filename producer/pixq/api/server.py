"""How ``pixq api`` listens: its socket bound before anything is printed, and uvicorn's HTTP protocol
with the limits uvicorn lacks on a request's head.

* ``bind`` takes the address first: a port in use is one ``ConfigError`` line (exit 2), never a
  "serving on" line followed by uvicorn's own exit.
* ``limited_protocol``: uvicorn's httptools protocol buffers a head of any size (an 8 MB
  ``Authorization`` header was read whole) and waits for it forever. This one answers ``431`` once a
  head passes ``MAX_HEAD_BYTES`` and ``408`` when a head has not arrived ``timeout_s`` after the
  connection opened (or after its first byte, on a kept-alive connection: between requests uvicorn's
  keep-alive timeout closes it), closing the connection either way. A body's pieces have their own
  time limit in the app (``middleware.BodyLimit``), where the 408 is an ordinary response.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from pixq.errors import ConfigError

MAX_HEAD_BYTES = 16 * 1024  # request line and headers (an API key is ~70 bytes)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; ``ConfigError`` naming the option when it cannot be had."""
    wanted = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn: "localhost" is 127.0.0.1
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, family=wanted, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host: {host!r} is not an address to listen on ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _raw_response(status: int, reason: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def limited_protocol(timeout_s: float, refused: Callable[[int], None]) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with a head size and time limit; ``refused(code)`` counts each refusal."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head_bytes = 0
            self.in_head = True  # reading a request line and headers (or waiting for the first)
            self.heads = 0  # heads read on this connection
            self.head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.in_head and self.head_timer is None:
                self._arm()  # a kept-alive connection's next request has begun
            heads = self.heads
            super().data_received(data)
            if self.in_head and self.heads == heads and not self.transport.is_closing():
                self.head_bytes += len(data)  # all of it head (a chunk that ended one is a body's or the next's)
                if self.head_bytes > MAX_HEAD_BYTES:
                    self._refuse(431, "Request Header Fields Too Large",
                                 f"request line and headers over {MAX_HEAD_BYTES} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.in_head = True

        def on_headers_complete(self) -> None:
            self.in_head, self.head_bytes = False, 0
            self.heads += 1
            self._disarm()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self.in_head = True  # the next bytes are the next request's head

        def send_400_response(self, msg: str) -> None:
            super().send_400_response(msg)  # a head httptools cannot parse
            refused(400)

        def _arm(self) -> None:
            self._disarm()
            self.head_timer = self.loop.call_later(timeout_s, self._head_late)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_late(self) -> None:
            self.head_timer = None
            idle = self.cycle is None or self.cycle.response_complete  # else the app answers a request yet
            if self.in_head and idle and not self.transport.is_closing():
                self._refuse(408, "Request Timeout", f"request head not received within {timeout_s:g} s")

        def _refuse(self, status: int, reason: str, message: str) -> None:
            self._disarm()
            if self.cycle is None or self.cycle.response_complete:  # else a response is on its way
                self.transport.write(_raw_response(status, reason, message))
                refused(status)
            self.transport.close()

    return LimitedHttpToolsProtocol


def serve(app: Any, sock: socket.socket, timeout_s: float, refused: Callable[[int], None]) -> None:
    """Run uvicorn on the bound ``sock`` until SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, http=limited_protocol(timeout_s, refused), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])

"""A loopback TCP proxy that can freeze, heal and cut the network between a client and a server.

    proxy = TcpProxy("127.0.0.1", server.port); port = proxy.start()
    engine = create_engine(server.url(db, port=port), pool_pre_ping=True)
    proxy.partition()   # frozen: no byte forwarded either way, no socket closed; new clients are accepted
    proxy.heal()        # forwarding resumes; nothing was dropped (see below)
    proxy.cut()         # every connection closed with a RST; new ones work
    proxy.stop()        # closes everything, joins its thread

One thread (a selector loop) serves every connection. While partitioned the proxy neither reads nor writes:
bytes wait in the kernel's socket buffers and the proxy's own buffer, and heal() delivers all of them, in
order (no byte is dropped; to lose the connections as well, cut() before heal()). A client accepted
during a partition is connected to the server only at heal(), so the server sees nothing of it until then.

What a partition does NOT imitate: the proxy's kernel still acknowledges the client's bytes and answers TCP
keepalives, so TCP-level detection (keepalives, tcp_user_timeout) never fires; only application timeouts
do (libpq's connect_timeout for new connections; for a query in flight, a client-side timer; the server's
statement_timeout fires but its error is frozen too).
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_CHUNK = 65536


def _reset(sock: socket.socket | None) -> None:
    """Close with a RST (SO_LINGER 0) rather than a FIN."""
    if sock is None or sock.fileno() < 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Pair:
    """A client connection and its connection to the target."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.connecting = False
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        self.client_eof = False      # the client sent FIN
        self.upstream_eof = False    # the target sent FIN
        self.upstream_shut = False   # we passed the client's FIN on
        self.client_shut = False     # we passed the target's FIN on
        self.closed = False


class TcpProxy:
    """Forwards 127.0.0.1:<port> to target_host:target_port; see the module docstring."""

    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, buffer_limit: int = 1 << 20) -> None:
        self.target = (target_host, target_port)
        self.listen_address = (listen_host, listen_port)
        self.buffer_limit = buffer_limit
        self.port: int | None = None
        self.accepted = 0                      # connections accepted so far
        self.errors: list[BaseException] = []  # unexpected errors of the loop (should stay empty)
        self._partitioned = False
        self._pairs: set[_Pair] = set()
        self._events: dict[socket.socket, int] = {}
        self._commands: list[tuple[Callable[[], Any], threading.Event, list[Any]]] = []
        self._commands_lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    # -- public API (any thread) ----------------------------------------------------------------------
    def start(self) -> int:
        """Listen and start forwarding; returns the port to connect to."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._listener = socket.create_server(self.listen_address, backlog=1024)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, _READ, "listener")
        self._selector.register(self._wake_r, _READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"TcpProxy-{self.port}", daemon=True)
        self._thread.start()
        return self.port

    def partition(self) -> None:
        """Stop forwarding in both directions, closing nothing. Returns once in effect."""
        self._call(self._do_partition)

    def heal(self) -> None:
        """Resume forwarding (everything held back is delivered); connect clients accepted meanwhile."""
        self._call(self._do_heal)

    def cut(self) -> None:
        """Close every connection, both sides, with a RST. The proxy keeps listening (and its partition)."""
        self._call(self._do_cut)

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    @property
    def connection_count(self) -> int:
        """Client connections open through the proxy (including those waiting for a heal)."""
        return self._call(lambda: len(self._pairs))

    def stop(self) -> None:
        """Close the listener and every connection (RST), and join the thread. Idempotent."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            self._call(self._do_stop)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("TcpProxy thread did not stop")
        self._thread = None
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run fn in the loop's thread and wait for it (the loop owns the sockets)."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("TcpProxy is not running")
        done = threading.Event()
        result: list[Any] = []
        with self._commands_lock:
            self._commands.append((fn, done, result))
        assert self._wake_w is not None
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # already woken
        if not done.wait(timeout):
            raise RuntimeError("TcpProxy loop did not answer")
        if result and isinstance(result[0], BaseException):
            raise result[0]
        return result[0] if result else None

    # -- the loop (its own thread) --------------------------------------------------------------------
    def _run(self) -> None:
        assert self._selector is not None
        while not self._stopping:
            try:
                for key, mask in self._selector.select():
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        self._run_commands()
                    else:
                        pair, side = key.data
                        if not pair.closed:
                            self._serve(pair, side, mask)
            except Exception as exc:  # never die silently: tests would hang
                self.errors.append(exc)
        self._run_commands()  # answer callers that raced with the stop

    def _run_commands(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for fn, done, result in commands:
            try:
                result.append(fn())
            except BaseException as exc:
                result.append(exc)
            done.set()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.errors.append(exc)
                return
            self.accepted += 1
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client)
            self._pairs.add(pair)
            if not self._partitioned:
                self._connect(pair)
            self._update(pair)

    def _connect(self, pair: _Pair) -> None:
        upstream = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET, socket.SOCK_STREAM)
        upstream.setblocking(False)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair.upstream = upstream
        code = upstream.connect_ex(self.target)
        if code == errno.EINPROGRESS:
            pair.connecting = True
        elif code:
            self._close(pair, reset=True)  # refused: the client sees a reset, as if the server were down

    def _serve(self, pair: _Pair, side: str, mask: int) -> None:
        try:
            if side == "upstream" and pair.connecting:
                assert pair.upstream is not None
                if pair.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self._close(pair, reset=True)
                    return
                pair.connecting = False
            else:
                sock = pair.client if side == "client" else pair.upstream
                assert sock is not None
                out = pair.to_client if side == "client" else pair.to_upstream
                if mask & _WRITE and out:
                    del out[:sock.send(out)]
                if mask & _READ:
                    data = sock.recv(_CHUNK)
                    inbox = pair.to_upstream if side == "client" else pair.to_client
                    if data:
                        inbox += data
                        other = pair.upstream if side == "client" else pair.client
                        assert other is not None
                        try:  # at once, saving a round through the selector
                            del inbox[:other.send(inbox)]
                        except (BlockingIOError, InterruptedError):
                            pass
                    elif side == "client":
                        pair.client_eof = True
                    else:
                        pair.upstream_eof = True
                self._pass_on_eof(pair)
                if pair.closed:
                    return
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # reset, broken pipe: the other side gets a reset too
            self._close(pair, reset=True)
            return
        self._update(pair)

    def _pass_on_eof(self, pair: _Pair) -> None:
        """Half-close: a FIN is passed on once the data before it is delivered; both done: close."""
        if pair.client_eof and not pair.to_upstream and not pair.upstream_shut and pair.upstream:
            pair.upstream.shutdown(socket.SHUT_WR)
            pair.upstream_shut = True
        if pair.upstream_eof and not pair.to_client and not pair.client_shut:
            pair.client.shutdown(socket.SHUT_WR)
            pair.client_shut = True
        if pair.client_eof and pair.upstream_eof and pair.upstream_shut and pair.client_shut:
            self._close(pair, reset=False)

    def _update(self, pair: _Pair) -> None:
        """Register the events each socket of the pair waits for (none while partitioned)."""
        if pair.closed:
            return
        client_events = upstream_events = 0
        if not self._partitioned:
            if pair.upstream is not None and pair.connecting:
                upstream_events = _WRITE
            elif pair.upstream is not None:
                if not pair.client_eof and len(pair.to_upstream) < self.buffer_limit:
                    client_events |= _READ
                if pair.to_client:
                    client_events |= _WRITE
                if not pair.upstream_eof and len(pair.to_client) < self.buffer_limit:
                    upstream_events |= _READ
                if pair.to_upstream:
                    upstream_events |= _WRITE
        self._register(pair.client, client_events, (pair, "client"))
        if pair.upstream is not None:
            self._register(pair.upstream, upstream_events, (pair, "upstream"))

    def _register(self, sock: socket.socket, events: int, data: Any) -> None:
        assert self._selector is not None
        current = self._events.get(sock, 0)
        if events == current:
            return
        if not events:
            self._selector.unregister(sock)
            del self._events[sock]
        elif not current:
            self._selector.register(sock, events, data)
            self._events[sock] = events
        else:
            self._selector.modify(sock, events, data)
            self._events[sock] = events

    def _close(self, pair: _Pair, *, reset: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        for sock in (pair.client, pair.upstream):
            if sock is not None and sock in self._events:
                self._register(sock, 0, None)
            if reset:
                _reset(sock)
            elif sock is not None:
                sock.close()

    def _do_partition(self) -> None:
        self._partitioned = True
        for pair in list(self._pairs):
            self._update(pair)

    def _do_heal(self) -> None:
        self._partitioned = False
        for pair in list(self._pairs):
            if pair.upstream is None:
                self._connect(pair)
            self._update(pair)

    def _do_cut(self) -> None:
        for pair in list(self._pairs):
            self._close(pair, reset=True)

    def _do_stop(self) -> None:
        self._do_cut()
        assert self._selector is not None and self._listener is not None
        self._selector.unregister(self._listener)
        self._listener.close()
        self._stopping = True


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[str, int], TcpProxy]]:
    """A factory: tcp_proxy(host, port) -> a started TcpProxy; every proxy is stopped after the test."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
    for proxy in proxies:
        assert not proxy.errors, f"TcpProxy loop errors: {proxy.errors!r}"

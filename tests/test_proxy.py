"""The fault-injecting TCP proxy: pass, delay, reset, blackhole, refuse; real services behind it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from participants.stomp_client import ClientIdInUse
from scenarios.config import Settings
from scenarios.lab.proxy import FaultProxy, Mode
from tests.conftest import open_stomp_client


class EchoServer:
    """Echoes what it reads; records what its side of each connection saw."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.received = b""
        self.endings: list[str] = []  # "eof" or "reset", one per finished connection
        self.changed = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.changed:
                self.accepted += 1
                self.changed.notify_all()
            thread = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _echo(self, conn: socket.socket) -> None:
        ending = "eof"
        with conn:
            try:
                while data := conn.recv(4096):
                    with self.changed:
                        self.received += data
                        self.changed.notify_all()
                    conn.sendall(data)
            except ConnectionResetError:
                ending = "reset"
        with self.changed:
            self.endings.append(ending)
            self.changed.notify_all()

    def wait_for(self, predicate: object, timeout: float = 5.0) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self._stopped = True
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """An echo server on a free port."""
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    """A started proxy in front of the echo server."""
    with FaultProxy(echo.address, name="echo") as p:
        yield p


def connect(p: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def is_refused(p: FaultProxy) -> bool:
    """True when a new connection is reset or closed before it answers (at any step)."""
    try:
        with connect(p) as sock:
            sock.sendall(b"x")
            return sock.recv(10) == b""
    except ConnectionError:
        return True


def round_trip(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def test_passes_bytes_both_ways_and_counts_them(proxy: FaultProxy) -> None:
    """Unfaulted, the proxy is transparent: what goes in comes back, and is counted."""
    with connect(proxy) as sock:
        assert round_trip(sock, b"hello" * 1000) == b"hello" * 1000
    assert proxy.stats.accepted == 1
    assert proxy.stats.bytes_to_server == proxy.stats.bytes_to_client == 5000


def test_delay_adds_latency_to_each_direction(proxy: FaultProxy) -> None:
    """With a 0.1 s delay a round trip takes at least 0.2 s; removing it makes it fast again."""
    with connect(proxy) as sock:
        proxy.delay(0.1)
        start = time.monotonic()
        assert round_trip(sock) == b"ping"
        assert time.monotonic() - start >= 0.2
        proxy.delay(0)
        start = time.monotonic()
        assert round_trip(sock) == b"ping"
        assert time.monotonic() - start < 0.1
    with pytest.raises(ValueError, match=">= 0"):
        proxy.delay(-1)


def test_reset_sends_rst_to_both_sides(proxy: FaultProxy, echo: EchoServer) -> None:
    """reset() ends every open connection with a TCP RST seen by the client and the server."""
    with connect(proxy) as sock:
        assert round_trip(sock) == b"ping"
        assert proxy.reset() == 1
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(10)
    assert echo.wait_for(lambda: echo.endings == ["reset"])
    with connect(proxy) as sock:  # new connections work again
        assert round_trip(sock) == b"ping"


def test_blackhole_holds_traffic_until_heal(proxy: FaultProxy, echo: EchoServer) -> None:
    """Blackholed, nothing reaches the server; healed, the held bytes are delivered in order."""
    with connect(proxy) as sock:
        assert round_trip(sock, b"a") == b"a"
        proxy.blackhole()
        assert proxy.mode is Mode.BLACKHOLE
        sock.sendall(b"bc")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert echo.received == b"a"
        proxy.heal()
        sock.settimeout(5)
        assert sock.recv(10) == b"bc"
    assert echo.received == b"abc"


def test_blackhole_holds_new_connections_and_closes(proxy: FaultProxy, echo: EchoServer) -> None:
    """In a blackhole a new connection is not forwarded, and a client's close is not either."""
    with connect(proxy) as old:
        assert round_trip(old) == b"ping"
        proxy.blackhole()
    with connect(proxy):
        time.sleep(0.3)
        assert echo.accepted == 1  # the new connection did not reach the server
        assert echo.endings == []  # nor did the old one's close
        proxy.heal()
        assert echo.wait_for(lambda: echo.accepted == 2)
    assert echo.wait_for(lambda: sorted(echo.endings) == ["eof", "eof"])


def test_heal_with_reset_drops_held_bytes(proxy: FaultProxy, echo: EchoServer) -> None:
    """heal(reset=True): what was held never arrives; the connection is reset on both sides."""
    with connect(proxy) as sock:
        assert round_trip(sock, b"a") == b"a"
        proxy.blackhole()
        sock.sendall(b"lost")
        time.sleep(0.1)
        assert proxy.heal(reset=True) == 1
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
    assert echo.wait_for(lambda: echo.endings == ["reset"])
    assert echo.received == b"a"
    assert proxy.mode is Mode.PASS and proxy.stats.resets == 1


def test_refuse_resets_new_connections_only(proxy: FaultProxy) -> None:
    """refuse(): a new connection is reset at once while an open one keeps working."""
    with connect(proxy) as old:
        assert round_trip(old) == b"ping"
        proxy.refuse()
        assert is_refused(proxy)
        assert round_trip(old) == b"ping"
        proxy.heal()
    assert proxy.stats.refused == 1


def test_client_close_reaches_the_server(proxy: FaultProxy, echo: EchoServer) -> None:
    """A client that closes makes the proxy close the server side (so the server frees it)."""
    with connect(proxy) as sock:
        assert round_trip(sock) == b"ping"
    assert echo.wait_for(lambda: echo.endings == ["eof"])
    deadline = time.monotonic() + 5
    while proxy.open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.open_connections == 0


def test_a_reset_while_the_proxy_connects_upstream_ends_that_connection_only(
    proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset that comes while the proxy still connects to its service resets that client,
    raises nothing on the proxy's loop, and the next connection passes."""
    assert proxy._loop is not None
    errors: list[dict[str, object]] = []
    proxy._loop.call_soon_threadsafe(
        proxy._loop.set_exception_handler, lambda _loop, context: errors.append(context)
    )
    opening = asyncio.open_connection

    async def slow_open(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.0)  # the service is slow to accept: the reset comes first
        return await opening(*args, **kwargs)

    monkeypatch.setattr(asyncio, "open_connection", slow_open)
    with connect(proxy) as sock:
        deadline = time.monotonic() + 5
        while proxy.open_connections == 0:
            assert time.monotonic() < deadline, "the proxy never took the connection"
            time.sleep(0.01)
        assert proxy.reset() == 1
        try:
            ended = sock.recv(10) == b""
        except ConnectionError:
            ended = True
        assert ended
    monkeypatch.undo()
    time.sleep(1.2)  # past the slow connect had it not been cancelled
    assert errors == []
    with connect(proxy) as sock:
        assert round_trip(sock) == b"ping"


def test_upstream_down_is_a_reset_for_the_client() -> None:
    """A proxy whose service is down resets the client, as a refused connection would."""
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{spare.getsockname()[1]}"
    with FaultProxy(dead, name="dead") as p:
        assert is_refused(p)


@pytest.mark.lab
def test_postgres_through_the_proxy_sees_resets_as_connection_errors(settings: Settings) -> None:
    """Real PostgreSQL behind the proxy: queries work, a reset breaks the session, delay slows."""
    info = psycopg.conninfo.conninfo_to_dict(settings.pg_a)
    upstream = f"{info['host']}:{info['port']}"
    with FaultProxy(upstream, name="pg-a") as p:
        dsn = psycopg.conninfo.make_conninfo(settings.pg_a, host="127.0.0.1", port=p.port)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            p.reset()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with psycopg.connect(dsn, autocommit=True) as conn:
            p.delay(0.05)
            start = time.monotonic()
            assert conn.execute("SELECT 2").fetchone() == (2,)
            assert time.monotonic() - start >= 0.1


@pytest.mark.lab
def test_broker_keeps_a_client_id_while_its_dead_client_is_partitioned(settings: Settings) -> None:
    """Behind a blackhole the broker never learns that a client went: its client-id stays taken."""
    client_id = f"proxy-test-{time.monotonic_ns()}"
    with FaultProxy(settings.stomp, name="stomp") as p:
        client = open_stomp_client(p.address, client_id=client_id)
        p.blackhole()
        client.drop()  # the client is gone, but its close is held in the partition
        with pytest.raises(ClientIdInUse):
            open_stomp_client(settings.stomp, client_id=client_id).close()
        p.heal()
        deadline = time.monotonic() + 10
        while True:
            try:
                open_stomp_client(settings.stomp, client_id=client_id).close()
                break
            except ClientIdInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    with contextlib.suppress(Exception):
        client.close()

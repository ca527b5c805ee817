"""A TCP proxy on 127.0.0.1 that resets, blackholes, delays or refuses connections.

The crash torture puts one :class:`FaultProxy` between the coordinator and
each service (PostgreSQL A, B, the broker's STOMP port) by pointing
``TWOPC_PG_A``/``TWOPC_PG_B``/``TWOPC_STOMP`` of the child process at it, and
injects network faults from the parent:

- :meth:`FaultProxy.reset`: every open connection gets a TCP RST, on both sides.
- :meth:`FaultProxy.blackhole`: nothing flows any more, in either direction:
  bytes, closes and resets are *held* (as a partition holds packets that TCP
  keeps retransmitting) and new connections are accepted but not forwarded.
  :meth:`FaultProxy.heal` lets the held traffic through in order, or, with
  ``reset=True``, drops it and resets the connections (the partition lasted
  longer than TCP's retransmission timeout).
- :meth:`FaultProxy.delay`: every chunk is delivered that many seconds after it
  was read (latency, not a throughput limit: chunks in flight overlap).
- :meth:`FaultProxy.refuse`: new connections are reset at once (a service
  that is unreachable); open ones keep flowing.

The proxy runs an asyncio loop on its own thread; the control methods are
called from any thread and return once the change is in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from coordinator.events import get_logger
from scenarios import events as ev
from scenarios.config_values import parse_host_port

T = TypeVar("T")

CHUNK = 64 * 1024
CONTROL_TIMEOUT = 10.0


class Mode(enum.Enum):
    """What the proxy does with traffic."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


@dataclass
class ProxyStats:
    """Counters since the proxy started."""

    accepted: int = 0
    refused: int = 0
    resets: int = 0  # connections reset by reset() or heal(reset=True)
    bytes_to_server: int = 0
    bytes_to_client: int = 0


class _Closed:
    """Queued after the last chunk of a direction: the sender closed (or reset) its side."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Connection:
    """One accepted client connection and, once forwarded, its upstream connection."""

    client: asyncio.StreamWriter
    handler: asyncio.Task[Any] | None
    upstream: asyncio.StreamWriter | None = None
    pumps: list[asyncio.Task[None]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def pump_finished(self) -> None:
        """Called by each pump as it ends: the connection is over once all four have."""
        if all(p.done() or p is asyncio.current_task() for p in self.pumps):
            self.done.set()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A proxy from ``127.0.0.1:<port>`` to ``upstream`` (``host:port``) with injectable faults."""

    def __init__(self, upstream: str, *, name: str = "proxy", port: int = 0) -> None:
        self.upstream = parse_host_port(upstream, f"upstream of proxy {name}")
        self.name = name
        self.stats = ProxyStats()
        self._requested_port = port
        self._port: int | None = None
        self._mode = Mode.PASS
        self._delay = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._connections: set[_Connection] = set()
        self._log = get_logger(component="proxy", proxy=name)

    # -- life cycle -------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen and forward; returns once the port is open."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"proxy-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(CONTROL_TIMEOUT)
        if failure:
            self._thread.join()
            self._thread = None
            raise OSError(f"proxy {self.name} cannot listen: {failure[0]}") from failure[0]
        self._log.debug(ev.PROXY_STARTED, port=self.port, upstream=self.upstream)
        return self

    def close(self) -> None:
        """Stop listening and reset every connection still open."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CONTROL_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- where it listens ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"proxy {self.name} is not started")
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: what to give the client instead of the upstream address."""
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def delay_seconds(self) -> float:
        return self._delay

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # -- faults (from any thread) ----------------------------------------------------

    def reset(self) -> int:
        """Reset every open connection (both sides); return how many."""
        self._log.info(ev.PROXY_FAULT, fault="reset", connections=len(self._connections))
        return self._call(self._reset_all())

    def blackhole(self) -> None:
        """Hold all traffic, closes and new connections until :meth:`heal`."""
        self._log.info(ev.PROXY_FAULT, fault="blackhole")
        self._call(self._set_mode(Mode.BLACKHOLE))

    def refuse(self) -> None:
        """Reset new connections at once until :meth:`heal`; open ones keep flowing."""
        self._log.info(ev.PROXY_FAULT, fault="refuse")
        self._call(self._set_mode(Mode.REFUSE))

    def heal(self, *, reset: bool = False) -> int:
        """Back to passing traffic; with ``reset``, held connections are reset first."""
        self._log.info(ev.PROXY_FAULT, fault="heal", reset=reset)
        return self._call(self._heal(reset))

    def delay(self, seconds: float) -> None:
        """Deliver every chunk ``seconds`` after it was read (0 removes the delay)."""
        if seconds < 0:
            raise ValueError(f"proxy delay must be >= 0 seconds, not {seconds}")
        self._log.info(ev.PROXY_FAULT, fault="delay", seconds=seconds)
        self._delay = seconds

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self._thread is None:
            coro.close()
            raise RuntimeError(f"proxy {self.name} is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    # -- on the loop ------------------------------------------------------------------

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._requested_port, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()
        assert self._flowing is not None
        self._flowing.set()  # wake what waits, so that it can end
        handlers = [c.handler for c in list(self._connections) if c.handler is not None]
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _set_mode(self, mode: Mode) -> None:
        assert self._flowing is not None
        self._mode = mode
        if mode is Mode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _heal(self, reset: bool) -> int:
        count = await self._reset_all() if reset else 0
        await self._set_mode(Mode.PASS)
        return count

    async def _reset_all(self) -> int:
        connections = list(self._connections)
        for connection in connections:
            for writer in connection.writers():
                _rst(writer)
            connection.done.set()
        self.stats.resets += len(connections)
        return len(connections)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        if self._mode is Mode.REFUSE:
            self.stats.refused += 1
            _rst(writer)
            return
        self.stats.accepted += 1
        connection = _Connection(writer, asyncio.current_task())
        self._connections.add(connection)
        try:
            # In a partition the SYN never reaches the server: connect only once healed.
            await self._until(connection, self._flowing.wait())
            if connection.done.is_set():
                return  # reset while held
            try:
                opened = await self._until(connection, asyncio.open_connection(*self.upstream))
            except OSError:
                _rst(writer)  # the service is down: the client sees a refused connection
                return
            if opened is None or connection.done.is_set():  # reset while it connected
                if opened is not None:
                    opened[1].transport.abort()
                return
            up_reader, up_writer = opened
            connection.upstream = up_writer
            queues: tuple[asyncio.Queue[Any], asyncio.Queue[Any]] = (
                asyncio.Queue(),
                asyncio.Queue(),
            )
            connection.pumps += [
                asyncio.create_task(self._read(reader, queues[0], connection)),
                asyncio.create_task(self._write(queues[0], up_writer, connection, True)),
                asyncio.create_task(self._read(up_reader, queues[1], connection)),
                asyncio.create_task(self._write(queues[1], writer, connection, False)),
            ]
            await connection.done.wait()
        finally:
            for pump in connection.pumps:
                pump.cancel()
            await asyncio.gather(*connection.pumps, return_exceptions=True)
            for w in connection.writers():
                w.transport.abort()
            self._connections.discard(connection)

    @staticmethod
    async def _until(connection: _Connection, awaitable: Coroutine[Any, Any, T]) -> T | None:
        """``awaitable``, unless the connection is reset first (then None)."""
        task = asyncio.ensure_future(awaitable)
        ended = asyncio.ensure_future(connection.done.wait())
        await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
        return task.result()

    async def _read(
        self, reader: asyncio.StreamReader, out: asyncio.Queue[Any], connection: _Connection
    ) -> None:
        """Read one direction into ``out`` with arrival times; its close goes last."""
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    out.put_nowait(_Closed(reset=False))
                    return
                out.put_nowait((time.monotonic(), data))
        except (ConnectionError, OSError):
            out.put_nowait(_Closed(reset=True))
        finally:
            connection.pump_finished()

    async def _write(
        self,
        source: asyncio.Queue[Any],
        writer: asyncio.StreamWriter,
        connection: _Connection,
        to_server: bool,
    ) -> None:
        """Deliver chunks after the delay, never while blackholed; then pass the close on."""
        assert self._flowing is not None
        try:
            while True:
                item = await source.get()
                await self._flowing.wait()
                if isinstance(item, _Closed):
                    if item.reset:
                        _rst(writer)
                        connection.done.set()
                    elif writer.can_write_eof():
                        writer.write_eof()
                    return
                arrived, data = item
                wait = arrived + self._delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    await self._flowing.wait()  # a blackhole that began meanwhile holds it
                if to_server:
                    self.stats.bytes_to_server += len(data)
                else:
                    self.stats.bytes_to_client += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            connection.done.set()
        finally:
            connection.pump_finished()

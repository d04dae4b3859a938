"""A loopback TCP relay that adds a fixed one-way delay to each direction.

Each chunk read from one side is stamped with the time it arrived and written to
the other side no earlier than ``arrival + delay``. Chunks keep their order and
the relay keeps reading while earlier chunks wait, so the delay adds latency but
does not cap throughput (as a long, fat link would behave).

In-process::

    with DelayProxy(target_port=2222, delay_s=0.025) as proxy:
        connect_to("127.0.0.1", proxy.port)

From a shell (prints the listen port on stdout, then relays until killed)::

    python tests/delay_proxy.py --target 2222 --delay-ms 25
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import socket
import sys
import threading
import time
from types import TracebackType

LOOPBACK = "127.0.0.1"
CHUNK_SIZE = 256 * 1024
# Bytes allowed to wait inside one direction before the relay stops reading that
# side: bounds memory while leaving room for bandwidth x delay on loopback.
MAX_BUFFERED = 64 * 1024 * 1024


class _DelayedPipe:
    """One direction of a relayed connection: reader -> timed queue -> writer."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float
    ) -> None:
        """Relay bytes from reader to writer, each chunk delayed by delay_s."""
        self._reader = reader
        self._writer = writer
        self._delay_s = delay_s
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._buffered = 0
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()

    async def run(self) -> None:
        """Pump until EOF in and everything delivered, or an error on either side."""
        pump = asyncio.ensure_future(self._read_side())
        try:
            await self._write_side()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await pump

    async def _read_side(self) -> None:
        """Read chunks, stamp their release time, and queue them."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self._buffered >= MAX_BUFFERED:
                    self._has_room.clear()
                    await self._has_room.wait()
                data = await self._reader.read(CHUNK_SIZE)
                if not data:
                    break
                self._queue.append((loop.time() + self._delay_s, data))
                self._buffered += len(data)
                self._has_data.set()
        except (OSError, ConnectionError):
            pass
        # The EOF (or reset) travels with the same delay as the data before it.
        self._queue.append((loop.time() + self._delay_s, b""))
        self._has_data.set()

    async def _write_side(self) -> None:
        """Write each queued chunk once its release time has come."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._has_data.clear()
                await self._has_data.wait()
            release, data = self._queue.popleft()
            wait = release - loop.time()
            if wait > 0:
                # Sleep to an absolute deadline: chunks that arrived meanwhile are
                # already stamped, so a backlog drains without extra delay.
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError, ConnectionError):
                    if self._writer.can_write_eof():
                        self._writer.write_eof()
                return
            self._buffered -= len(data)
            self._has_room.set()
            self._writer.write(data)
            await self._writer.drain()


class DelayProxy:
    """A TCP relay on 127.0.0.1:<free port> to 127.0.0.1:target_port with added delay."""

    def __init__(self, target_port: int, delay_s: float = 0.025, listen_port: int = 0) -> None:
        """Describe the relay; nothing listens until start() or serve()."""
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = listen_port
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # -- asyncio side ---------------------------------------------------------

    async def open(self) -> int:
        """Start listening on the running loop and return the listen port."""
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._stopped is not None:
            self._stopped.set()

    async def serve(self) -> None:
        """Listen and relay until close() is called."""
        if self._server is None:
            await self.open()
        assert self._stopped is not None
        await self._stopped.wait()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Relay one accepted connection to the target in both directions."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        target_w: asyncio.StreamWriter | None = None
        try:
            target_r, target_w = await asyncio.open_connection(LOOPBACK, self.target_port)
            for w in (client_w, target_w):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    # Small SSH packets must not wait on Nagle on top of the delay.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipes = [
                asyncio.ensure_future(_DelayedPipe(client_r, target_w, self.delay_s).run()),
                asyncio.ensure_future(_DelayedPipe(target_r, client_w, self.delay_s).run()),
            ]
            try:
                # Both directions finish on EOF; an error in either ends both.
                await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # close() cancels live relays; end quietly, as the server owns this task.
            pass
        finally:
            for w in (client_w, target_w):
                if w is not None:
                    w.close()
            self._handlers.discard(task)

    # -- thread side ----------------------------------------------------------

    def start(self) -> DelayProxy:
        """Run the relay in a daemon thread with its own event loop; return self."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def _main() -> None:
            """Thread body: own loop, open, signal readiness, serve until closed."""
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                try:
                    loop.run_until_complete(self.open())
                except OSError as exc:  # reported to start()'s caller
                    failure.append(exc)
                    return
                finally:
                    ready.set()
                loop.run_until_complete(self.serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=_main, name="delay-proxy", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        if not self.port:
            raise RuntimeError("delay proxy did not start")
        return self

    def stop(self) -> None:
        """Stop a relay started with start() and wait for its thread."""
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.close(), self._loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> DelayProxy:
        """Start the relay in a thread."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the relay."""
        self.stop()


def _self_check(delay_s: float) -> None:
    """Relay through a proxy to a local echo server; print round-trip time and MB/s."""

    async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Echo everything back, then close."""
        while data := await r.read(CHUNK_SIZE):
            w.write(data)
            await w.drain()
        w.close()

    async def _sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Count bytes until EOF, then reply with the count."""
        total = 0
        while data := await r.read(CHUNK_SIZE):
            total += len(data)
        w.write(str(total).encode())
        await w.drain()
        w.close()

    async def _main() -> None:
        """Measure one round trip and a bulk transfer through the relay."""
        echo = await asyncio.start_server(_echo, LOOPBACK, 0)
        sink = await asyncio.start_server(_sink, LOOPBACK, 0)
        for server, label in ((echo, "echo"), (sink, "sink")):
            proxy = DelayProxy(server.sockets[0].getsockname()[1], delay_s)
            await proxy.open()
            r, w = await asyncio.open_connection(LOOPBACK, proxy.port)
            if label == "echo":
                t0 = time.perf_counter()
                w.write(b"ping")
                await r.readexactly(4)
                print(f"round trip {1000 * (time.perf_counter() - t0):.1f} ms")
            else:
                size = 200 * 1024 * 1024
                block = b"\0" * CHUNK_SIZE
                t0 = time.perf_counter()
                for _ in range(size // CHUNK_SIZE):
                    w.write(block)
                    await w.drain()
                w.write_eof()
                got = int(await r.read())
                elapsed = time.perf_counter() - t0
                print(f"bulk {got} bytes in {elapsed:.2f} s = {got / elapsed / 1e6:.0f} MB/s")
            w.close()
            await proxy.close()
            server.close()

    asyncio.run(_main())


def main(argv: list[str] | None = None) -> int:
    """Command line: relay 127.0.0.1:<printed port> to --target with --delay-ms."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=int, help="target port on 127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay (ms)")
    parser.add_argument("--listen-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--self-check", action="store_true", help="measure RTT and MB/s")
    args = parser.parse_args(argv)
    if args.self_check:
        _self_check(args.delay_ms / 1000)
        return 0
    if args.target is None:
        parser.error("--target is required")
    proxy = DelayProxy(args.target, args.delay_ms / 1000, args.listen_port)

    async def _run() -> None:
        """Open, print the port, and serve until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(proxy.close()))
        print(await proxy.open(), flush=True)
        await proxy.serve()

    asyncio.run(_run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

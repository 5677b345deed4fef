"""A TCP proxy in front of PostgreSQL that can black-hole the connections it carries.

``blackhole()`` models what a client sees when its database goes away without a word, as
after a failover to another host or a partition: the server side of each existing
connection is closed (the backend rolls back and releases its locks, as a dead primary
would), while the client side stays open and silent: whatever the client sends is
swallowed, nothing ever comes back, no FIN, no RST. Connections opened afterwards reach the
server normally, like connections to the new primary. A client that waits on a silent
socket without a timeout waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib


class _Link:
    __slots__ = ("client", "dead", "muted", "server")

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.dead = False
        self.muted = False  # the server's answers are no longer passed on


class BlackholeProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.links: set[_Link] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.blackholed = 0
        self._server: asyncio.Server | None = None
        self._cut: tuple[bytes, asyncio.Future[None]] | None = None
        self.port = 0

    def cut_after(self, marker: bytes) -> asyncio.Future[None]:
        """The next time a client sends bytes containing ``marker``: pass them to the server,
        pass nothing back, then cut both sides (the server did get the request; the client
        never learns its outcome). The future is done once cut."""
        self._cut = (marker, asyncio.get_running_loop().create_future())
        return self._cut[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def blackhole(self) -> int:
        """Silence every connection open now; return how many."""
        n = 0
        for link in list(self.links):
            if not link.dead:
                link.dead = True
                link.server.transport.abort()
                n += 1
        self.blackholed += n
        return n

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.client.transport.abort()
            link.server.transport.abort()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.transport.abort()
            return
        except asyncio.CancelledError:
            c_writer.transport.abort()
            raise
        link = _Link(c_writer, s_writer)
        self.links.add(link)
        try:
            await asyncio.gather(
                self._pump(c_reader, link, to_server=True),
                self._pump(s_reader, link, to_server=False),
            )
        except (asyncio.CancelledError, Exception):
            pass
        finally:
            self.links.discard(link)
            c_writer.transport.abort()
            s_writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, link: _Link, to_server: bool) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                if link.dead:
                    if to_server:
                        continue  # swallowed: the client's bytes go nowhere
                    return
                if not to_server and link.muted:
                    continue
                cut = self._cut if to_server else None
                if cut is not None and cut[0] in data:
                    self._cut = None
                    link.muted = True
                    link.server.write(data)
                    await asyncio.sleep(0.3)  # the server acts on it; its answer is dropped
                    link.client.transport.abort()
                    link.server.transport.abort()
                    cut[1].set_result(None)
                    return
                dst = link.server if to_server else link.client
                dst.write(data)
                await dst.drain()
        # A normal end (client or server closed): pass the close along. A black-holed link
        # keeps its client side open and silent until the client gives up on it.
        if not link.dead:
            other = link.server if to_server else link.client
            other.transport.abort()

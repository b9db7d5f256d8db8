"""A TCP relay on 127.0.0.1 with one stall, as the internet has them (a lost packet's retransmit, a busy router):
what a client sends during the stall reaches the server only when it ends, so the client cannot know when the
server saw its requests. Answers come straight back; each connection's bytes keep their order.
"""

from __future__ import annotations

import asyncio
import threading


class StallingNetwork:
    """`stall`: (start, end) in seconds from the first byte relayed. `held`: how many reads of the client's bytes
    the stall held back (a test checks the stall did happen)."""

    def __init__(self, server_port: int, stall: tuple[float, float]):
        self.server_port, self.stall = server_port, stall
        self.first_byte: float | None = None
        self.held = 0
        self.port: int | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "StallingNetwork":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()

    async def _close(self) -> None:
        self.server.close()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await self.server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.server_port)
        try:
            await asyncio.gather(self._stalled(client_reader, server_writer),
                                 self._straight(server_reader, client_writer))
        except (ConnectionError, asyncio.CancelledError):
            pass  # one side closed, or the relay is shutting down: close both below
        finally:
            for writer in (server_writer, client_writer):
                writer.close()

    async def _stalled(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            now = self.loop.time()
            self.first_byte = now if self.first_byte is None else self.first_byte
            start, end = (self.first_byte + moment for moment in self.stall)
            if start <= now < end:
                self.held += 1
                await asyncio.sleep(end - now)  # this connection's later bytes wait behind these
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _straight(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

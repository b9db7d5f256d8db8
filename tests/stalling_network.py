"""A TCP relay on 127.0.0.1 with one stall, as the internet has them (a lost packet's retransmit, a busy router):
what a client sends during the stall reaches the server only when it ends, so the client cannot know when the
server saw its requests. Answers come straight back; each connection's bytes keep their order.
"""

from __future__ import annotations

import asyncio
import threading


class StallingNetwork:
    """`stall`: (start, end) in seconds from the first byte relayed."""

    def __init__(self, server_port: int, stall: tuple[float, float]):
        self.server_port, self.stall = server_port, stall
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.first_byte: float | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "StallingNetwork":
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("the relay did not start within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _close(self) -> None:
        self.server.close()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.server_port)
        await asyncio.gather(self._stalled(client_reader, server_writer), self._straight(server_reader, client_writer))

    async def _stalled(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            now = self.loop.time()
            self.first_byte = now if self.first_byte is None else self.first_byte
            start, end = (self.first_byte + moment for moment in self.stall)
            if start <= now < end:
                await asyncio.sleep(end - now)  # this connection's later bytes wait behind these
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _straight(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

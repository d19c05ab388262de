"""A small front for the tests of ``gradstream.server.ingest``: Train only, in a thread.

It does what the front process does for Train: each client stream goes through
``ingest_train`` to the server's ``IngestService``, or, where that hands it back
(``ForwardRaw``), to the server's ``TrainerService/Train`` unchanged.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc

from gradstream.server.ingest import ForwardRaw, ingest_train
from gradstream.server.interceptors import TRAIN

# What the front passes on of a client's metadata.
_PASSED = ("authorization",)


class TestFront:
    """A grpc.aio server on 127.0.0.1:0 whose Train is ``ingest_train`` against ``backend``."""

    __test__ = False  # not a test class

    def __init__(self, backend: str, max_message_bytes: int = 8 << 20) -> None:
        self.backend = backend
        self.max_message_bytes = max_message_bytes
        self.port = 0
        self.forwarded = 0  # streams handed back by ingest_train
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-front", daemon=True)

    @property
    def target(self) -> str:
        """host:port to connect to."""
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TestFront:
        self._thread.start()
        assert self._started.wait(30), "the test front did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        limit = self.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
        channel = grpc.aio.insecure_channel(self.backend, options=options)
        server = grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)])

        async def train(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            metadata = [(k, v) for k, v in context.invocation_metadata() if k in _PASSED]
            try:
                async for answer in ingest_train(requests, context, channel, metadata):
                    yield answer
            except ForwardRaw as raw:
                self.forwarded += 1
                call = channel.stream_stream(TRAIN, None, None)(
                    _prepend(raw.first, requests), metadata=metadata
                )
                try:
                    async for answer in call:
                        yield answer
                except grpc.aio.AioRpcError as exc:
                    await context.abort(exc.code(), exc.details() or "")

        handler = grpc.stream_stream_rpc_method_handler(train)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "gradstream.v1.TrainerService", {"Train": handler}
                ),
            )
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._started.set()
        await self._stop.wait()
        await server.stop(1)
        await channel.close(None)


async def _prepend(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is not None:
        yield first
    async for item in rest:
        yield item

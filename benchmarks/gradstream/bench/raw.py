"""Contender (b): a raw gRPC byte stream, no protobuf, no torch: the transport bound.

``python -m gradstream.bench.raw server`` serves one bidirectional method that
answers every message with an 8-byte ack; ``client`` streams a fixed payload at it
for a while and prints what it measured as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from gradstream.bench.served import announce

METHOD = "/gradstream.bench.Raw/Stream"
_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]


async def _serve(ready_file: Path) -> None:
    async def stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        count = 0
        async for _ in requests:
            count += 1
            yield count.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "gradstream.bench.Raw", {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    )
    server = grpc.aio.server(options=_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    announce(ready_file, port)
    await server.wait_for_termination()


def run_client(target: str, payload_bytes: int, seconds: float) -> dict[str, float]:
    """Stream ``payload_bytes`` messages for ``seconds``; messages/s and bytes/s."""
    payload = b"\x01" * payload_bytes
    with grpc.insecure_channel(target, options=_OPTIONS) as channel:
        call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)
        deadline = [0.0]

        def requests() -> Iterator[bytes]:
            while time.perf_counter() < deadline[0]:
                yield payload

        # Warm-up, then the measured run.
        deadline[0] = time.perf_counter() + min(0.5, seconds / 4)
        for _ in call(requests()):
            pass
        start = time.perf_counter()
        deadline[0] = start + seconds
        acks = sum(1 for _ in call(requests()))
        elapsed = time.perf_counter() - start
    return {"messages_per_s": acks / elapsed, "bytes_per_s": acks * payload_bytes / elapsed}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the two roles."""
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--target")
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.role == "server":
        asyncio.run(_serve(args.ready_file))
    else:
        json.dump(run_client(args.target, args.payload_bytes, args.seconds), sys.stdout)


if __name__ == "__main__":
    main()

"""10,000 random byte strings to every gRPC method of a real server process, as raw requests.

No crash (same pid, still serving), never UNKNOWN or INTERNAL, and memory growth bounded.
Half the strings are uniformly random; half are valid requests with bytes flipped,
cut or spliced, which get past the parser into the handlers.
"""

from __future__ import annotations

import collections
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from gradstream.client import Client
from gradstream.client._local import LocalServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.wire import spec_to_proto, to_proto

PER_METHOD = int(os.environ.get("GRADSTREAM_FUZZ_PER_METHOD", "10000"))
WARMUP = PER_METHOD // 10
WINDOW = 256  # requests in flight at once
MAX_RSS_GROWTH = 96 * 1024 * 1024
SPEC = {
    "architecture": {"kind": "mlp", "in_features": 3, "out_features": 2, "hidden": [4]},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _seeds() -> dict[str, bytes]:
    """A valid request of every method, against the model ``fuzz``."""
    x = to_proto(np.ones((2, 3), np.float32))
    y = to_proto(np.ones((2, 2), np.float32))
    batch = pb.Batch(x=x, y=y, sequence=1)
    return {
        "CreateModel": pb.CreateModelRequest(
            name="fuzz-new", spec=spec_to_proto(SPEC)
        ).SerializeToString(),
        "GetModel": pb.GetModelRequest(name="fuzz").SerializeToString(),
        "ListModels": pb.ListModelsRequest().SerializeToString(),
        "DeleteModel": pb.DeleteModelRequest(name="fuzz-gone").SerializeToString(),
        "UpdateModel": pb.UpdateModelRequest(
            name="fuzz", lr=0.01, freeze=["0.weight"]
        ).SerializeToString(),
        "Predict": pb.PredictRequest(name="fuzz", x=x).SerializeToString(),
        "ComputeGradients": pb.ComputeGradientsRequest(name="fuzz", x=x, y=y).SerializeToString(),
        "GetParameters": pb.GetParametersRequest(
            name="fuzz", include_gradients=True
        ).SerializeToString(),
        "SetParameters": pb.SetParametersRequest(
            name="fuzz", parameters={"2.bias": to_proto(np.zeros(2, np.float32))}
        ).SerializeToString(),
        "Train": pb.TrainRequest(batches=[batch, batch]).SerializeToString(),
        "Health": health_pb2.HealthCheckRequest(service="").SerializeToString(),
    }


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:  # cut
            del data[rng.randrange(len(data)) :]
        elif op == 2:  # splice random bytes in
            at = rng.randint(0, len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:  # duplicate a slice (repeated fields, nested lengths)
            a = rng.randint(0, len(data))
            data[a:a] = data[a : a + rng.randint(1, 24)]
    return bytes(data)


def _payloads(rng: random.Random, seed: bytes, count: int) -> Iterator[bytes]:
    for i in range(count):
        if i % 2:
            yield _mutate(rng, seed)
        else:
            yield rng.randbytes(rng.choice([0, 1, 2, 5, 16, 64, 300]))


def _path(method: str) -> str:
    if method == "Health":
        return "/grpc.health.v1.Health/Check"
    return f"/gradstream.v1.TrainerService/{method}"


def _send(
    channel: grpc.Channel, method: str, payloads: Iterator[bytes], codes: collections.Counter[str]
) -> None:
    if method == "Train":
        call = channel.stream_stream(_path(method), None, None)
        opener = pb.TrainRequest(open=pb.TrainOpen(model="fuzz")).SerializeToString()
        streams: list[Any] = []
        for payload in payloads:
            # Each payload follows a valid opener half of the time, so it reaches the batch path.
            first = [opener, payload] if len(streams) % 2 else [payload]
            streams.append(call(iter(first), timeout=60))
            if len(streams) >= WINDOW:
                _drain_streams(streams, codes)
        _drain_streams(streams, codes)
        return
    unary = channel.unary_unary(_path(method), None, None)
    futures: list[Any] = []
    for payload in payloads:
        futures.append(unary.future(payload, timeout=60))
        if len(futures) >= WINDOW:
            _drain(futures, codes)
    _drain(futures, codes)


def _drain(futures: list[Any], codes: collections.Counter[str]) -> None:
    for future in futures:
        try:
            future.result()
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
    futures.clear()


def _drain_streams(streams: list[Any], codes: collections.Counter[str]) -> None:
    for stream in streams:
        try:
            for _ in stream:
                pass
            codes["OK"] += 1
        except grpc.RpcError as exc:
            codes[exc.code().name] += 1
    streams.clear()


@pytest.mark.slow
def test_random_bytes_to_every_method_never_crash_or_answer_unknown(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    seeds = _seeds()
    log = tmp_path / "server.log"
    with LocalServer(
        "--device", "cpu", "--max-models", "8", "--max-model-parameters", "100000", log=log
    ) as server:
        assert server.process is not None
        pid = server.process.pid
        with Client(server.target) as client:
            client.create_model("fuzz", SPEC)
        codes: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in seeds}
        with grpc.insecure_channel(server.target) as channel:
            for method, seed in seeds.items():
                _send(channel, method, _payloads(rng, seed, WARMUP), codes[method])
            before = _rss(pid)
            for method, seed in seeds.items():
                start = time.perf_counter()
                _send(channel, method, _payloads(rng, seed, PER_METHOD - WARMUP), codes[method])
                print(f"{method}: {(PER_METHOD - WARMUP) / (time.perf_counter() - start):.0f}/s")
            after = _rss(pid)
            health = channel.unary_unary(
                _path("Health"), None, health_pb2.HealthCheckResponse.FromString
            )
            status = health(seeds["Health"], timeout=10).status
        assert server.process.poll() is None, "the server died"
        assert server.process.pid == pid
        assert status == health_pb2.HealthCheckResponse.SERVING
    summary = {m: dict(c) for m, c in codes.items()}
    print(f"fuzz codes: {summary}")
    print(f"server RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")
    for method, counter in codes.items():
        assert sum(counter.values()) == PER_METHOD, method
        assert "UNKNOWN" not in counter, (method, counter)
        assert "INTERNAL" not in counter, (method, counter, log.read_text()[-3000:])
        assert "UNIMPLEMENTED" not in counter, (method, counter)
    assert after - before < MAX_RSS_GROWTH


def test_garbage_after_a_valid_opener_ends_only_that_stream() -> None:
    """Sanity of the fuzz above: the same server keeps training after a garbage message."""
    with LocalServer("--device", "cpu") as server:
        assert server.process is not None
        pid = server.process.pid
        with Client(server.target) as client, grpc.insecure_channel(server.target) as channel:
            client.create_model("m", SPEC)
            call = channel.stream_stream(_path("Train"), None, None)
            opener = pb.TrainRequest(open=pb.TrainOpen(model="m")).SerializeToString()
            for garbage in (b"\xff", b"\xff" * 7, b"\x12\xff\xff\xff\xff\x0f"):
                with pytest.raises(grpc.RpcError) as failure:
                    list(call(iter([opener, garbage]), timeout=30))
                assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            x, y = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
            assert [r.outcome for r in client.train("m", [(x, y)])] == ["APPLIED"]
        assert server.process.poll() is None and server.process.pid == pid

"""A Train client that sends but never reads its responses cannot grow the server's memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from gradstream.client import Client
from gradstream.client._local import LocalServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc

SECONDS = 30.0
FEATURES = 16
SPEC = {
    "architecture": {"kind": "linear", "in_features": FEATURES, "out_features": 1},
    "optimizer": {"kind": "sgd", "lr": 1e-6},
}


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _tensor(array: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=array.shape, data=array.tobytes())


def test_a_client_that_never_reads_stops_being_read(tmp_path: Path) -> None:
    # One-row batches: many results per byte read, so responses fill the client's
    # flow-control window within seconds once it stops reading.
    batch = pb.Batch(
        x=_tensor(np.ones((1, FEATURES), np.float32)), y=_tensor(np.zeros((1, 1), np.float32))
    )
    message = pb.TrainRequest(batches=[batch] * 512)
    sent = 0
    stop = threading.Event()

    def requests() -> Iterator[pb.TrainRequest]:
        nonlocal sent
        yield pb.TrainRequest(open=pb.TrainOpen(model="m"))
        while not stop.is_set():
            yield message
            sent += 1

    with LocalServer("--device", "cpu", "--threads", "1") as server:
        assert server.process is not None
        with Client(server.target) as client:
            client.create_model("m", SPEC)
        # A fixed receive window (no BDP growth): the server's responses fill it in seconds.
        channel = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])
        call = pb_grpc.TrainerServiceStub(channel).Train(requests(), timeout=SECONDS + 30)
        try:
            time.sleep(5)  # past start-up and the first flow-control windows
            before, sent_before = _rss_bytes(server.process.pid), sent
            time.sleep(SECONDS - 5)
            after, sent_after = _rss_bytes(server.process.pid), sent
        finally:
            stop.set()
            call.cancel()
            channel.close()
    growth = after - before
    print(f"RSS {before >> 20} -> {after >> 20} MiB; messages sent {sent_before} -> {sent_after}")
    # Reading stops once a few messages' results wait for the client: the sender is held too.
    assert sent_after - sent_before < 100, (sent_before, sent_after)
    assert growth < 16 << 20, f"server RSS grew by {growth >> 20} MiB"

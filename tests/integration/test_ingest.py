"""Train through the ingest front (``gradstream.server.ingest``): decoded and checked on the
front, stepped by the server on views of shared-memory slots. It must train exactly as the
one-process server and the plain loop do, answer the same REJECTED reasons, and leave no
segment in /dev/shm whatever way a stream ends."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gradstream.client import (
    Client,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from gradstream.internal.v1 import ingest_pb2 as ipb
from gradstream.server.config import Settings
from gradstream.server.interceptors import INGEST_CONTRACT, INGEST_TRAIN
from gradstream.server.listening import FORWARDED_PEER, INTERNAL_SECRET
from gradstream.server.main import BackgroundServer
from gradstream.server.servicer import TrainerServicer
from gradstream.server.slots import PREFIX
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire import to_proto
from tests.conftest import server_settings
from tests.integration._security import ADMIN, TOKENS, TRAINER
from tests.integration.test_exactness import make_batches, plain_loop

pytestmark = pytest.mark.timeout(120)

BASE = {
    "init": {"kind": "seed", "seed": 5},
    "loss": {"kind": "mse", "reduction": "mean"},
    "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
    "dtype": "float32",
    "accumulate_steps": 1,
    "frozen": [],
}
LINEAR = {"kind": "linear", "in_features": 3, "out_features": 2, "bias": True}
MLP = {
    "kind": "mlp",
    "in_features": 4,
    "hidden": [5],
    "out_features": 3,
    "activation": "tanh",
    "bias": True,
}
EMBEDDING = {
    "kind": "embedding_mlp",
    "embeddings": [
        {"input": "user", "num_embeddings": 20, "dim": 3, "mode": "sum"},
        {"input": "item", "num_embeddings": 10, "dim": 2, "mode": "mean"},
    ],
    "dense_features": 2,
    "hidden": [4],
    "out_features": 1,
    "activation": "relu",
    "bias": True,
}


def _settings(**overrides: Any) -> Settings:
    return server_settings(ingest="process", max_models=100, **overrides)


class Front:
    """The public port of the ingest=process server, and the client streams it forwarded raw
    to the backend's Train (the others took the ingest path)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.forwarded = 0
        self.servicer: Any = None  # the backend's: the inline server's Train is not counted


@pytest.fixture(scope="module")
def spied() -> Iterator[Front]:
    """Counts the calls of the backend's own Train (the front forwards raw what it does not
    ingest); installed before the server starts, whose handlers bind the methods then."""
    front = Front("")
    original = TrainerServicer.Train

    def train(self_: Any, request: Any, context: Any) -> Any:
        front.forwarded += self_ is front.servicer
        return original(self_, request, context)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainerServicer, "Train", train)
        yield front


@pytest.fixture(scope="module")
def backend(spied: Front) -> Iterator[BackgroundServer]:
    """The server in ingest=process: ``target`` is its front's port."""
    with BackgroundServer(_settings(max_batch_rows=6)) as running:
        spied.servicer = running.server.servicer
        yield running


@pytest.fixture(scope="module")
def inline() -> Iterator[BackgroundServer]:
    settings = server_settings(ingest="inline", max_models=100, max_batch_rows=6)
    with BackgroundServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def front(spied: Front, backend: BackgroundServer) -> Front:
    spied.target = backend.target
    return spied


def _private(running: BackgroundServer) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The backend's own socket, and the metadata only its front may send."""
    assert running.server._private is not None
    socket = f"unix:{running.server._private / 'backend.sock'}"
    return socket, ((INTERNAL_SECRET, running.server._secret), (FORWARDED_PEER, "ipv4:127.0.0.1:1"))


def _segments() -> set[str]:
    """The slots in /dev/shm (the front's), and those still mapped in this process (the
    backend's), unlinked or not."""
    files = {p.name for p in Path("/dev/shm").glob(f"{PREFIX}*")}
    maps = Path("/proc/self/maps").read_text().splitlines()
    return files | {line.split("/dev/shm/")[1] for line in maps if f"/dev/shm/{PREFIX}" in line}


@pytest.fixture(autouse=True)
def no_segment_left() -> Iterator[None]:
    before = _segments()
    yield
    deadline = time.monotonic() + 5
    while _segments() - before and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert _segments() - before == set(), "a stream left its slots in /dev/shm or mapped"


def _run(
    train_target: str,
    admin_target: str,
    name: str,
    spec: dict[str, Any],
    batches: list[Any],
    **train: Any,
) -> tuple[list[Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A fresh model trained on ``batches``: results, initial and final parameters."""
    with Client(admin_target) as admin, Client(train_target) as trainer:
        admin.create_model(name, spec)
        try:
            initial = admin.parameters(name)
            results = list(trainer.train(name, batches, skip_rejected=True, **train))
            return results, initial, admin.parameters(name)
        finally:
            admin.delete_model(name)


def _rows(results: list[Any]) -> list[tuple[Any, ...]]:
    return [(r.sequence, r.step, r.outcome, r.loss, r.reason) for r in results]


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype and value.tobytes() == b[key].tobytes(), key


CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "linear": ({"architecture": LINEAR}, False),
    "mlp-float64-weighted": ({"architecture": MLP, "dtype": "float64"}, True),
    "mlp-accumulated": ({"architecture": MLP, "accumulate_steps": 3}, False),
    "embedding": (
        {"architecture": EMBEDDING, "optimizer": {"kind": "adam", "lr": 0.01}},
        True,
    ),
}


@pytest.mark.parametrize("per_message", [1, 7])
@pytest.mark.parametrize("case", list(CASES))
def test_trains_bitwise_like_the_inline_server_and_the_plain_loop(
    front: Front,
    backend: BackgroundServer,
    inline: BackgroundServer,
    case: str,
    per_message: int,
) -> None:
    changes, weighted = CASES[case]
    spec = {**BASE, **changes}
    # More messages than a stream's ring has slots (queue_depth + 1): every slot is reused.
    batches = make_batches(spec, weighted, 45, seed=len(case) * per_message)
    name = f"ingest-{case}-{per_message}"
    got, initial, params = _run(
        front.target, backend.target, name, spec, batches, batches_per_message=per_message
    )
    want, initial_inline, expected = _run(
        inline.target, inline.target, name, spec, batches, batches_per_message=per_message
    )
    _same(initial, initial_inline)
    assert _rows(got) == _rows(want)
    k = spec["accumulate_steps"]
    assert [r.outcome for r in got] == [
        "APPLIED" if i % k == k - 1 else "ACCUMULATED" for i in range(len(batches))
    ]
    _same(params, expected)
    plain, _ = plain_loop(spec, initial, batches)
    _same(params, plain)
    assert front.forwarded == 0


def _uniform(spec: dict[str, Any], weighted: bool, count: int, seed: int) -> list[Any]:
    """Batches of one layout (rows, bags, dtypes): a message of them travels as one block."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if spec["dtype"] == "float32" else np.float64
    arch, rows = spec["architecture"], 4
    batches = []
    for _ in range(count):
        x: Any
        if arch["kind"] == "embedding_mlp":
            x = {
                t["input"]: rng.integers(0, t["num_embeddings"], (rows, 2))
                for t in arch["embeddings"]
            }
            x["dense"] = rng.uniform(-1, 1, (rows, arch["dense_features"])).astype(dtype)
        else:
            x = rng.uniform(-1, 1, (rows, arch["in_features"])).astype(dtype)
        y = rng.uniform(-1, 1, (rows, arch["out_features"])).astype(dtype)
        w = rng.uniform(0.1, 2.0, rows).astype(dtype)
        batches.append((x, y, w) if weighted else (x, y))
    return batches


@pytest.mark.parametrize("case", list(CASES))
def test_messages_of_one_layout_train_as_blocks_bitwise_like_the_inline_server(
    front: Front, backend: BackgroundServer, inline: BackgroundServer, case: str
) -> None:
    changes, weighted = CASES[case]
    spec = {**BASE, **changes}
    batches = _uniform(spec, weighted, 80, seed=len(case))
    name = f"ingest-block-{case}"
    got, initial, params = _run(
        front.target, backend.target, name, spec, batches, batches_per_message=16
    )
    want, _, expected = _run(
        inline.target, inline.target, name, spec, batches, batches_per_message=16
    )
    assert _rows(got) == _rows(want)
    _same(params, expected)
    plain, _ = plain_loop(spec, initial, batches)
    _same(params, plain)


def _bad_batches(uniform: bool) -> list[Any]:
    rng = np.random.default_rng(3)
    good = [
        (rng.normal(size=(4, 3)).astype(np.float32), rng.integers(0, 2, 4).astype(np.int64))
        for _ in range(10)
    ]
    nan = good[1][0].copy()
    nan[2, 1] = np.nan
    out_of_range = good[3][1].copy()
    out_of_range[0] = 7
    too_many = (rng.normal(size=(7, 3)).astype(np.float32), np.zeros(7, np.int64))
    if uniform:  # one layout: the block check fails on the values and falls back
        return [
            good[0],
            (nan, good[1][1]),
            good[2],
            (good[3][0], out_of_range),
            *good[4:],
        ]
    return [
        good[0],
        (nan, good[1][1]),
        good[2],
        (good[3][0], out_of_range),
        (np.ones((4, 2), np.float32), good[4][1]),  # a wrong shape
        too_many,  # over max_batch_rows
        *good[5:],
    ]


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("per_message", [1, 16])
def test_bad_batches_are_rejected_with_the_inline_servers_reasons(
    front: Front,
    backend: BackgroundServer,
    inline: BackgroundServer,
    per_message: int,
    uniform: bool,
) -> None:
    spec = {
        **BASE,
        "architecture": {**LINEAR, "out_features": 2},
        "loss": {"kind": "cross_entropy", "reduction": "mean"},
    }
    batches = _bad_batches(uniform)
    name = f"ingest-bad-{per_message}-{uniform}"
    got, _, params = _run(
        front.target, backend.target, name, spec, batches, batches_per_message=per_message
    )
    want, _, expected = _run(
        inline.target, inline.target, name, spec, batches, batches_per_message=per_message
    )
    assert _rows(got) == _rows(want)
    reasons = [r.reason for r in got if r.outcome == "REJECTED"]
    assert len(reasons) == (2 if uniform else 4), reasons
    assert "non-finite" in reasons[0] and "out of range" in reasons[1], reasons
    if not uniform:
        assert "max_batch_rows" in reasons[3], reasons
    _same(params, expected)


def test_an_exactly_once_producer_gets_duplicate_for_a_resent_batch(
    front: Front, backend: BackgroundServer, inline: BackgroundServer
) -> None:
    spec = {**BASE, "architecture": LINEAR}
    batches = make_batches(spec, False, 6, seed=9)
    answers = []
    for target, admin in ((front.target, backend.target), (inline.target, inline.target)):
        with Client(admin) as a, Client(target) as c:
            a.create_model("ingest-producer", spec)
            try:
                stub = c._stub
                opened = pb.TrainOpen(model="ingest-producer", producer_id="p1")

                def message(seqs: list[int]) -> pb.TrainRequest:
                    request = pb.TrainRequest()
                    for s in seqs:
                        x, y = batches[s - 1]
                        request.batches.add(x=to_proto(x), y=to_proto(y), sequence=s)
                    return request

                first = list(stub.Train(iter([pb.TrainRequest(open=opened), message([1, 2, 3])])))
                again = list(stub.Train(iter([pb.TrainRequest(open=opened), message([2, 3, 4])])))
                answers.append(
                    (
                        [r.SerializeToString() for r in first],
                        [r.SerializeToString() for r in again],
                        {k: v.tobytes() for k, v in a.parameters("ingest-producer").items()},
                    )
                )
                outcomes = [pb.Outcome.Name(r.outcome) for r in again[1].results]
                assert outcomes == ["OUTCOME_DUPLICATE", "OUTCOME_DUPLICATE", "OUTCOME_APPLIED"]
                assert again[0].opened.last_applied_sequence == 3
            finally:
                a.delete_model("ingest-producer")
    assert answers[0] == answers[1]


def test_a_message_larger_than_a_slot_grows_it(
    front: Front, backend: BackgroundServer, inline: BackgroundServer
) -> None:
    spec = {
        **BASE,
        "architecture": {**LINEAR, "in_features": 512},
        "optimizer": {"kind": "sgd", "lr": 1e-4},
    }
    rng = np.random.default_rng(1)
    small = [
        (rng.normal(size=(2, 512)).astype(np.float32), rng.normal(size=(2, 2)).astype(np.float32))
    ]
    # Several MiB in one message, after the ring's slots were sized by small ones.
    large = [
        (rng.normal(size=(6, 512)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32))
        for _ in range(600)
    ]
    batches = small * 10 + large + small * 10
    got, _, params = _run(
        front.target,
        backend.target,
        "ingest-grow",
        spec,
        batches,
        batches_per_message=1000,
        message_bytes=7 << 20,
    )
    want, _, expected = _run(
        inline.target,
        inline.target,
        "ingest-grow",
        spec,
        batches,
        batches_per_message=1000,
        message_bytes=7 << 20,
    )
    assert _rows(got) == _rows(want)
    _same(params, expected)


def test_a_model_deleted_and_created_again_mid_stream_ends_the_stream(
    front: Front, backend: BackgroundServer
) -> None:
    spec = {**BASE, "architecture": LINEAR}
    name = "ingest-recreated"
    with Client(backend.target) as admin:
        admin.create_model(name, spec)
        channel = grpc.insecure_channel(front.target)
        stub = pb_grpc.TrainerServiceStub(channel).Train
        x, y = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
        gate: list[int] = []

        def requests() -> Iterator[pb.TrainRequest]:
            yield pb.TrainRequest(open=pb.TrainOpen(model=name))
            yield pb.TrainRequest(batches=[pb.Batch(x=to_proto(x), y=to_proto(y))])
            while not gate:
                time.sleep(0.01)
            for _ in range(20):
                yield pb.TrainRequest(batches=[pb.Batch(x=to_proto(x), y=to_proto(y))])

        call = stub(requests())
        try:
            answers = iter(call)
            assert next(answers).HasField("opened")
            assert next(answers).results[0].outcome == pb.OUTCOME_APPLIED
            admin.delete_model(name)
            admin.create_model(name, spec)
            gate.append(1)
            with pytest.raises(grpc.RpcError) as failed:
                list(call)
            assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            assert repr(name) in str(failed.value.details())
            assert admin.get_model(name).step == 0  # the new model saw none of it
        finally:
            channel.close()
            admin.delete_model(name)


def test_the_server_refuses_a_stream_opened_on_a_model_that_was_replaced(
    backend: BackgroundServer,
) -> None:
    """The identity from Contract: a model deleted and created again in between is noticed."""
    spec = {**BASE, "architecture": LINEAR}
    name = "ingest-replaced"
    socket, internal = _private(backend)
    with Client(backend.target) as admin, grpc.insecure_channel(socket) as channel:
        admin.create_model(name, spec)
        contract = channel.unary_unary(
            INGEST_CONTRACT,
            request_serializer=ipb.ContractRequest.SerializeToString,
            response_deserializer=ipb.ContractResponse.FromString,
        )(ipb.ContractRequest(model=name), metadata=internal)
        admin.delete_model(name)
        admin.create_model(name, spec)
        train = channel.stream_stream(
            INGEST_TRAIN,
            request_serializer=ipb.TrainRequest.SerializeToString,
            response_deserializer=pb.TrainResponse.FromString,
        )
        opening = ipb.TrainRequest(open=ipb.TrainOpen(model=name, identity=contract.identity))
        try:
            with pytest.raises(grpc.RpcError) as failed:
                list(train(iter([opening]), metadata=internal))
            assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert repr(name) in str(failed.value.details())
        finally:
            admin.delete_model(name)


def test_a_client_that_cancels_mid_stream_leaves_no_segment(
    front: Front, backend: BackgroundServer
) -> None:
    spec = {**BASE, "architecture": LINEAR}
    name = "ingest-cancelled"
    with Client(backend.target) as admin:
        admin.create_model(name, spec)
        try:
            with grpc.insecure_channel(front.target) as channel:
                stub = pb_grpc.TrainerServiceStub(channel).Train
                x, y = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)

                def requests() -> Iterator[pb.TrainRequest]:
                    yield pb.TrainRequest(open=pb.TrainOpen(model=name))
                    for _ in range(10_000):
                        yield pb.TrainRequest(batches=[pb.Batch(x=to_proto(x), y=to_proto(y))] * 8)

                call = stub(requests())
                for answer, _ in zip(call, range(20), strict=False):
                    assert not answer.HasField("opened") or answer.opened.model == name
                assert len(os.listdir("/dev/shm")) > 0
                call.cancel()
        finally:
            admin.delete_model(name)


def test_shared_memory_streams_and_bad_openings_are_forwarded_unchanged(
    front: Front, backend: BackgroundServer, inline: BackgroundServer
) -> None:
    spec = {**BASE, "architecture": LINEAR}
    batches = make_batches(spec, False, 5, seed=2)
    before = front.forwarded
    got, _, params = _run(
        front.target, backend.target, "ingest-shm", spec, batches, shared_memory=True
    )
    want, _, expected = _run(
        inline.target, inline.target, "ingest-shm", spec, batches, shared_memory=True
    )
    assert _rows(got) == _rows(want)
    _same(params, expected)
    assert front.forwarded == before + 1
    with grpc.insecure_channel(front.target) as channel:
        raw = channel.stream_stream("/gradstream.v1.TrainerService/Train", None, None)
        for first in (pb.TrainRequest().SerializeToString(), b"\xff\xff"):
            with pytest.raises(grpc.RpcError) as failed:
                list(raw(iter([first])))
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with Client(front.target) as c, pytest.raises(NotFound, match="no model named 'absent'"):
        list(c.train("absent", batches))


def test_tokens_stream_limits_and_metrics_see_the_ingest_stream_as_train(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    settings = _settings(tokens_file=tokens, metrics_port=0, max_streams=1)
    spec = {**BASE, "architecture": LINEAR}
    batches = make_batches(spec, False, 4, seed=4)
    with BackgroundServer(settings) as backend:
        front = Front(backend.target)
        registry = backend.server.metrics.registry

        def count(metric: str, method: str, **labels: str) -> float:
            value = registry.get_sample_value(
                metric,
                {"grpc_service": "gradstream.v1.TrainerService", "grpc_method": method, **labels},
            )
            return value or 0.0

        with Client(backend.target, token=ADMIN) as admin:
            admin.create_model("alpha-1", spec)
            admin.create_model("beta-1", spec)
        with Client(front.target, token=TRAINER) as producer:
            results = list(producer.train("alpha-1", batches))
            assert [r.outcome for r in results] == ["APPLIED"] * 4
            with pytest.raises(PermissionDenied, match="may not train model 'beta-1'"):
                list(producer.train("beta-1", batches))
            # max_streams is 1: a second stream while one is open is refused by the server.
            with grpc.insecure_channel(front.target) as channel:
                train = pb_grpc.TrainerServiceStub(channel).Train
                held = threading.Event()

                def open_stream() -> Iterator[pb.TrainRequest]:
                    yield pb.TrainRequest(open=pb.TrainOpen(model="alpha-1"))
                    held.wait(30)

                auth = (("authorization", f"Bearer {TRAINER}"),)
                first = train(open_stream(), metadata=auth)
                try:
                    assert next(iter(first)).opened.model == "alpha-1"
                    with pytest.raises(ResourceExhausted, match="max_streams"):
                        list(producer.train("alpha-1", batches))
                finally:
                    held.set()
                    assert list(first) == []
        with Client(front.target) as anonymous, pytest.raises(Unauthenticated):
            list(anonymous.train("alpha-1", batches))
        # As many Train streams as the clients opened, each ended with its own status; the
        # front's Contract calls are no method of their own.
        handled = ("grpc_server_handled_total", "Train")
        expected = {"OK": 2, "PERMISSION_DENIED": 1, "RESOURCE_EXHAUSTED": 1, "UNAUTHENTICATED": 1}

        def counted() -> tuple[float, dict[str, float]]:
            started = count("grpc_server_started_total", "Train", grpc_type="bidi_stream")
            return started, {
                c: count(*handled, grpc_type="bidi_stream", grpc_code=c) for c in expected
            }

        # A refusal is counted as its status leaves the server: the client may hear it first.
        deadline = time.monotonic() + 5
        while counted() != (5, expected) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert counted() == (5, expected)
        methods = {
            sample.labels.get("grpc_method")
            for family in registry.collect()
            for sample in family.samples
        }
        assert "Contract" not in methods


def _raw_stream(target: str, messages: list[bytes]) -> tuple[list[bytes], Any, str]:
    """Send ``messages`` on one Train stream: the answers, and the status it ended with."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream("/gradstream.v1.TrainerService/Train", None, None)
        answers: list[bytes] = []
        try:
            for answer in call(iter(messages)):
                answers.append(answer)
        except grpc.RpcError as failed:
            return answers, failed.code(), str(failed.details())
        return answers, grpc.StatusCode.OK, ""


@pytest.mark.parametrize("late", ["open", "malformed", "nothing"])
def test_a_misplaced_open_or_malformed_message_ends_the_stream_as_inline(
    front: Front, backend: BackgroundServer, inline: BackgroundServer, late: str
) -> None:
    spec = {**BASE, "architecture": LINEAR}
    (x, y), *_ = make_batches(spec, False, 1, seed=1)
    name = f"ingest-late-{late}"
    batch = pb.TrainRequest(batches=[pb.Batch(x=to_proto(x), y=to_proto(y))] * 3)
    tail = {
        "open": [pb.TrainRequest(open=pb.TrainOpen(model=name)).SerializeToString()],
        "malformed": [b"\xff\xff"],
        "nothing": [pb.TrainRequest().SerializeToString()],
    }[late]
    messages = [
        pb.TrainRequest(open=pb.TrainOpen(model=name)).SerializeToString(),
        batch.SerializeToString(),
        *tail,
        batch.SerializeToString(),
    ]
    ended = []
    for target, admin in ((front.target, backend.target), (inline.target, inline.target)):
        with Client(admin) as a:
            a.create_model(name, spec)
            try:
                ended.append((_raw_stream(target, messages), a.get_model(name).step))
            finally:
                a.delete_model(name)
    ((answers, code, details), step), ((inline_answers, *inline_end), inline_step) = ended
    assert (code, details, step) == (*inline_end, inline_step)
    # The one-process server answers a malformed message as it reads it, the answers of
    # the messages before may or may not have gone out by then; the front sends them first.
    if late != "malformed":
        assert answers == inline_answers
    assert code == (grpc.StatusCode.OK if late == "nothing" else grpc.StatusCode.INVALID_ARGUMENT)
    assert step == (6 if late == "nothing" else 3)
    assert len(answers) == (3 if late == "nothing" else 2)


def test_a_draining_server_ends_the_stream_unavailable_after_its_answers() -> None:
    spec = {**BASE, "architecture": LINEAR}
    name = "ingest-drain"
    backend = BackgroundServer(_settings()).start()
    front = Front(backend.target)
    try:
        if True:
            with Client(backend.target) as admin:
                admin.create_model(name, spec)
            with grpc.insecure_channel(front.target) as channel:
                stub = pb_grpc.TrainerServiceStub(channel).Train
                x, y = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
                stop = threading.Event()

                def requests() -> Iterator[pb.TrainRequest]:
                    yield pb.TrainRequest(open=pb.TrainOpen(model=name))
                    while not stop.is_set():
                        yield pb.TrainRequest(batches=[pb.Batch(x=to_proto(x), y=to_proto(y))])
                        time.sleep(0.005)

                answers = iter(stub(requests()))
                assert next(answers).HasField("opened")
                assert next(answers).results[0].outcome == pb.OUTCOME_APPLIED
                threading.Thread(target=backend.stop, daemon=True).start()
                try:
                    with pytest.raises(grpc.RpcError) as failed:
                        for answer in answers:
                            assert answer.results[0].outcome == pb.OUTCOME_APPLIED
                finally:
                    stop.set()
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in str(failed.value.details())
    finally:
        backend.stop()


def test_the_server_keeps_no_view_of_a_slot_once_a_stream_ended(
    front: Front, backend: BackgroundServer
) -> None:
    """The worker holds its last job until the next one: that job must not hold the slot."""
    spec = {**BASE, "architecture": LINEAR}
    name = "ingest-no-view"
    with Client(backend.target) as admin, Client(front.target) as producer:
        admin.create_model(name, spec)
        try:
            before = _segments()
            batches = _uniform(spec, False, 32, seed=3)
            assert len(list(producer.train(name, batches, batches_per_message=8))) == 32
            deadline = time.monotonic() + 5
            while _segments() - before and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.05)
            # No job ran since the stream's last one (that would drop it anyway).
            assert _segments() - before == set()
        finally:
            admin.delete_model(name)


def test_only_the_front_may_call_the_ingest_service(backend: BackgroundServer) -> None:
    socket, internal = _private(backend)
    request = ipb.ContractRequest(model="any").SerializeToString()
    with grpc.insecure_channel(socket) as channel:
        contract = channel.unary_unary(INGEST_CONTRACT, None, None)
        with pytest.raises(grpc.RpcError) as failed:
            contract(request)
        assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as failed:
            contract(request, metadata=internal)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND  # the secret: answered
    with grpc.insecure_channel(backend.target) as channel:  # the public port: no such method
        for method in (INGEST_CONTRACT, INGEST_TRAIN):
            with pytest.raises(grpc.RpcError) as failed:
                channel.unary_unary(method, None, None)(request, metadata=internal)
            assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED

"""Malformed batches, tensors and specs, interleaved with valid batches (Hypothesis).

Every malformed batch is REJECTED alone with a reason naming its field, every
malformed Predict or spec gets INVALID_ARGUMENT (RESOURCE_EXHAUSTED for sizes past
a limit), the server keeps serving, and the model ends bitwise equal to a control
model that saw only the valid batches.
"""

from __future__ import annotations

import collections
import itertools
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradstream.server.main import BackgroundServer
from gradstream.v1 import trainer_pb2 as pb
from gradstream.v1 import trainer_pb2_grpc as pb_grpc
from gradstream.wire import spec_to_proto, to_proto

FEATURES, CLASSES = 3, 4
MIN_CASES = 1000
_names = itertools.count()
finite = st.floats(-4, 4, allow_nan=False, width=32)


@dataclass(frozen=True)
class Case:
    """One thing sent: a batch (valid or not), a Predict or a CreateModel, and what must happen."""

    kind: str  # "batch", "predict" or "spec"
    message: Any
    valid: bool
    flaw: str = ""
    expected_code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


def _tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


@st.composite
def valid_batch(draw: st.DrawFn, classes: bool) -> pb.Batch:
    rows = draw(st.integers(1, 6))
    x = np.array(draw(st.lists(finite, min_size=rows * FEATURES, max_size=rows * FEATURES)))
    batch = pb.Batch(x=to_proto(x.astype(np.float32).reshape(rows, FEATURES)))
    if classes:
        labels = draw(st.lists(st.integers(0, CLASSES - 1), min_size=rows, max_size=rows))
        to_proto(np.array(labels, np.int64), batch.y)
    else:
        y = draw(st.lists(finite, min_size=rows, max_size=rows))
        to_proto(np.array(y, np.float32).reshape(rows, 1), batch.y)
    if draw(st.booleans()):
        weights = draw(st.lists(st.floats(0.125, 2, width=32), min_size=rows, max_size=rows))
        to_proto(np.array(weights, np.float32), batch.sample_weight)
    return batch


def _bad_tensor(draw: st.DrawFn, good: pb.Tensor) -> tuple[pb.Tensor, str]:
    """A corrupted copy of a valid tensor, and what is wrong with it."""
    flaw = draw(
        st.sampled_from(
            [
                "dtype code",
                "bytes short",
                "bytes long",
                "huge dims",
                "huge empty dims",
                "negative dim",
                "too many dims",
                "non-finite",
                "empty",
                "wrong width",
            ]
        )
    )
    shape, data = list(good.shape), good.data
    match flaw:
        case "dtype code":
            return _tensor(draw(st.sampled_from([0, 7, 99, 12345])), shape, data), flaw
        case "bytes short":
            return _tensor(good.dtype, shape, data[: -draw(st.integers(1, len(data)))]), flaw
        case "bytes long":
            return _tensor(good.dtype, shape, data + bytes(draw(st.integers(1, 9)))), flaw
        case "huge dims":
            dims = draw(st.lists(st.integers(2**31, 2**62), min_size=1, max_size=4))
            return _tensor(good.dtype, dims, data), flaw
        case "huge empty dims":
            return _tensor(good.dtype, [0, draw(st.integers(2**40, 2**62))], b""), flaw
        case "negative dim":
            return _tensor(good.dtype, [-shape[0], *shape[1:]], data), flaw
        case "too many dims":
            return _tensor(good.dtype, [1] * 9, data[: len(data) // max(1, math.prod(shape))]), flaw
        case "non-finite":
            if good.dtype not in (pb.DATA_TYPE_FLOAT32,):
                return _tensor(good.dtype, [-1], data), "negative dim"
            bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            index = draw(st.integers(0, len(data) // 4 - 1))
            patched = data[: 4 * index] + struct.pack("<f", bad) + data[4 * index + 4 :]
            return _tensor(good.dtype, shape, patched), flaw
        case "empty":
            return _tensor(good.dtype, [0, *shape[1:]], b""), flaw
        case "wrong width":
            width = shape[1] + 1 if len(shape) > 1 else 2
            return _tensor(good.dtype, [shape[0], width], bytes(shape[0] * width * 4)), flaw
    raise AssertionError(flaw)


@st.composite
def bad_batch(draw: st.DrawFn, classes: bool) -> tuple[pb.Batch, str]:
    batch = draw(valid_batch(classes))
    target = draw(st.sampled_from(["x", "y", "sample_weight", "labels", "weights"]))
    if target == "labels" and classes:
        rows = batch.x.shape[0]
        labels = np.zeros(rows, np.int64)
        labels[draw(st.integers(0, rows - 1))] = draw(
            st.sampled_from([-1, CLASSES, 2**40, -(2**62)])
        )
        to_proto(labels, batch.y)
        return batch, "label out of range"
    if target == "weights":
        rows = batch.x.shape[0]
        weights = draw(st.sampled_from([np.zeros(rows), -np.ones(rows)])).astype(np.float32)
        to_proto(weights, batch.sample_weight)
        return batch, "bad weights"
    if target in ("y", "labels", "sample_weight") and (
        target != "sample_weight" or batch.HasField("sample_weight")
    ):
        field = "y" if target == "labels" else target
        tensor, flaw = _bad_tensor(draw, getattr(batch, field))
        if classes and field == "y" and flaw == "non-finite":
            flaw = "labels as floats"
            tensor = to_proto(np.zeros(batch.x.shape[0], np.float32))
        getattr(batch, field).CopyFrom(tensor)
        return batch, f"{field}: {flaw}"
    tensor, flaw = _bad_tensor(draw, batch.x)
    batch.x.CopyFrom(tensor)
    return batch, f"x: {flaw}"


@st.composite
def bad_spec(draw: st.DrawFn) -> tuple[pb.ModelSpec, str, grpc.StatusCode]:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    base: dict[str, Any] = {
        "architecture": {"kind": "linear", "in_features": FEATURES, "out_features": 1}
    }
    flaw = draw(
        st.sampled_from(
            [
                "zero features",
                "negative features",
                "huge features",
                "unknown kind",
                "init bytes",
                "init dtype",
                "init shape",
                "init nan",
                "lr nan",
                "lr negative",
                "loss kind",
                "accumulate zero",
                "dtype",
                "frozen unknown",
                "negative hidden",
            ]
        )
    )
    spec = spec_to_proto(base)
    arch = spec.architecture
    match flaw:
        case "zero features":
            arch.in_features = 0
        case "negative features":
            arch.out_features = draw(st.integers(-(2**63), -1))
        case "huge features":
            arch.in_features = draw(st.integers(2**32, 2**62))
            return spec, flaw, grpc.StatusCode.RESOURCE_EXHAUSTED
        case "unknown kind":
            arch.kind = draw(st.sampled_from(["", "os.system", "__import__", "../../x", "LINEAR"]))
        case "init bytes" | "init dtype" | "init shape" | "init nan":
            spec.init.kind = "tensors"
            good = to_proto(np.ones((1, FEATURES), np.float32))
            tensor = spec.init.tensors["weight"]
            if flaw == "init bytes":
                tensor.CopyFrom(_tensor(good.dtype, list(good.shape), good.data[:-1]))
            elif flaw == "init dtype":
                tensor.CopyFrom(_tensor(77, list(good.shape), good.data))
            elif flaw == "init shape":
                tensor.CopyFrom(to_proto(np.ones((FEATURES, 2), np.float32)))
            else:
                tensor.CopyFrom(to_proto(np.full((1, FEATURES), np.nan, np.float32)))
        case "lr nan":
            spec.optimizer.kind, spec.optimizer.lr = "sgd", math.nan
        case "lr negative":
            spec.optimizer.kind, spec.optimizer.lr = "sgd", -0.5
        case "loss kind":
            spec.loss.kind = "pickle"
        case "accumulate zero":
            spec.accumulate_steps = draw(st.integers(-5, 0))
        case "dtype":
            spec.dtype = draw(st.sampled_from(["int8", "float16", "object", ""]))
            if spec.dtype == "":
                spec.dtype = "bfloat"
        case "frozen unknown":
            spec.frozen.append("weight.__class__")
        case "negative hidden":
            arch.kind = "mlp"
            arch.hidden.extend([4, draw(st.integers(-(2**40), 0))])
    return spec, flaw, invalid


@st.composite
def cases(draw: st.DrawFn, classes: bool) -> list[Case]:
    out: list[Case] = []
    for _ in range(draw(st.integers(12, 30))):
        what = draw(st.sampled_from(["valid", "valid", "bad", "bad", "predict", "spec"]))
        if what == "valid":
            out.append(Case("batch", draw(valid_batch(classes)), True))
        elif what == "bad":
            batch, flaw = draw(bad_batch(classes))
            out.append(Case("batch", batch, False, flaw))
        elif what == "predict":
            tensor, flaw = _bad_tensor(draw, draw(valid_batch(classes)).x)
            out.append(Case("predict", tensor, False, flaw))
        else:
            spec, flaw, code = draw(bad_spec())
            out.append(Case("spec", spec, False, flaw, code))
    return out


def _spec(classes: bool) -> dict[str, Any]:
    return {
        "architecture": {
            "kind": "mlp",
            "in_features": FEATURES,
            "out_features": CLASSES if classes else 1,
            "hidden": [5],
            "activation": "tanh",
        },
        "init": {"kind": "seed", "seed": 7},
        "loss": {"kind": "cross_entropy" if classes else "mse"},
        "optimizer": {"kind": "sgd", "lr": 0.01, "momentum": 0.9},
    }


def _parameters(stub: pb_grpc.TrainerServiceStub, name: str) -> dict[str, bytes]:
    reply = stub.GetParameters(pb.GetParametersRequest(name=name), timeout=30)
    return {n: t.data for n, t in reply.parameters.items()}


def test_malformed_input_is_refused_alone_and_never_touches_the_model(
    server: BackgroundServer,
) -> None:
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.TrainerServiceStub(channel)
    counts: collections.Counter[str] = collections.Counter()

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        classes = data.draw(st.booleans())
        sent = data.draw(cases(classes))
        model, control = f"hostile{next(_names)}", f"control{next(_names)}"
        spec = spec_to_proto(_spec(classes))
        for n in (model, control):
            stub.CreateModel(pb.CreateModelRequest(name=n, spec=spec), timeout=30)
        unary_codes: list[tuple[Case, grpc.StatusCode, str]] = []

        def requests(only_valid: bool) -> Iterator[pb.TrainRequest]:
            yield pb.TrainRequest(open=pb.TrainOpen(model=control if only_valid else model))
            pending: list[pb.Batch] = []
            for case in sent:
                if case.kind == "batch" and (case.valid or not only_valid):
                    pending.append(case.message)
                elif case.kind != "batch" and not only_valid:
                    # Unary refusals land between this stream's messages.
                    if pending:
                        yield pb.TrainRequest(batches=pending)
                        pending = []
                    unary_codes.append((case, *_unary(stub, case, model)))
                if len(pending) >= 5:
                    yield pb.TrainRequest(batches=pending)
                    pending = []
            if pending:
                yield pb.TrainRequest(batches=pending)

        results = [r for reply in stub.Train(requests(False), timeout=60) for r in reply.results]
        batches = [c for c in sent if c.kind == "batch"]
        assert len(results) == len(batches)
        for case, result in zip(batches, results, strict=True):
            outcome = pb.Outcome.Name(result.outcome)
            if case.valid:
                assert outcome == "OUTCOME_APPLIED", (result.reason, case.message)
            else:
                assert outcome == "OUTCOME_REJECTED", (case.flaw, case.message)
                assert result.reason.startswith("batches["), result.reason
            counts["batch"] += 1
        for case, code, details in unary_codes:
            assert code == case.expected_code, (case.kind, case.flaw, code, details)
            counts[case.kind] += 1
        list(stub.Train(requests(True), timeout=60))
        assert _parameters(stub, model) == _parameters(stub, control)  # bitwise
        for n in (model, control):
            stub.DeleteModel(pb.DeleteModelRequest(name=n), timeout=30)

    try:
        run()
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
    total = sum(counts.values())
    print(f"hostile cases: {dict(counts)}")
    assert total >= MIN_CASES, counts
    assert counts["predict"] and counts["spec"]


def _unary(stub: pb_grpc.TrainerServiceStub, case: Case, model: str) -> tuple[grpc.StatusCode, str]:
    try:
        if case.kind == "predict":
            stub.Predict(pb.PredictRequest(name=model, x=case.message), timeout=30)
        else:
            name = f"spec{next(_names)}"
            stub.CreateModel(pb.CreateModelRequest(name=name, spec=case.message), timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("classes", [False, True])
def test_a_valid_only_stream_is_what_the_control_sees(
    server: BackgroundServer, classes: bool
) -> None:
    """The property above is only meaningful if training moves the model at all."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.TrainerServiceStub(channel)
        name = f"moves{next(_names)}"
        stub.CreateModel(pb.CreateModelRequest(name=name, spec=spec_to_proto(_spec(classes))))
        before = _parameters(stub, name)
        rng = np.random.default_rng(0)
        batch = pb.Batch(x=to_proto(rng.standard_normal((4, FEATURES)).astype(np.float32)))
        y = np.array([0, 1, 2, 3]) if classes else rng.standard_normal((4, 1)).astype(np.float32)
        to_proto(y, batch.y)
        opener = pb.TrainRequest(open=pb.TrainOpen(model=name))
        list(stub.Train(iter([opener, pb.TrainRequest(batches=[batch] * 3)]), timeout=60))
        assert _parameters(stub, name) != before

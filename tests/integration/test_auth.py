"""TLS, mutual TLS and bearer tokens on a real server: the auth matrix, every RPC."""

from __future__ import annotations

import collections
import itertools
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradstream.client import Client, GradstreamError
from gradstream.client._local import LocalServer
from gradstream.server.config import Settings
from gradstream.server.ingest import IngestServicer
from gradstream.server.listening import StartupRefused
from gradstream.server.main import BackgroundServer, build
from gradstream.server.servicer import TrainerServicer
from gradstream.server.tokens import RPC_ACTIONS
from tests.conftest import server_settings
from tests.integration._security import ADMIN, OTHER, READER, TRAINER, Pki, make_pki

SPEC = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 1},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}
X = np.ones((4, 2), dtype=np.float32)
Y = np.ones((4, 1), dtype=np.float32)
RPCS = sorted(set(RPC_ACTIONS) - {"SaveCheckpoint"})
_fresh = itertools.count()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates and the token file, made for this module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


class Spy:
    """Counts the servicer methods that actually ran, by RPC name."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for rpc in RPCS:
            original = getattr(TrainerServicer, rpc)
            if rpc in ("Train", "ExportModel"):  # their handlers return response streams

                def streamed(
                    self_: Any, request: Any, context: Any, _o: Any = original, _n: str = rpc
                ) -> Any:
                    self.calls[_n] += 1
                    return _o(self_, request, context)

                monkeypatch.setattr(TrainerServicer, rpc, streamed)
            else:

                async def unary(
                    self_: Any, request: Any, context: Any, _o: Any = original, _n: str = rpc
                ) -> Any:
                    self.calls[_n] += 1
                    return await _o(self_, request, context)

                monkeypatch.setattr(TrainerServicer, rpc, unary)
        # Behind a front, a client's Train runs as the front's ingest call (ingest.py).
        ingested = IngestServicer.Train

        def train(self_: Any, request: Any, context: Any) -> Any:
            self.calls["Train"] += 1
            return ingested(self_, request, context)

        monkeypatch.setattr(IngestServicer, "Train", train)


@pytest.fixture(scope="module", params=["tls", "mtls"])
def secured(
    request: pytest.FixtureRequest, pki: Pki
) -> Iterator[tuple[str, BackgroundServer, Spy]]:
    """A server with tokens over TLS, or over mutual TLS, with a spy on its handlers."""
    spy = Spy()
    settings = server_settings(
        health_port=0,
        tokens_file=pki.tokens,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_ca=pki.ca if request.param == "mtls" else None,
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy.install(monkeypatch)  # handlers bind the patched methods when the server starts
        with BackgroundServer(settings) as running:
            yield request.param, running, spy


def _client(kind: str, server: BackgroundServer, pki: Pki, token: str | None) -> Client:
    mutual = kind == "mtls"
    return Client(
        server.target,
        ca=pki.ca,
        cert=pki.client_cert if mutual else None,
        key=pki.client_key if mutual else None,
        token=token,
        timeout=20,
    )


def _call(client: Client, rpc: str) -> Any:
    """One valid request of each RPC against model alpha (or a fresh alpha-* model)."""
    match rpc:
        case "CreateModel":
            return client.create_model(f"alpha-new-{next(_fresh)}", SPEC)
        case "DeleteModel":
            return client.delete_model("alpha-doomed")
        case "GetModel":
            return client.get_model("alpha")
        case "ListModels":
            return client.list_models()
        case "UpdateModel":
            return client.update_model("alpha", lr=0.01)
        case "SetParameters":
            return client.set_parameters("alpha", {"bias": np.zeros(1, np.float32)})
        case "GetParameters":
            return client.parameters("alpha")
        case "Predict":
            return client.predict("alpha", X)
        case "ComputeGradients":
            return client.gradients("alpha", X, Y)
        case "Train":
            return list(client.train("alpha", [(X, Y)]))
        case "Evaluate":
            return client.evaluate("alpha", [(X, Y)])
        case "ExportModel":
            return client.export("alpha", "safetensors", Path(tempfile.mkdtemp()) / "alpha")
    raise AssertionError(rpc)


READ = {"GetModel", "ListModels", "GetParameters"}
EXPECTED: dict[str, Callable[[str], grpc.StatusCode]] = {
    "none": lambda rpc: grpc.StatusCode.UNAUTHENTICATED,
    "bad": lambda rpc: grpc.StatusCode.UNAUTHENTICATED,
    # ListModels is filtered, not refused: this token simply sees no alpha.
    "other-model": lambda rpc: (
        grpc.StatusCode.OK if rpc == "ListModels" else grpc.StatusCode.PERMISSION_DENIED
    ),
    "read-only": lambda rpc: (
        grpc.StatusCode.OK if rpc in READ else grpc.StatusCode.PERMISSION_DENIED
    ),
    "train-predict": lambda rpc: (
        grpc.StatusCode.OK
        if rpc in {"Train", "Predict", "ComputeGradients", "ListModels"}
        else grpc.StatusCode.PERMISSION_DENIED
    ),
    "admin": lambda rpc: grpc.StatusCode.OK,
}
TOKENS = {
    "none": None,
    "bad": "not-a-token-but-long-enough",
    "other-model": OTHER,
    "read-only": READER,
    "train-predict": TRAINER,
    "admin": ADMIN,
}


@pytest.mark.parametrize("who", list(TOKENS))
def test_auth_matrix_every_rpc(
    secured: tuple[str, BackgroundServer, Spy], pki: Pki, who: str
) -> None:
    kind, server, spy = secured
    with _client(kind, server, pki, ADMIN) as admin:
        for model in ("alpha", "alpha-doomed"):
            try:
                admin.create_model(model, SPEC)
            except GradstreamError as exc:
                assert exc.code == grpc.StatusCode.ALREADY_EXISTS
    with _client(kind, server, pki, TOKENS[who]) as client:
        for rpc in RPCS:
            before = spy.calls[rpc]
            expected = EXPECTED[who](rpc)
            try:
                result = _call(client, rpc)
                code = grpc.StatusCode.OK
            except GradstreamError as exc:
                code, result = exc.code, exc.details
            assert code == expected, f"{who} {rpc}: {code} {result}"
            ran = spy.calls[rpc] - before
            # The handler runs exactly when access is granted: never on a denial.
            assert ran == (1 if expected == grpc.StatusCode.OK else 0), f"{who} {rpc}"
            if rpc == "ListModels" and code == grpc.StatusCode.OK:
                names = {m.name for m in result}
                # Only tokens that may read alpha see it listed.
                assert ("alpha" in names) == (who in ("read-only", "admin"))


def test_health_and_reflection_stay_open_without_a_token(
    secured: tuple[str, BackgroundServer, Spy], pki: Pki
) -> None:
    kind, server, _ = secured
    mutual = (
        {
            "private_key": pki.client_key.read_bytes(),
            "certificate_chain": pki.client_cert.read_bytes(),
        }
        if kind == "mtls"
        else {}
    )
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), **mutual)
    with grpc.secure_channel(server.target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        services = {s.name for s in answer.list_services_response.service}
        assert "gradstream.v1.TrainerService" in services


def test_plaintext_client_cannot_talk_to_a_tls_server(
    secured: tuple[str, BackgroundServer, Spy],
) -> None:
    _, server, spy = secured
    before = sum(spy.calls.values())
    with (
        Client(server.target, token=ADMIN, timeout=5) as client,
        pytest.raises(GradstreamError) as failure,
    ):
        client.list_models()
    assert failure.value.code == grpc.StatusCode.UNAVAILABLE
    assert sum(spy.calls.values()) == before


def test_mtls_refuses_a_client_without_a_certificate(pki: Pki, tmp_path: Path) -> None:
    settings = server_settings(
        tokens_file=pki.tokens,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_ca=pki.ca,
    )
    stranger = make_pki(tmp_path)  # a certificate from a CA the server does not trust
    with BackgroundServer(settings) as server:
        with Client(server.target, ca=pki.ca, token=ADMIN, timeout=5) as client:
            with pytest.raises(GradstreamError) as failure:
                client.list_models()
            assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        with Client(
            server.target,
            ca=pki.ca,
            cert=stranger.client_cert,
            key=stranger.client_key,
            token=ADMIN,
            timeout=5,
        ) as client:
            with pytest.raises(GradstreamError) as failure:
                client.list_models()
            assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        with Client(
            server.target, ca=pki.ca, cert=pki.client_cert, key=pki.client_key, token=ADMIN
        ) as client:
            assert client.list_models() == []


def test_tokens_also_work_without_tls_on_loopback(pki: Pki) -> None:
    settings = server_settings(tokens_file=pki.tokens)
    with BackgroundServer(settings) as server:
        with Client(server.target, timeout=10) as anonymous:
            with pytest.raises(GradstreamError) as failure:
                anonymous.list_models()
            assert failure.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.target, token=ADMIN, timeout=10) as admin:
            assert admin.list_models() == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gradstream.example"])
def test_refuses_to_listen_beyond_loopback_without_tokens(host: str) -> None:
    with pytest.raises(StartupRefused, match="--insecure"):
        build(Settings(host=host, port=0, device="cpu"))


def test_cli_refuses_0_0_0_0_without_tokens_and_starts_with_insecure() -> None:
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradstream.client.cli",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0 without tokens" in refused.stderr
    with (
        LocalServer("--host", "0.0.0.0", "--insecure", "--device", "cpu") as server,
        Client(server.target, timeout=20) as client,
    ):
        assert client.list_models() == []


def test_cli_client_flags_carry_tls_and_token(pki: Pki, tmp_path: Path) -> None:
    with LocalServer(
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tokens-file",
        str(pki.tokens),
        "--device",
        "cpu",
    ) as server:
        command = [sys.executable, "-m", "gradstream.client.cli", "models", "--target"]
        command += [f"localhost:{server.port}", "--ca", str(pki.ca)]
        denied = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        assert denied.returncode == 1
        assert "UNAUTHENTICATED" in denied.stderr
        env = {"GRADSTREAM_TOKEN": ADMIN, "PATH": "/usr/bin:/bin"}
        spec = tmp_path / "spec.json"
        spec.write_text('{"architecture": {"kind": "linear", "in_features": 1, "out_features": 1}}')
        create = [sys.executable, "-m", "gradstream.client.cli", "create", "alpha", "--spec"]
        create += [str(spec), "--target", f"localhost:{server.port}", "--ca", str(pki.ca)]
        made = subprocess.run(
            create, check=False, capture_output=True, text=True, timeout=60, env=env
        )
        assert made.returncode == 0, made.stderr
        listed = subprocess.run(
            command, check=False, capture_output=True, text=True, timeout=60, env=env
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith("alpha\t")


def test_metrics_port_can_serve_https_with_the_same_certificate(pki: Pki) -> None:
    import ssl
    import urllib.error
    import urllib.request

    settings = server_settings(
        metrics_port=0,
        tokens_file=pki.tokens,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        metrics_tls=True,
    )
    with BackgroundServer(settings) as server:
        url = f"https://127.0.0.1:{server.server.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(pki.ca))
        with urllib.request.urlopen(url, context=context, timeout=10) as reply:
            assert b"gradstream_active_streams" in reply.read()
        plain = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(plain, timeout=10).read()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert": "server.pem"}, "tls_cert and tls_key go together"),
        ({"tls_ca": "ca.pem"}, "tls_ca needs tls_cert and tls_key"),
        ({"metrics_tls": True}, "metrics_tls needs tls_cert and tls_key"),
        ({"tokens_file": "/nonexistent/tokens"}, "tokens_file: cannot read"),
    ],
)
def test_incomplete_security_settings_refuse_to_start(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(StartupRefused, match=message):
        build(Settings(port=0, device="cpu", **settings))

"""Health on the gRPC port and on the plaintext probe port; reflection lists the service."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gradstream.server.main import BackgroundServer


def _status(port: int, service: str = "") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def test_health_serves_on_both_ports(server: BackgroundServer) -> None:
    assert server.server.health_port not in (0, server.port)
    for port in (server.port, server.server.health_port):
        assert _status(port) == "SERVING"
        assert _status(port, "gradstream.v1.TrainerService") == "SERVING"


def test_health_port_answers_nothing_but_health(server: BackgroundServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        try:
            services = list(database.get_services())
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
        else:
            raise AssertionError(f"health port serves reflection: {services}")


def test_reflection_lists_the_trainer_service(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"gradstream.v1.TrainerService", "grpc.health.v1.Health"} <= services
        found = database.FindFileContainingSymbol("gradstream.v1.TrainerService")
        assert found.name == "gradstream/v1/trainer.proto"

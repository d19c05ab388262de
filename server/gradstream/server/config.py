"""Every knob of the server: ``GRADSTREAM_<NAME>`` in the environment, ``--<name>`` on the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server settings; CLI flags override the environment, which overrides the defaults."""

    model_config = SettingsConfigDict(env_prefix="GRADSTREAM_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the gRPC port binds to")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    health_port: int = Field(
        50052,
        ge=-1,
        le=65535,
        description="plaintext port answering only grpc.health.v1, for probes (-1: off)",
    )
    metrics_port: int = Field(
        9464, ge=-1, le=65535, description="Prometheus /metrics port (-1: off)"
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="address the /metrics port binds to; not --host, because /metrics shows "
        "model names and weights without tokens (on Kubernetes: the pod IP)",
    )
    device: str = Field(
        "auto", description="auto, cpu, cuda or cuda:N; auto takes CUDA when present"
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads, one count for every model of the process "
        "(0: one fewer than torch's default, at least 1, so the gRPC event loop keeps a core)",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="largest gRPC message accepted or sent, in bytes"
    )
    max_models: int = Field(64, gt=0, description="most models resident at once")
    queue_depth: int = Field(
        4,
        gt=0,
        description="request messages in flight per model before streams are back-pressured",
    )
    max_nonfinite_steps: int = Field(
        50,
        ge=0,
        description="non-finite steps in a row after which a model refuses training (0: off)",
    )
    predict_threads: int = Field(
        2,
        ge=0,
        description="threads that run Predict on a published copy of the parameters, beside "
        "training (costs one extra copy of them per model); 0: off, Predict waits in the "
        "model's worker queue behind training",
    )
    predict_inline_work: int = Field(
        1 << 18,
        ge=0,
        description="a prediction of at most this many rows x parameters whose snapshot is "
        "ready runs on the event loop instead of a Predict thread, which saves two thread "
        "hand-offs (0: always on the Predict threads)",
    )
    metrics_every: int = Field(
        10, gt=0, description="steps between samples of weight and gradient metrics"
    )
    loss_window: int = Field(
        100,
        gt=0,
        description="reported batch losses in the smoothed loss gauges (window mean and EMA)",
    )
    metrics_max_elements: int = Field(
        64, ge=0, description="parameters with at most this many elements export every value"
    )
    drain_timeout: float = Field(
        20.0, ge=0, description="seconds to let streams finish on SIGTERM before they are ended"
    )
    ready_file: Path | None = Field(
        None, description="write the bound ports here as JSON once serving (for --port 0)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    checkpoint_dir: Path | None = Field(
        None, description="directory of per-model checkpoints, restored at start-up (unset: off)"
    )
    checkpoint_every_steps: int = Field(
        1000, ge=0, description="optimizer steps between checkpoints of a model (0: off)"
    )
    checkpoint_every_seconds: float = Field(
        300.0, ge=0, description="seconds between checkpoints of a model that changed (0: off)"
    )
    checkpoint_keep: int = Field(3, ge=1, description="newest checkpoints kept per model")

    # -- security (docs/security.md) ----------------------------------------------------------
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain of the gRPC port; with tls_key turns TLS on"
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle of client certificates: set, clients must present one"
    )
    metrics_tls: bool = Field(
        False, description="serve /metrics over HTTPS with tls_cert and tls_key"
    )
    tokens_file: Path | None = Field(
        None,
        description="bearer tokens, one per line: TOKEN MODELS ACTIONS (see docs/security.md)",
    )
    insecure: bool = Field(
        False, description="allow listening beyond loopback without tokens (auth off)"
    )

    # -- limits: past one, RESOURCE_EXHAUSTED naming it; nothing else is affected -------------
    max_streams: int = Field(
        64, gt=0, description="Train and Evaluate streams open at once, all models"
    )
    max_batch_rows: int = Field(1_000_000, gt=0, description="rows in one batch")
    max_batch_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="tensor bytes (x, y, sample_weight) in one batch"
    )
    max_model_parameters: int = Field(
        100_000_000, gt=0, description="parameter elements of one model"
    )
    max_model_layers: int = Field(
        64, gt=0, description="layers of a built-in model (len(hidden) + 1)"
    )
    max_activation_bytes: int = Field(
        2 * 1024**3,
        gt=0,
        description="memory the forward and backward passes of one batch may need "
        "(rows x the model's per-row cost), checked before the batch runs",
    )
    max_program_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="bytes of one torch.export archive (architecture exported), packed or unpacked",
    )
    keepalive_time: float = Field(
        60.0, gt=0, description="seconds of silence before the server pings a client"
    )
    keepalive_timeout: float = Field(
        20.0, gt=0, description="seconds to wait for a ping's answer before closing"
    )
    keepalive_min_ping_interval: float = Field(
        10.0, ge=0, description="clients pinging more often than this are disconnected"
    )

    # -- scale-out (docs/scaling.md) --------------------------------------------------------
    distributed: Literal["auto", "on", "off"] = Field(
        "auto",
        description="data-parallel over torch.distributed: auto is on under torchrun "
        "(WORLD_SIZE > 1); rank 0 serves gRPC, every rank trains its share of each batch",
    )
    collective_timeout: float = Field(
        60.0,
        gt=0,
        description="seconds a collective may wait for the other ranks before the job "
        "fails (and restarts from its checkpoint); must exceed the longest step",
    )
    ingest: Literal["inline", "process"] = Field(
        "inline",
        description="inline: one process serves gRPC and trains; process: a front process "
        "owns the public port and forwards every RPC to this one over a private unix socket, "
        "so the training step keeps a GIL of its own (faster for small batches, slower for "
        "large ones; docs/architecture.md); not with data-parallel mode",
    )

    # -- evaluation and export (docs/serving.md) ---------------------------------------------
    eval_auc_max_scores: int = Field(
        1_000_000,
        gt=0,
        description="distinct scores one Evaluate keeps for roc_auc (about 24 bytes each, "
        "at most twice this many held); past it the Evaluate fails with RESOURCE_EXHAUSTED",
    )
    export_dir: Path | None = Field(
        None, description="continuous export: a new version of each model here (unset: off)"
    )
    export_format: Literal["triton", "pt2", "safetensors", "onnx"] = Field(
        "triton", description="continuous export's format (triton: a Triton model repository)"
    )
    export_every_steps: int = Field(
        0, ge=0, description="optimizer steps between continuous exports of a model (0: off)"
    )
    export_every_seconds: float = Field(
        0.0, ge=0, description="seconds between continuous exports of a model that stepped (0: off)"
    )
    export_keep: int = Field(3, ge=1, description="newest exported versions kept per model")
    export_max_batch_size: int = Field(
        0, ge=0, description="Triton config's max_batch_size (0: no Triton batching)"
    )

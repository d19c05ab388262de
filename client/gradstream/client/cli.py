"""The ``gradstream`` command: serve, create, train, predict, params, demo, bench."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gradstream.client._client import Client
from gradstream.client._errors import GradstreamError
from gradstream.client._models import StepResult

DEFAULT_TARGET = os.environ.get("GRADSTREAM_TARGET", "127.0.0.1:50051")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``gradstream`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the harness parses its own flags
        argv = ["bench", "--", *argv[1:]]
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
    except GradstreamError as exc:
        print(f"gradstream: {exc}", file=sys.stderr)
        code = 1
    except (OSError, ValueError) as exc:
        print(f"gradstream: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradstream",
        description="Train PyTorch models resident on a GPU from streamed batches.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the training server")
    _add_settings_flags(serve)
    serve.set_defaults(run=_serve)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--target",
            default=DEFAULT_TARGET,
            help="server host:port (env GRADSTREAM_TARGET; default %(default)s)",
        )
        _add_connection_flags(sub)
        return sub

    create = client_command("create", "create a model from a JSON spec")
    create.add_argument("name")
    create.add_argument("--spec", required=True, help="a JSON file, or the JSON itself")
    create.set_defaults(run=_create)

    train = client_command("train", "stream a dataset (.npz, .npy pair or .csv) into a model")
    train.add_argument("name")
    train.add_argument(
        "data",
        nargs="?",
        type=Path,
        help=".npz with x, y (and sample_weight), or .csv whose last --y-columns are y",
    )
    train.add_argument("--x", type=Path, help=".npy of inputs (with --y)")
    train.add_argument("--y", type=Path, help=".npy of targets (with --x)")
    train.add_argument("--y-columns", type=int, default=1, help="csv: trailing target columns")
    train.add_argument(
        "--labels", action="store_true", help="csv: targets are integer class labels"
    )
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--report-every", type=int, default=10)
    train.add_argument("--quiet", action="store_true", help="no progress line")
    train.add_argument(
        "--producer-id",
        default=None,
        help="apply each batch exactly once, across server restarts (docs/durability.md)",
    )
    train.set_defaults(run=_train)

    predict = client_command("predict", "run the model on inputs and print the outputs")
    predict.add_argument("name")
    predict.add_argument("data", type=Path, help=".npy, .npz (x) or .csv of inputs")
    predict.set_defaults(run=_predict)

    params = client_command("params", "print parameters (and gradients) as JSON")
    params.add_argument("name")
    params.add_argument("--gradients", action="store_true")
    params.set_defaults(run=_params)

    models = client_command("models", "list models")
    models.set_defaults(run=_models)

    demo = commands.add_parser(
        "demo", help="train the seed notebook's regression through the service"
    )
    demo.add_argument("--target", default=None, help="use this server instead of starting one")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench", help="benchmark the service against the plain PyTorch loop"
    )
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="see gradstream bench --help")
    bench.set_defaults(run=_bench)
    return parser


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group("TLS and auth (docs/security.md)")
    tls.add_argument(
        "--ca",
        type=Path,
        default=_env_path("GRADSTREAM_CA"),
        help="PEM CA of the server's certificate; turns TLS on (env GRADSTREAM_CA)",
    )
    tls.add_argument(
        "--cert",
        type=Path,
        default=_env_path("GRADSTREAM_CERT"),
        help="PEM client certificate, for mutual TLS (env GRADSTREAM_CERT)",
    )
    tls.add_argument(
        "--key",
        type=Path,
        default=_env_path("GRADSTREAM_KEY"),
        help="PEM key of --cert (env GRADSTREAM_KEY)",
    )
    tls.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    tls.add_argument(
        "--token",
        default=os.environ.get("GRADSTREAM_TOKEN"),
        help="bearer token (env GRADSTREAM_TOKEN; prefer the env: flags show in ps)",
    )


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def connect(args: argparse.Namespace, timeout: float | None = 60.0) -> Client:
    """A Client from the --target, TLS and token flags."""
    return Client(
        args.target,
        timeout=timeout,
        tls=True if args.tls else None,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        token=args.token or None,
    )


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    try:
        from gradstream.server.config import Settings
    except ImportError:
        parser.description = "needs the server extra: pip install 'gradstream[server]'"
        return
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"GRADSTREAM_{name.upper()}"
        # A bare boolean flag means true (--insecure); --insecure false also works.
        flagged: dict[str, Any] = {"nargs": "?", "const": "true"} if info.annotation is bool else {}
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            help=f"{info.description} (env {env}; default {info.default})",
            **flagged,
        )


def _tune_allocator() -> None:
    """Keep freed large blocks for reuse instead of returning them to the kernel (glibc).

    Every Train message arrives as a fresh multi-megabyte ``bytes``; by default glibc
    maps each one anew and unmaps it when freed, so every message paid a page fault per
    4 KiB. Raising the mmap and trim thresholds lets the heap reuse the same pages
    (measured: large batches 208-222 -> 247-257 steps/s on 2 cores). Left alone where
    the operator tuned malloc already, and off glibc.
    """
    if any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(m_trim_threshold, 256 << 20)


def _serve(args: argparse.Namespace) -> int:
    # A server shares its cores with gRPC threads and often with its producers: OpenMP's
    # default spin-waiting then burns the core the event loop needs (measured: 4x fewer
    # large-batch steps/s on 2 cores). It is read when torch loads, so set it before.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _tune_allocator()
    from gradstream.server.config import Settings
    from gradstream.server.main import run

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    run(Settings(**given))
    return 0


def _create(args: argparse.Namespace) -> int:
    text = Path(args.spec).read_text() if not args.spec.lstrip().startswith("{") else args.spec
    with connect(args) as client:
        info = client.create_model(args.name, json.loads(text))
    shapes = {n: list(p.shape) for n, p in info.parameters.items()}
    print(f"created {info.name} on {info.device}: {shapes}")
    return 0


def load_arrays(
    args: argparse.Namespace,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any] | None]:
    """x, y and optional sample weights from the files the train command names."""
    if args.x is not None or args.y is not None:
        if args.x is None or args.y is None:
            raise ValueError("--x and --y go together")
        return np.load(args.x), np.load(args.y), None
    if args.data is None:
        raise ValueError("give a data file (.npz or .csv) or --x and --y")
    if args.data.suffix == ".npz":
        with np.load(args.data) as data:
            return data["x"], data["y"], data.get("sample_weight")
    if args.data.suffix == ".csv":
        table = np.loadtxt(
            args.data, delimiter=",", ndmin=2, dtype=np.float32, skiprows=_has_header(args.data)
        )
        x, y = table[:, : -args.y_columns], table[:, -args.y_columns :]
        return x, (y[:, 0].astype(np.int64) if args.labels else y), None
    raise ValueError(f"{args.data}: expected .npz or .csv (or --x/--y .npy files)")


def _has_header(path: Path) -> int:
    with path.open() as f:
        first = f.readline()
    try:
        [float(v) for v in first.split(",")]
    except ValueError:
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    x, y, w = load_arrays(args)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows, y has {len(y)}")
    size = args.batch_size

    def batches() -> Iterator[tuple[Any, ...]]:
        for _ in range(args.epochs):
            for start in range(0, len(x), size):
                part = slice(start, start + size)
                yield (x[part], y[part]) if w is None else (x[part], y[part], w[part])

    total = args.epochs * -(-len(x) // size)
    progress = _Progress(total, quiet=args.quiet)
    with connect(args, timeout=None) as client:
        results = client.train(
            args.name, batches(), report_every=args.report_every, producer_id=args.producer_id
        )
        for result in results:
            progress.update(result)
    progress.close()
    return 0


class _Progress:
    """One status line on stderr: batches done, steps/s, last loss."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.done = 0
        self.loss: float | None = None
        self.step = 0
        self.start = self.shown = time.monotonic()

    def update(self, result: StepResult) -> None:
        self.done += 1
        self.step = result.step
        if result.loss is not None:
            self.loss = result.loss
        now = time.monotonic()
        if not self.quiet and (now - self.shown > 0.1 or self.done == self.total):
            self.shown = now
            rate = self.done / max(now - self.start, 1e-9)
            width = 30
            filled = width * self.done // max(self.total, 1)
            loss = "n/a" if self.loss is None else f"{self.loss:.6g}"
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"step {self.step}  {rate:,.0f} batches/s  loss {loss}  "
            )
            sys.stderr.flush()

    def close(self) -> None:
        if not self.quiet:
            sys.stderr.write("\n")
        loss = "n/a" if self.loss is None else f"{self.loss:.8g}"
        print(f"trained {self.done} batches, step {self.step}, loss {loss}")


def _predict(args: argparse.Namespace) -> int:
    path: Path = args.data
    if path.suffix == ".npz":
        with np.load(path) as data:
            x = data["x"]
    elif path.suffix == ".npy":
        x = np.load(path)
    else:
        x = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float32, skiprows=_has_header(path))
    with connect(args) as client:
        out = client.predict(args.name, x)
    np.savetxt(sys.stdout, out.reshape(len(out), -1), delimiter=",", fmt="%.8g")
    return 0


def _params(args: argparse.Namespace) -> int:
    with connect(args) as client:
        values = client.parameters(args.name, gradients=args.gradients)
    print(json.dumps({k: v.tolist() for k, v in values.items()}, indent=2))
    return 0


def _models(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for info in client.list_models():
            arch = info.spec.get("architecture", {}).get("kind", "?")
            print(f"{info.name}\t{arch}\tstep {info.step}\t{info.device}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gradstream.client._demo import run_demo

    return run_demo(args.target)


def _bench(args: argparse.Namespace) -> int:
    try:
        from gradstream.bench.cli import main as bench_main
    except ImportError:
        raise ValueError("gradstream bench needs the benchmarks installed (make install)") from None
    return int(bench_main([a for a in args.rest if a != "--"]))


if __name__ == "__main__":
    main()

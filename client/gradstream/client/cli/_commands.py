"""The commands of ``gradstream`` (click): serve, create, info, update, delete, checkpoint,
models, train, predict, params, demo, bench."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
import grpc
import numpy as np

from gradstream.client._client import Client
from gradstream.client._errors import GradstreamError
from gradstream.client._outbox import BatchLike
from gradstream.client.cli._data import STDIN, DataError, Source, TableOptions
from gradstream.client.cli._inputs import INPUT_HELP, InputColumns, NamedInputs, parse_inputs
from gradstream.client.cli._progress import ProgressLine, Tally
from gradstream.client.cli._target import ConnectionBroke, check_target, remember

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_TARGET = "127.0.0.1:50051"
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".npz", ".npy")
_MESSAGE_INDEX = re.compile(r"^batches\[\d+\]\.")
# After Ctrl-C: how long to wait for results of batches already sent.
DRAIN_SECONDS = 5.0


class _Commands(click.Group):
    """The commands; ``serve`` is built when asked for, so that importing the CLI (the
    client) never imports the server's settings."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "serve"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "serve":
            return _serve_command()
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings=CONTEXT, no_args_is_help=True)
@click.version_option(package_name="gradstream", prog_name="gradstream")
def cli() -> None:
    """Train PyTorch models resident on a GPU from streamed batches.

    Start a server with `gradstream serve`, then create a model from a JSON spec,
    train it from a CSV, parquet or numpy file, predict, inspect, update, delete.
    Data formats: `gradstream train --help`.
    """


# -- connection flags -----------------------------------------------------------------------


def _target(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_target(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def connection_options(command: F) -> F:
    """--target and the TLS/token flags of every command that talks to a server."""
    existing = click.Path(exists=True, dir_okay=False, path_type=Path)
    for option in reversed(
        [
            click.option(
                "--target",
                default=DEFAULT_TARGET,
                envvar="GRADSTREAM_TARGET",
                show_envvar=True,
                callback=_target,
                help="HOST:PORT of the server's API port.",
            ),
            click.option(
                "--ca",
                type=existing,
                envvar="GRADSTREAM_CA",
                show_envvar=True,
                help="PEM CA of the server's certificate; turns TLS on (docs/security.md).",
            ),
            click.option(
                "--cert",
                type=existing,
                envvar="GRADSTREAM_CERT",
                show_envvar=True,
                help="PEM client certificate, for mutual TLS.",
            ),
            click.option(
                "--key",
                type=existing,
                envvar="GRADSTREAM_KEY",
                show_envvar=True,
                help="PEM key of --cert.",
            ),
            click.option("--tls", is_flag=True, help="TLS with the system's root certificates."),
            click.option(
                "--token",
                envvar="GRADSTREAM_TOKEN",
                show_envvar=True,
                show_default=False,
                help="Bearer token (prefer the env variable: flags show in ps).",
            ),
        ]
    ):
        command = option(command)
    return command


def connect(options: dict[str, Any], timeout: float | None = 60.0) -> Client:
    """A Client from the connection flags."""
    tls = bool(options["tls"] or options["ca"])
    remember(options["target"], tls)
    return Client(
        options["target"],
        timeout=timeout,
        tls=True if options["tls"] else None,
        ca=options["ca"],
        cert=options["cert"],
        key=options["key"],
        token=options["token"] or None,
    )


def _connection(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in ("target", "ca", "cert", "key", "tls", "token")}


# -- serve ----------------------------------------------------------------------------------


def _settings_options(command: F) -> F:
    try:
        from gradstream.server.config import Settings
    except ImportError:  # a client-only install: serve says what to install, whatever the flags
        return click.argument("unknown", nargs=-1, type=click.UNPROCESSED)(command)
    for name, info in reversed(Settings.model_fields.items()):
        flag = "--" + name.replace("_", "-")
        env = f"GRADSTREAM_{name.upper()}"
        help_text = f"{info.description} [env {env}; default: {info.default}]"
        if info.annotation is bool:
            command = click.option(
                f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text, show_default=False
            )(command)
        else:
            command = click.option(
                flag, name, default=None, metavar="VALUE", help=help_text, show_default=False
            )(command)
    return command


@functools.cache
def _serve_command() -> click.Command:
    command = click.command("serve", context_settings={**CONTEXT, "ignore_unknown_options": True})(
        _settings_options(serve)
    )
    return command


def serve(unknown: tuple[str, ...] = (), **given: Any) -> int:
    """Run the training server (every flag is also a GRADSTREAM_* variable).

    Without --tokens-file it listens only on loopback; see docs/security.md to open it up.
    """
    try:
        from gradstream.server.config import Settings
    except ImportError:
        raise DataError(_NEEDS_SERVER.format(missing="pydantic-settings")) from None
    from pydantic import ValidationError

    # A server shares its cores with gRPC threads and often with its producers: OpenMP's
    # spin-waiting then burns the core the event loop needs. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gradstream.server.allocator import tune_allocator

    tune_allocator()
    values = {k: v for k, v in given.items() if v is not None}
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        flag = "--" + field.replace("_", "-")
        value = values.get(field, os.environ.get(f"GRADSTREAM_{field.upper()}"))
        raise click.BadParameter(f"{value!r}: {first['msg']}", param_hint=f"'{flag}'") from None
    try:
        from gradstream.server.main import run
    except ImportError as exc:
        raise DataError(_NEEDS_SERVER.format(missing=exc.name)) from None
    from gradstream.server.listening import StartupRefused

    try:
        run(settings)
    except StartupRefused as exc:
        _exit_now(f"gradstream serve: {exc}", 2)
    except (OSError, RuntimeError) as exc:
        _exit_now(f"gradstream: {_bind_error(exc, settings)}", 1)
    return 0


def _exit_now(message: str, code: int) -> None:
    """Exit without running finalizers: a gRPC server that never started complains
    from its finalizer ('Event loop is closed') once its event loop is gone."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


_NEEDS_SERVER = (
    "gradstream serve needs the server extra: pip install 'gradstream[server]' "
    "(from a checkout: pip install '.[server]'); {missing} is missing"
)


def _bind_error(exc: Exception, settings: Any) -> str:
    """A port already in use, named: gRPC says only 'Failed to bind', HTTP '[Errno 98]'."""
    text = str(exc)
    if "bind" in text.lower() or getattr(exc, "errno", None) == 98:
        ports = f"--port {settings.port}, --health-port {settings.health_port}"
        if settings.metrics_port >= 0:
            ports += f", --metrics-port {settings.metrics_port}"
        if getattr(exc, "errno", None) == 98:
            ports = f"--metrics-port {settings.metrics_port}"
        return (
            f"cannot listen on {settings.host} ({ports}): a port is already in use "
            "(another gradstream serve?); pick free ports, or 0 for any"
        )
    return f"gradstream serve failed: {text.splitlines()[0] if text else type(exc).__name__}"


# -- models ---------------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@click.option(
    "--spec", required=True, metavar="FILE|JSON", help="A JSON spec file, or the JSON itself."
)
@click.option(
    "--program",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Architecture exported: the torch.export archive (torch.export.save's file).",
)
@connection_options
def create(name: str, spec: str, program: Path | None, **kwargs: Any) -> int:
    """Create a model from a JSON spec (README: 'A model spec')."""
    conn = _connection(kwargs)
    text = spec if spec.lstrip().startswith("{") else _read_text(spec, "--spec")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        where = "--spec" if spec.lstrip().startswith("{") else spec
        raise DataError(f"{where}: not JSON: {exc}") from None
    with connect(conn) as client:
        info = client.create_model(name, parsed, program=program)
    shapes = {n: list(p.shape) for n, p in info.parameters.items()}
    click.echo(f"created {info.name} on {info.device}: {shapes}")
    return 0


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise click.BadParameter(
            f"{path!r}: {exc.strerror or exc} (give a file or the JSON itself)", param_hint=flag
        ) from None


@cli.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the whole description as JSON.")
@connection_options
def info(name: str, as_json: bool, **kwargs: Any) -> int:
    """Show a model: spec, step, inputs, parameters, autograd chain, device."""
    with connect(_connection(kwargs)) as client:
        model = client.get_model(name)
    parameters = {
        n: {"shape": list(p.shape), "frozen": p.frozen} for n, p in model.parameters.items()
    }
    inputs = [{"name": i.name, "kind": i.kind, "shape": list(i.shape)} for i in model.inputs]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "name": model.name,
                    "device": model.device,
                    "step": model.step,
                    "pending_batches": model.pending_batches,
                    "inputs": inputs,
                    "parameters": parameters,
                    "autograd_chain": model.autograd_chain,
                    "spec": model.spec,
                },
                indent=2,
            )
        )
        return 0
    click.echo(f"{model.name} on {model.device}, step {model.step}")
    for i in model.inputs:
        shape = ", ".join("any" if d < 0 else str(d) for d in i.shape)
        click.echo(f"  input {i.name}: {i.kind}, shape (rows{', ' if shape else ''}{shape})")
    for n, p in parameters.items():
        click.echo(f"  {n}: shape {p['shape']}{'  (frozen)' if p['frozen'] else ''}")
    click.echo(f"  loss graph: {' <- '.join(model.autograd_chain) or 'n/a'}")
    click.echo(f"  spec: {json.dumps(model.spec)}")
    return 0


@cli.command()
@click.argument("name")
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), help="New learning rate.")
@click.option(
    "--freeze", multiple=True, metavar="PARAM", help="Stop training a parameter (repeatable)."
)
@click.option("--unfreeze", multiple=True, metavar="PARAM", help="Train a parameter again.")
@connection_options
def update(
    name: str, lr: float | None, freeze: tuple[str, ...], unfreeze: tuple[str, ...], **kwargs: Any
) -> int:
    """Change a model's learning rate; freeze or unfreeze parameters."""
    if lr is None and not freeze and not unfreeze:
        raise click.UsageError("nothing to update: give --lr, --freeze or --unfreeze")
    with connect(_connection(kwargs)) as client:
        model = client.update_model(name, lr=lr, freeze=freeze, unfreeze=unfreeze)
    frozen = sorted(n for n, p in model.parameters.items() if p.frozen)
    new_lr = model.spec.get("optimizer", {}).get("lr")
    click.echo(f"updated {model.name}: lr {new_lr}, frozen {frozen or 'none'}")
    return 0


@cli.command()
@click.argument("name")
@connection_options
def delete(name: str, **kwargs: Any) -> int:
    """Delete a model (its checkpoints on the server's disk stay)."""
    with connect(_connection(kwargs)) as client:
        client.delete_model(name)
    click.echo(f"deleted {name}")
    return 0


@cli.command()
@click.argument("name")
@connection_options
def checkpoint(name: str, **kwargs: Any) -> int:
    """Write a checkpoint of a model now (the server needs --checkpoint-dir)."""
    with connect(_connection(kwargs), timeout=None) as client:
        saved = client.save_checkpoint(name)
    click.echo(f"checkpoint {saved.checkpoint} of {name} at step {saved.step}")
    return 0


@cli.command()
@connection_options
def models(**kwargs: Any) -> int:
    """List models: name, architecture, step, device."""
    with connect(_connection(kwargs)) as client:
        for model in client.list_models():
            arch = model.spec.get("architecture", {}).get("kind", "?")
            click.echo(f"{model.name}\t{arch}\tstep {model.step}\t{model.device}")
    return 0


# -- data -----------------------------------------------------------------------------------

DATA_HELP = """Data: DATA is a file or - (CSV on stdin).

\b
  .csv .tsv .txt  one row per sample, comma-separated (--delimiter), RFC 4180
                  quoting; a first row with no number in it is a header
                  (--header/--no-header to say so); read as a stream.
  .parquet        numeric columns, read as a stream (pip install 'gradstream[data]').
  .npz            arrays x, y (and sample_weight).
  .npy            one 2-D table, targets chosen like a CSV's columns.
  --x A.npy --y B.npy  inputs and targets of any shape.

Targets are the --y-columns (by header name or 1-based number, -1 the last);
every other column is an input. Errors name the file's 1-based row.

\b
A model with named inputs (gradstream info NAME lists them) takes columns by name:
  --input user=user_id --input item=item_id --input dense=f1,f2,f3
Several columns make one input (a bag of ids, dense features); integer inputs
are read exactly as int64.
"""


def _table_options(
    y_columns: str, header: bool | None, delimiter: str, labels: bool, exact: bool = False
) -> TableOptions:
    delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
    if len(delimiter) != 1:
        raise click.BadParameter(f"{delimiter!r}: give one character", param_hint="'--delimiter'")
    wanted = tuple(c.strip() for c in y_columns.split(",") if c.strip())
    if not wanted:
        raise click.BadParameter(
            f"{y_columns!r}: name at least one column", param_hint="'--y-columns'"
        )
    return TableOptions(
        y_columns=wanted, header=header, delimiter=delimiter, labels=labels, exact=exact
    )


def _named(
    client: Client, name: str, flags: tuple[InputColumns, ...], source: Source
) -> Callable[[Any, Any], Any] | None:
    """What turns a chunk's input columns into the model's named inputs, for ``--input``."""
    if not flags:
        return None
    named = NamedInputs(flags, client.get_model(name).inputs, source.name)

    def convert(x: Any, rows: Any) -> Any:
        if source.columns is None:
            raise DataError(
                f"{source.name}: --input maps columns of a table (.csv, .tsv, .parquet, "
                "a 2-D .npy); this data has none"
            )
        return named(x, source.columns, rows)

    return convert


# --input NAME=COL[,COL]: train, eval and predict map table columns to named inputs.
input_option = click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=COL[,COL]",
    callback=parse_inputs,
    help=INPUT_HELP,
)


def _source(
    data: str | None, x_path: Path | None, y_path: Path | None, options: TableOptions
) -> Source:
    if x_path is not None or y_path is not None:
        if x_path is None or y_path is None:
            raise click.UsageError("--x and --y go together")
        if data is not None:
            raise click.UsageError(f"give DATA ({data}) or --x/--y, not both")
        return Source(str(x_path), options, x_path=x_path, y_path=y_path)
    if data is None:
        raise click.UsageError("give a DATA file (.csv, .parquet, .npz, .npy or -) or --x and --y")
    suffix = Path(data).suffix.lower()
    if data != STDIN and suffix not in TABLE_SUFFIXES:
        raise click.BadParameter(
            f"{data!r}: expected {', '.join(TABLE_SUFFIXES)} or - for stdin", param_hint="'DATA'"
        )
    if suffix == ".tsv" and options.delimiter == ",":
        options = dataclasses.replace(options, delimiter="\t")
    return Source(data, options)


def table_options(command: F) -> F:
    """The flags that say how to read a table."""
    for option in reversed(
        [
            input_option,
            click.option(
                "--y-columns",
                default="-1",
                metavar="COL[,COL]",
                help="Target columns by header name or 1-based number (-1: the last).",
            ),
            click.option(
                "--header/--no-header",
                default=None,
                show_default=False,
                help="csv: the first row names the columns [default: guessed].",
            ),
            click.option("--delimiter", default=",", help="csv: field separator ('\\t' for tab)."),
            click.option(
                "--labels", is_flag=True, help="Targets are integer class labels (one column)."
            ),
        ]
    ):
        command = option(command)
    return command


DATA_ARG = click.Path(exists=True, dir_okay=False, allow_dash=True)
NPY = click.Path(exists=True, dir_okay=False, path_type=Path)


# -- train ----------------------------------------------------------------------------------


@cli.command(epilog=DATA_HELP)
@click.argument("name")
@click.argument("data", required=False, type=DATA_ARG)
@click.option("--x", "x_path", type=NPY, help=".npy of inputs (with --y).")
@click.option("--y", "y_path", type=NPY, help=".npy of targets (with --x).")
@table_options
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=32, help="Rows per batch (one step)."
)
@click.option("--epochs", type=click.IntRange(min=1), default=1, help="Passes over the data.")
@click.option(
    "--shuffle", is_flag=True, help="Shuffle rows each epoch (reads the data into memory)."
)
@click.option("--seed", type=int, default=0, help="Seed of --shuffle.")
@click.option(
    "--report-every",
    type=click.IntRange(min=1),
    default=10,
    help="Batches between loss reports (the last batch always reports).",
)
@click.option(
    "--skip-rejected",
    is_flag=True,
    help="Go on past batches the server rejects; list them at the end.",
)
@click.option(
    "--producer-id",
    default=None,
    help="Apply each batch exactly once across server restarts; re-running the same "
    "command with the same id resumes (docs/durability.md).",
)
@click.option(
    "--reconnect-timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    help="With --producer-id: seconds to keep reconnecting to an unreachable server.",
)
@click.option("--quiet", is_flag=True, help="No progress line.")
@connection_options
def train(  # noqa: PLR0917 (click passes every flag)
    name: str,
    data: str | None,
    x_path: Path | None,
    y_path: Path | None,
    inputs: tuple[InputColumns, ...],
    y_columns: str,
    header: bool | None,
    delimiter: str,
    labels: bool,
    batch_size: int,
    epochs: int,
    shuffle: bool,
    seed: int,
    report_every: int,
    skip_rejected: bool,
    producer_id: str | None,
    reconnect_timeout: float,
    quiet: bool,
    **kwargs: Any,
) -> int:
    """Stream a dataset into a model, one batch per step."""
    conn = _connection(kwargs)
    options = _table_options(y_columns, header, delimiter, labels, exact=bool(inputs))
    source = _source(data, x_path, y_path, options)
    if epochs > 1 and not shuffle and not source.rereadable:
        source.load()  # stdin is read once; later epochs come from memory
    run = _TrainRun(source, batch_size, epochs, shuffle, seed)
    progress = ProgressLine(run.total(), quiet, conn["target"])
    tally = run.tally
    stop = _Interrupt(run)
    interrupted = finished = False
    try:
        with stop, connect(conn, timeout=None) as client:
            run.convert = _named(client, name, inputs, source)

            def stream(batches: Iterator[tuple[Any, ...]], every: int, offset: int) -> None:
                """Train on ``batches``; a plain stream numbers its batches from 1, so
                ``offset`` makes its numbers the run's (a producer's carry their own)."""
                results = client.train(
                    name,
                    batches,
                    report_every=every,
                    skip_rejected=True,  # reported with file rows below
                    producer_id=producer_id,
                    reconnect_timeout=reconnect_timeout,
                )
                watch = _Watch(results, tally, progress, conn["target"], reconnect_timeout)
                with watch:
                    for result in results:
                        tally.add(result)
                        number = result.sequence + (0 if producer_id else offset)
                        if result.outcome == "REJECTED":
                            where = run.rows(number)
                            # The server counts batches within its message, from 0: not a
                            # position the user knows; the file rows replace it.
                            reason = _MESSAGE_INDEX.sub("", result.reason)
                            tally.rejected.append(f"{where}: {reason}")
                            if not skip_rejected:
                                raise DataError(
                                    f"{source.name} {where}: rejected: {reason} "
                                    "(--skip-rejected goes on past such batches)"
                                )
                        run.done(number)
                        progress.update(tally)

            # The last batch goes in a stream of its own so that its loss is reported.
            stream(run.batches(producer_id is not None, hold_last=True), report_every, 0)
            if run.last is not None and not stop.requested:
                tally.sent += 1
                stream(iter([run.last]), 1, tally.sent - 1)
        interrupted, finished = stop.requested, True
    except KeyboardInterrupt:
        interrupted = finished = True
    except GradstreamError as exc:
        if exc.code == grpc.StatusCode.UNAVAILABLE and tally.acknowledged:
            raise ConnectionBroke(exc, f"{tally.acknowledged} batches") from None
        raise
    finally:
        progress.close(tally, shown=finished)
    for line in tally.rejected[:10]:
        click.echo(f"rejected {source.name} {line}", err=True)
    if len(tally.rejected) > 10:
        click.echo(f"... and {len(tally.rejected) - 10} more rejected batches", err=True)
    click.echo(tally.summary(interrupted))
    return 130 if interrupted else 0


class _TrainRun:
    """The batches of a run, numbered 1.. across epochs, and which file rows each holds."""

    def __init__(self, source: Source, size: int, epochs: int, shuffle: bool, seed: int) -> None:
        self.source, self.size, self.epochs, self.shuffle = source, size, epochs, shuffle
        self.rng = np.random.default_rng(seed)
        self.tally = Tally()
        self.stopping = False
        self.last: tuple[Any, ...] | None = None
        # (input columns, file rows) -> what the model takes (--input's named inputs)
        self.convert: Callable[[Any, Any], Any] | None = None
        self._rows: dict[int, str] = {}
        self._lock = threading.Lock()

    def total(self) -> int | None:
        """Batches in the run, where known without reading the data."""
        streamed = Path(self.source.path).suffix.lower() not in (".npz", ".npy")
        if (
            self.source.arrays is None
            and not self.shuffle
            and self.source.x_path is None
            and streamed
        ):
            return None  # a streamed table: counted as it goes
        x, _, _ = self.source.load()
        return self.epochs * -(-len(x) // self.size)

    def rows(self, sequence: int) -> str:
        """The file rows of batch ``sequence``, as a message names them."""
        with self._lock:
            span = self._rows.get(sequence)
        return f"{span} (batch {sequence})" if span else f"batch {sequence}"

    def done(self, sequence: int) -> None:
        """Forget the rows of an answered batch."""
        with self._lock:
            self._rows.pop(sequence, None)

    def batches(self, sequenced: bool, hold_last: bool) -> Iterator[tuple[Any, ...]]:
        """(x, y[, None, sequence]) per batch; with ``hold_last`` the last is kept in ``last``."""
        held: tuple[Any, ...] | None = None
        sequence = 0
        for _ in range(self.epochs):
            for chunk_x, chunk_y, chunk_w, rows in self._epoch():
                if self.stopping:
                    return
                if chunk_y is None:
                    raise DataError(f"{self.source.name}: no targets to train on")
                sequence += 1
                with self._lock:
                    self._rows[sequence] = _row_span(rows)
                x = chunk_x if self.convert is None else self.convert(chunk_x, rows)
                item: tuple[Any, ...] = (x, chunk_y, chunk_w)
                if sequenced:
                    item = (*item, sequence)
                elif chunk_w is None:
                    item = (x, chunk_y)
                if held is not None:
                    self.tally.sent += 1
                    yield held
                held = item
        if held is not None:
            if hold_last:
                self.last = held  # the caller sends it
            else:
                self.tally.sent += 1
                yield held

    def _epoch(self) -> Iterator[tuple[Any, Any, Any, Any]]:
        if not self.shuffle:
            for chunk in self.source.chunks(self.size):
                yield chunk.x, chunk.y, chunk.weight, chunk.rows
            return
        x, y, w = self.source.load()
        order = self.rng.permutation(len(x))
        for start in range(0, len(x), self.size):
            picked = order[start : start + self.size]
            yield (
                x[picked],
                None if y is None else y[picked],
                None if w is None else w[picked],
                picked + 1,
            )


def _row_span(rows: Any) -> str:
    """File rows as a message names them: "rows 17-32", or some of them when shuffled."""
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 == len(rows) and (np.diff(rows) == 1).all():
        return f"rows {first}-{last}"
    shown = ", ".join(str(int(r)) for r in rows[:4])
    return f"rows {shown}{', ...' if len(rows) > 4 else ''} ({len(rows)} shuffled rows)"


class _Interrupt:
    """First Ctrl-C: send no more, wait up to DRAIN_SECONDS for results in flight.
    A second Ctrl-C (or the wait running out) stops at once."""

    def __init__(self, run: _TrainRun) -> None:
        self.run = run
        self.requested = False
        self._previous: Any = None
        self._timer: threading.Timer | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.run.stopping = True
        self._timer = threading.Timer(DRAIN_SECONDS, os.kill, (os.getpid(), signal.SIGINT))
        self._timer.daemon = True
        self._timer.start()

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Watch:
    """Shows connection trouble while a stream waits: 'waiting for', 'reconnecting (attempt n)'."""

    def __init__(
        self, results: Any, tally: Tally, progress: ProgressLine, target: str, timeout: float
    ) -> None:
        self.results, self.tally, self.progress = results, tally, progress
        self.target, self.timeout = target, timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradstream-cli-watch", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self.progress.set_status("")

    def _run(self) -> None:
        if self._stop.wait(1.0):
            return
        seen, attempts_then = self.tally.acknowledged, 0
        while not self._stop.is_set():
            attempts = int(getattr(self.results, "reconnects", 0))
            if self.tally.acknowledged != seen:  # results flow: past reconnects are over
                seen, attempts_then = self.tally.acknowledged, attempts
            if attempts > attempts_then:
                self.progress.set_status(
                    f"reconnecting to {self.target} (attempt {attempts}, "
                    f"giving up after {self.timeout:g} s)"
                )
            elif self.tally.acknowledged == 0:
                self.progress.set_status(f"waiting for the server at {self.target} ...")
            else:
                self.progress.set_status("")
            self.progress.update(self.tally, force=True)
            self._stop.wait(0.5)


# -- predict and inspect -------------------------------------------------------------------


@cli.command(epilog=DATA_HELP)
@click.argument("name")
@click.argument("data", type=DATA_ARG)
@click.option("--delimiter", default=",", help="csv: field separator ('\\t' for tab).")
@click.option(
    "--header/--no-header",
    default=None,
    show_default=False,
    help="csv: the first row names the columns [default: guessed].",
)
@input_option
@connection_options
def predict(
    name: str,
    data: str,
    delimiter: str,
    header: bool | None,
    inputs: tuple[InputColumns, ...],
    **kwargs: Any,
) -> int:
    """Run the model on inputs (every column) and print the outputs as CSV (the step of
    the parameters used goes to stderr)."""
    conn = _connection(kwargs)
    options = _table_options("-1", header, delimiter, False, exact=bool(inputs))
    source = _source(data, None, None, dataclasses.replace(options, targets=False))
    x, _, _ = source.load()
    with connect(conn) as client:
        convert = _named(client, name, inputs, source)
        rows = np.arange(1, len(x) + 1)
        prediction = client.predict(
            name, x if convert is None else convert(x, rows), with_step=True
        )
    out = prediction.y
    np.savetxt(sys.stdout, out.reshape(len(out), -1), delimiter=",", fmt="%.8g")
    click.echo(f"predicted with the parameters of step {prediction.step}", err=True)
    return 0


@cli.command()
@click.argument("name")
@click.option("--gradients", is_flag=True, help="Also print each parameter's current .grad.")
@connection_options
def params(name: str, gradients: bool, **kwargs: Any) -> int:
    """Print a model's parameters (and gradients) as JSON."""
    with connect(_connection(kwargs)) as client:
        values = client.parameters(name, gradients=gradients)
    click.echo(json.dumps({k: v.tolist() for k, v in values.items()}, indent=2))
    return 0


# -- evaluate and export --------------------------------------------------------------------


@cli.command("eval", epilog=DATA_HELP)
@click.argument("name")
@click.argument("data", required=False, type=DATA_ARG)
@click.option("--x", "x_path", type=NPY, help=".npy of inputs (with --y).")
@click.option("--y", "y_path", type=NPY, help=".npy of targets (with --x).")
@table_options
@click.option("--batch-size", type=click.IntRange(min=1), default=1024, help="Rows per batch sent.")
@click.option(
    "--top-k",
    "top_k",
    type=click.IntRange(min=1),
    multiple=True,
    help="Multiclass models: also top-k accuracy (repeatable).",
)
@connection_options
def evaluate(  # noqa: PLR0917 (click passes every flag)
    name: str,
    data: str | None,
    x_path: Path | None,
    y_path: Path | None,
    y_columns: str,
    header: bool | None,
    delimiter: str,
    labels: bool,
    batch_size: int,
    top_k: tuple[int, ...],
    inputs: tuple[InputColumns, ...],
    **kwargs: Any,
) -> int:
    """Print the model's loss and metrics on a dataset as JSON; the model does not step
    (docs/evaluation.md)."""
    conn = _connection(kwargs)
    options = _table_options(y_columns, header, delimiter, labels, exact=bool(inputs))
    source = _source(data, x_path, y_path, options)
    with connect(conn, timeout=None) as client:
        convert = _named(client, name, inputs, source)

        def batches() -> Iterator[BatchLike]:
            for c in source.chunks(batch_size):
                x = c.x if convert is None else convert(c.x, c.rows)
                yield (x, c.y) if c.weight is None else (x, c.y, c.weight)

        result = client.evaluate(name, batches(), top_k=top_k)
    click.echo(json.dumps(result, indent=2))
    return 0


@cli.command()
@click.argument("name")
@click.option(
    "--format",
    "format_",
    required=True,
    type=click.Choice(["safetensors", "pt2", "onnx", "triton"]),
    help="safetensors, pt2, onnx, or a Triton model repository (docs/serving.md).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="The file to write; for triton the repository folder.",
)
@connection_options
def export(name: str, format_: str, output: Path, **kwargs: Any) -> int:
    """Write the model in a serving format; prints the files written."""
    with connect(_connection(kwargs), timeout=None) as client:
        for path in client.export(name, format_, output):
            click.echo(str(path))
    return 0


# -- demo and bench -------------------------------------------------------------------------


@cli.command()
@click.option(
    "--target",
    default=None,
    callback=lambda c, p, v: None if v is None else _target(c, p, v),
    help="Use this server instead of starting one.",
)
def demo(target: str | None) -> int:
    """Train the seed notebook's regression through the service and print its trajectory."""
    from gradstream.client._demo import run_demo

    if target is not None:
        remember(target, False)
    return run_demo(target)


@cli.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("rest", nargs=-1, type=click.UNPROCESSED)
def bench(rest: tuple[str, ...]) -> int:
    """Benchmark the service against the plain PyTorch loop (gradstream bench --help)."""
    try:
        from gradstream.bench.cli import main as bench_main
    except ImportError:
        raise DataError("gradstream bench needs the benchmarks installed (make install)") from None
    return int(bench_main(list(rest)))

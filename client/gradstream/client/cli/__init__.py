"""The ``gradstream`` command: serve, manage and train models, demo, bench.

Exit codes: 0 success, 1 a failure (the server's answer, a data file's content),
2 a wrong command line (flag, value, missing file), 130 interrupted. Every error is
one line on stderr naming the flag or file and the value; never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import click

from gradstream.client._errors import GradstreamError
from gradstream.client.cli._commands import cli
from gradstream.client.cli._data import DataError
from gradstream.client.cli._target import ConnectionBroke, explain
from gradstream.wire import SpecError

__all__ = ["cli", "main"]

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``gradstream`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    sys.exit(run(args))


def run(args: list[str]) -> int:
    """Run the command line ``args``; returns the exit code."""
    try:
        code = cli.main(args, prog_name="gradstream", standalone_mode=False)
        sys.stdout.flush()
        return code if isinstance(code, int) else 0
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
        return EXIT_USAGE
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "gradstream"
        _error(f"{exc.format_message()} (see {where} --help)", where)
        return EXIT_USAGE
    except click.ClickException as exc:  # a file named on the command line is unreadable
        _error(exc.format_message())
        return EXIT_USAGE
    except (DataError, SpecError, ConnectionBroke) as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except GradstreamError as exc:
        _error(explain(exc))
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as cat does.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        name = f"{exc.filename}: " if exc.filename else ""
        _error(f"{name}{exc.strerror or exc}")
        return EXIT_FAILURE
    except (KeyboardInterrupt, click.Abort):
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except Exception as exc:
        # A bug of the CLI or the SDK: one line still, the traceback with GRADSTREAM_DEBUG=1.
        if os.environ.get("GRADSTREAM_DEBUG"):
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (GRADSTREAM_DEBUG=1 shows where)")
        return EXIT_FAILURE


def _error(message: str, where: str = "gradstream") -> None:
    with contextlib.suppress(OSError):
        print(f"{where}: {message}", file=sys.stderr, flush=True)

"""Tables the CLI reads: CSV (a file or stdin), parquet, .npz, .npy, and .npy pairs.

Every source yields chunks of rows with the 1-based row numbers of the file, so a
data error, and a batch the server rejects, can name the rows a user would look at.
CSV and parquet are read as streams, a chunk at a time, so a file may be larger than
memory; only ``--shuffle`` reads the whole table first.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]
STDIN = "-"


class DataError(ValueError):
    """A data file's content is wrong; the message names the file, row and column."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive rows of a table: inputs, targets (or None) and their 1-based file rows."""

    x: Array
    y: Array | None
    rows: npt.NDArray[np.int64]
    weight: Array | None = None


@dataclass(frozen=True, slots=True)
class TableOptions:
    """How to read a table: which columns are targets, and the CSV dialect."""

    y_columns: Sequence[str] = ("-1",)  # names or 1-based numbers (negative: from the end)
    header: bool | None = None  # None: a first row with no number in it is a header
    delimiter: str = ","
    labels: bool = False  # targets are integer class labels (one column)
    targets: bool = True  # False: every column is an input (predict)
    exact: bool = False  # read numbers as float64, so that ids up to 2**53 stay exact


@dataclass(slots=True)
class Source:
    """A table to read once or several times (an epoch is one read)."""

    path: str
    options: TableOptions
    x_path: Path | None = None  # a .npy pair
    y_path: Path | None = None
    arrays: tuple[Array, Array | None, Array | None] | None = field(default=None, repr=False)
    # The input columns' names (header names, or 1-based numbers), once the table is read.
    columns: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """How messages name the data."""
        if self.x_path is not None:
            return f"{self.x_path} + {self.y_path}"
        return "stdin" if self.path == STDIN else self.path

    @property
    def rereadable(self) -> bool:
        """False for stdin: it can be read only once."""
        return self.path != STDIN or self.arrays is not None

    def chunks(self, size: int) -> Iterator[Chunk]:
        """The table in chunks of ``size`` rows (the last may be shorter)."""
        if self.arrays is not None or self.x_path is not None or _suffix(self.path) in _NUMPY:
            x, y, w = self._arrays()
            for start in range(0, len(x), size):
                part = slice(start, start + size)
                rows = np.arange(start + 1, min(start + size, len(x)) + 1, dtype=np.int64)
                yield Chunk(
                    x[part], None if y is None else y[part], rows, None if w is None else w[part]
                )
            return
        if _suffix(self.path) == ".parquet":
            yield from _parquet_chunks(self, size)
            return
        yield from _csv_chunks(self, size)

    def load(self) -> tuple[Array, Array | None, Array | None]:
        """The whole table in memory (for ``--shuffle`` and ``predict``)."""
        if self.arrays is None:
            parts = list(self.chunks(65536))
            if not parts:
                raise DataError(f"{self.name}: no rows")
            x = np.concatenate([c.x for c in parts])
            ys = [c.y for c in parts if c.y is not None]
            ws = [c.weight for c in parts if c.weight is not None]
            self.arrays = (
                x,
                np.concatenate(ys) if ys else None,
                np.concatenate(ws) if ws else None,
            )
        return self.arrays

    def _arrays(self) -> tuple[Array, Array | None, Array | None]:
        if self.arrays is not None:
            return self.arrays
        if self.x_path is not None and self.y_path is not None:
            inputs, targets = _npy(self.x_path), _npy(self.y_path)
            if len(inputs) != len(targets):
                raise DataError(
                    f"--x {self.x_path} has {len(inputs)} rows, "
                    f"--y {self.y_path} has {len(targets)}"
                )
            self.arrays = (
                inputs,
                _as_targets(targets, self.options, str(self.y_path))
                if self.options.targets
                else None,
                None,
            )
            return self.arrays
        if _suffix(self.path) == ".npz":
            try:
                with np.load(self.path) as data:
                    if "x" not in data:
                        raise DataError(f"{self.path}: no array named 'x' (has {sorted(data)})")
                    x = _numeric(data["x"], f"{self.path} x")
                    y = data["y"] if self.options.targets and "y" in data else None
                    y = None if y is None else _numeric(y, f"{self.path} y")
                    w: Array | None = data.get("sample_weight")
                    w = None if w is None else _numeric(w, f"{self.path} sample_weight")
            except (OSError, ValueError) as exc:
                if isinstance(exc, DataError):
                    raise
                raise DataError(f"{self.path}: not a readable .npz file ({exc})") from None
            if self.options.targets and y is None:
                raise DataError(f"{self.path}: no array named 'y'")
            if y is not None and len(x) != len(y):
                raise DataError(f"{self.path}: x has {len(x)} rows, y has {len(y)}")
            self.arrays = (x, None if y is None else _as_targets(y, self.options, self.path), w)
            return self.arrays
        table = _npy(Path(self.path))
        if not self.options.targets:
            self.arrays = (table, None, None)
            return self.arrays
        if table.ndim != 2:
            raise DataError(
                f"{self.path}: a single .npy is a table of rows (2-D), got shape {table.shape}; "
                "for other shapes give --x and --y"
            )
        columns = [str(i + 1) for i in range(table.shape[1])]
        picked = _pick(self.options.y_columns, columns, self.path, by_name=False)
        rest = [i for i in range(table.shape[1]) if i not in picked]
        self.columns = tuple(columns[i] for i in rest)
        self.arrays = (
            table[:, rest],
            _as_targets(table[:, picked], self.options, self.path),
            None,
        )
        return self.arrays


_NUMPY = (".npz", ".npy")


def _suffix(path: str) -> str:
    return "" if path == STDIN else Path(path).suffix.lower()


def _npy(path: Path) -> Array:
    try:
        array: Array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None
    return _numeric(array, str(path))


def _numeric(array: Array, where: str) -> Array:
    """``array`` if it holds numbers; class names and other text are refused by name."""
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"{where}: dtype {array.dtype} is not numeric (class labels must be integers 0..C-1)"
        )
    return array


def _as_targets(
    y: Array,
    options: TableOptions,
    where: str,
    rows: Array | None = None,
    column: str = "",
) -> Array:
    """Targets as the model wants them: float32 columns, or int64 class labels."""
    if not options.labels:
        return y
    flat = y.reshape(len(y), -1)
    if flat.shape[1] != 1:
        raise DataError(f"{where}: --labels wants one target column, got {flat.shape[1]}")
    values = flat[:, 0]
    integral = (
        np.isfinite(values) & (np.floor(values) == values) if values.dtype.kind == "f" else None
    )
    if integral is not None and not integral.all():
        bad = int(np.argmin(integral))
        row = bad + 1 if rows is None else int(rows[bad])
        named = f", column {column}" if column else ""
        raise DataError(
            f"{where} row {row}{named}: label {np.format_float_positional(values[bad], trim='-')} "
            "is not an integer class index (--labels wants 0, 1, ..., C-1; "
            "--y-columns picks the target column)"
        )
    return values.astype(np.int64)


def _pick(wanted: Sequence[str], columns: Sequence[str], where: str, by_name: bool) -> list[int]:
    """0-based indices of the target columns, given by name or 1-based number (-1: the last)."""
    picked: list[int] = []
    for item in wanted:
        if by_name and item in columns:
            index = list(columns).index(item)
        else:
            try:
                number = int(item)
            except ValueError:
                known = ", ".join(columns) if by_name else "none (no header)"
                raise DataError(
                    f"{where}: --y-columns {item!r}: no such column (columns: {known})"
                ) from None
            if number == 0 or abs(number) > len(columns):
                raise DataError(
                    f"{where}: --y-columns {item}: columns are numbered 1..{len(columns)} "
                    f"(or -1..-{len(columns)} from the end)"
                )
            index = number - 1 if number > 0 else len(columns) + number
        if index in picked:
            raise DataError(f"{where}: --y-columns names column {columns[index]!r} twice")
        picked.append(index)
    if len(picked) == len(columns):
        raise DataError(f"{where}: --y-columns takes every column; no input columns are left")
    return picked


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _open_text(path: str) -> TextIO:
    if path == STDIN:
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # closed by the caller


def _csv_chunks(source: Source, size: int) -> Iterator[Chunk]:
    options = source.options
    handle = _open_text(source.path)
    try:
        reader = csv.reader(handle, delimiter=options.delimiter)
        first: list[str] | None = None
        for first in reader:
            if first:
                break
        if not first:
            raise DataError(f"{source.name}: no rows")
        first_row = reader.line_num
        header = options.header
        if header is None:
            header = not any(_is_number(cell) for cell in first)
        names = [c.strip() for c in first] if header else [str(i + 1) for i in range(len(first))]
        width = len(first)
        picked = (
            _pick(options.y_columns, names, source.name, by_name=header) if options.targets else []
        )
        inputs = [i for i in range(width) if i not in picked]
        source.columns = tuple(names[i] for i in inputs)
        cells: list[list[str]] = [] if header else [first]
        rows: list[int] = [] if header else [first_row]
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line
            if len(record) != width:
                raise DataError(
                    f"{source.name} row {reader.line_num}: {len(record)} columns, "
                    f"row {first_row} has {width} (delimiter {options.delimiter!r})"
                )
            cells.append(record)
            rows.append(reader.line_num)
            if len(cells) == size:
                yield _chunk(cells, rows, names, inputs, picked, source)
                cells, rows = [], []
        if cells:
            yield _chunk(cells, rows, names, inputs, picked, source)
    except csv.Error as exc:
        raise DataError(f"{source.name} row {reader.line_num}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{source.name}: not UTF-8 text ({exc.reason})") from None
    finally:
        if source.path != STDIN:
            handle.close()
        elif isinstance(handle, io.TextIOWrapper):
            handle.detach()  # leave sys.stdin usable


def _chunk(  # noqa: PLR0917
    cells: list[list[str]],
    rows: list[int],
    names: list[str],
    inputs: list[int],
    picked: list[int],
    source: Source,
) -> Chunk:
    try:
        table = np.array(cells, dtype=np.float64 if source.options.exact else np.float32)
    except ValueError:
        for record, row in zip(cells, rows, strict=True):
            for index, cell in enumerate(record):
                if not _is_number(cell):
                    column = names[index] if names[index] != str(index + 1) else str(index + 1)
                    hint = (
                        " (class names are not mapped: write labels as 0..C-1)"
                        if index in picked
                        else ""
                    )
                    raise DataError(
                        f"{source.name} row {row}, column {column}: {cell!r} is not a number{hint}"
                    ) from None
        raise
    row_numbers = np.array(rows, dtype=np.int64)
    y = table[:, picked] if picked else None
    if y is not None:
        column = names[picked[0]] if len(picked) == 1 else ""
        y = _as_targets(y, source.options, source.name, row_numbers, column)
    return Chunk(table[:, inputs], y, row_numbers)


def _parquet_chunks(source: Source, size: int) -> Iterator[Chunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{source.path}: reading parquet needs pyarrow: pip install 'gradstream[data]'"
        ) from None
    try:
        file = pq.ParquetFile(source.path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid and OSError
        raise DataError(f"{source.path}: not a readable parquet file ({exc})") from None
    names = list(file.schema_arrow.names)
    picked = (
        _pick(source.options.y_columns, names, source.path, by_name=True)
        if source.options.targets
        else []
    )
    inputs = [i for i in range(len(names)) if i not in picked]
    source.columns = tuple(names[i] for i in inputs)
    dtype = np.float64 if source.options.exact else np.float32
    start = 1
    for batch in file.iter_batches(batch_size=size):
        columns = []
        for index, column in enumerate(batch.columns):
            try:
                columns.append(column.to_numpy(zero_copy_only=False).astype(dtype))
            except (ValueError, TypeError):
                raise DataError(
                    f"{source.path} column {names[index]}: type {column.type} is not numeric"
                ) from None
        table = np.stack(columns, axis=1) if columns else np.empty((0, 0), dtype)
        rows = np.arange(start, start + len(table), dtype=np.int64)
        start += len(table)
        y = table[:, picked] if picked else None
        if y is not None:
            column = names[picked[0]] if len(picked) == 1 else ""
            y = _as_targets(y, source.options, source.path, rows, column)
        yield Chunk(table[:, inputs], y, rows)

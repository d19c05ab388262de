"""Table columns as a model's named inputs: ``--input NAME=COL[,COL...]``.

A model with several inputs (``gradstream info`` lists them) takes each from columns of
the table: ``--input user=user_id --input item=item_id --input dense=f1,f2,f3``. A column
goes by its header name, or by its 1-based number in a file without a header. Several
columns make one input of that many columns, in the order given (a bag of ids, or dense
features). An input the model declares ``integer`` (ids) is read exactly as int64 and must
hold whole numbers; a ``float`` one is read as float32. Every model input needs its flag,
and every column that is not a target needs an input: a column left over is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from gradstream.client._models import InputInfo
from gradstream.client.cli._data import DataError

Array = npt.NDArray[Any]

INPUT_HELP = (
    "Map columns to the model's named input NAME (repeatable), e.g. --input user=user_id "
    "--input dense=f1,f2,f3; columns by header name, or 1-based number without a header. "
    "`gradstream info NAME` lists a model's inputs."
)


@dataclass(frozen=True, slots=True)
class InputColumns:
    """One ``--input``: the input's name and its columns, in order."""

    name: str
    columns: tuple[str, ...]


def parse_inputs(
    ctx: click.Context | None, param: click.Parameter | None, values: Sequence[str]
) -> tuple[InputColumns, ...]:
    """The ``--input`` flags (a click callback): ``NAME=COL[,COL...]``, each name once."""
    out: list[InputColumns] = []
    for value in values:
        name, sep, rest = value.partition("=")
        columns = tuple(c.strip() for c in rest.split(",") if c.strip())
        if not sep or not name.strip() or not columns:
            raise click.BadParameter(
                f"{value!r}: expected NAME=COL[,COL...] (e.g. user=user_id)", param_hint="'--input'"
            )
        if any(i.name == name.strip() for i in out):
            raise click.BadParameter(
                f"{value!r}: input {name.strip()!r} is given twice", param_hint="'--input'"
            )
        out.append(InputColumns(name.strip(), columns))
    return tuple(out)


class NamedInputs:
    """Turns a chunk's input columns into the dict of named inputs the model takes."""

    def __init__(
        self, flags: Sequence[InputColumns], model: Sequence[InputInfo], source: str
    ) -> None:
        declared = {i.name: i for i in model}
        given = {f.name for f in flags}
        if model:
            unknown = [f.name for f in flags if f.name not in declared]
            if unknown:
                raise DataError(
                    f"--input {unknown[0]}: the model has no input {unknown[0]!r} "
                    f"(its inputs: {', '.join(declared)})"
                )
            missing = [n for n in declared if n not in given]
            if missing:
                raise DataError(
                    f"the model's input {missing[0]!r} has no --input {missing[0]}=COL[,COL...] "
                    f"(its inputs: {', '.join(declared)})"
                )
        self._flags = tuple(flags)
        self._integer = {n for n, i in declared.items() if i.kind == "integer"}
        self._source = source
        self._picked: list[tuple[str, list[int]]] | None = None

    def _pick(self, columns: Sequence[str]) -> list[tuple[str, list[int]]]:
        picked: list[tuple[str, list[int]]] = []
        used: set[int] = set()
        for flag in self._flags:
            indices = []
            for column in flag.columns:
                if column not in columns:
                    raise DataError(
                        f"{self._source}: --input {flag.name}: no input column {column!r} "
                        f"(input columns: {', '.join(columns)})"
                    )
                indices.append(columns.index(column))
            used.update(indices)
            picked.append((flag.name, indices))
        left = [c for i, c in enumerate(columns) if i not in used]
        if left:
            raise DataError(
                f"{self._source}: column {left[0]!r} is in no --input (each column that is "
                "not a target feeds one input; drop it from the file or map it)"
            )
        return picked

    def __call__(self, x: Array, columns: Sequence[str], rows: Array) -> dict[str, Array]:
        """The named inputs of one chunk (``x``: its input columns, ``rows``: file rows)."""
        if self._picked is None:
            self._picked = self._pick(columns)
        out: dict[str, Array] = {}
        for name, indices in self._picked:
            values = x[:, indices]
            if name in self._integer:
                whole = np.isfinite(values) & (np.floor(values) == values)
                if not whole.all():
                    row, col = np.argwhere(~whole)[0]
                    raise DataError(
                        f"{self._source} row {int(rows[row])}, column "
                        f"{columns[indices[col]]}: {_number(values[row, col])} is not an id "
                        f"(input {name!r} takes integers)"
                    )
                out[name] = values.astype(np.int64)
            else:
                out[name] = values.astype(np.float32)
        return out


def _number(value: Any) -> str:
    return np.format_float_positional(value, trim="-") if np.isfinite(value) else str(value)

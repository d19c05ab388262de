"""``--input NAME=COL[,COL]``: table columns as a model's named inputs."""

from __future__ import annotations

import re

import click
import numpy as np
import pytest

from gradstream.client._models import InputInfo
from gradstream.client.cli._data import DataError
from gradstream.client.cli._inputs import InputColumns, NamedInputs, parse_inputs

MODEL = (
    InputInfo("user", "integer", (-1,)),
    InputInfo("item", "integer", (-1,)),
    InputInfo("dense", "float", (2,)),
)
COLUMNS = ("user_id", "f1", "item_id", "f2")


def _flags(*values: str) -> tuple[InputColumns, ...]:
    return parse_inputs(None, None, values)


def test_columns_become_named_inputs_ids_exact_and_in_the_order_given() -> None:
    named = NamedInputs(_flags("user=user_id", "item=item_id", "dense=f2,f1"), MODEL, "t.csv")
    big = 2.0**53 - 1  # an id float32 would round
    x = np.array([[big, 0.5, 3.0, 1.25], [7.0, -1.0, 0.0, 2.0]])
    out = named(x, COLUMNS, np.array([2, 3]))
    assert list(out) == ["user", "item", "dense"]
    assert out["user"].dtype == np.int64 and out["user"].tolist() == [[2**53 - 1], [7]]
    assert out["item"].tolist() == [[3], [0]]
    assert out["dense"].dtype == np.float32 and out["dense"].tolist() == [[1.25, 0.5], [2, -1]]


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("user=user_id", "item=item_id", "dense=f1,f2", "extra=f1"), "no input 'extra'"),
        (("user=user_id", "dense=f1,f2"), "the model's input 'item' has no --input item="),
        (("user=user_id", "item=item_id", "dense=f1,f9"), "no input column 'f9'"),
        (("user=user_id", "item=item_id", "dense=f1"), "column 'f2' is in no --input"),
    ],
)
def test_a_mapping_that_does_not_fit_the_model_or_the_table_names_it(
    flags: tuple[str, ...], words: str
) -> None:
    with pytest.raises(DataError, match=re.escape(words)):
        NamedInputs(_flags(*flags), MODEL, "t.csv")(np.zeros((1, 4)), COLUMNS, np.array([2]))


def test_an_id_that_is_not_a_whole_number_names_its_row_and_column() -> None:
    named = NamedInputs(_flags("user=user_id", "item=item_id", "dense=f1,f2"), MODEL, "t.csv")
    x = np.array([[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 2.5, 0.0]])
    with pytest.raises(DataError, match=re.escape("t.csv row 9, column item_id: 2.5 is not an id")):
        named(x, COLUMNS, np.array([8, 9]))


@pytest.mark.parametrize("value", ["user", "user=", "=a", "user=,"])
def test_a_malformed_flag_is_a_usage_error(value: str) -> None:
    with pytest.raises(click.BadParameter, match="NAME=COL"):
        _flags(value)


def test_an_input_given_twice_is_a_usage_error() -> None:
    with pytest.raises(click.BadParameter, match="given twice"):
        _flags("user=a", "user=b")

"""``gradstream train`` reading data files: formats, target columns, errors with file rows.

Trained parameters are compared bitwise with the plain PyTorch loop written the textbook
way on the same rows in the same order.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gradstream.client import Client
from gradstream.server.main import BackgroundServer
from tests.conftest import server_settings
from tests.e2e._cli import GRADSTREAM, gradstream, one_line_error

SPEC = {
    "architecture": {"kind": "linear", "in_features": 3, "out_features": 1},
    "init": {"kind": "zeros"},
    "loss": {"kind": "mse", "reduction": "mean"},
    "optimizer": {"kind": "sgd", "lr": 0.05},
}
CLASSIFIER = {
    "architecture": {"kind": "linear", "in_features": 2, "out_features": 3},
    "init": {"kind": "zeros"},
    "loss": {"kind": "cross_entropy"},
    "optimizer": {"kind": "sgd", "lr": 0.1},
}
ROWS = 50


@pytest.fixture(scope="module")
def served() -> Iterator[BackgroundServer]:
    with BackgroundServer(server_settings()) as running:
        yield running


@pytest.fixture(scope="module")
def table() -> tuple[np.ndarray, np.ndarray]:
    """float32 inputs (3 columns) and targets (1 column) that survive a trip through text."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (ROWS, 3)).astype(np.float32)
    y = (x @ np.array([[1.5], [-2.0], [0.5]], np.float32) + 0.25).astype(np.float32)
    return x, y


def textbook(x: np.ndarray, y: np.ndarray, order: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The plain loop: one SGD step per batch of rows ``order[i]``."""
    model = torch.nn.Linear(3, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.MSELoss()
    for rows in order:
        optimizer.zero_grad()
        loss = loss_fn(model(torch.from_numpy(x[rows])), torch.from_numpy(y[rows]))
        loss.backward()
        optimizer.step()
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


def trained(served: BackgroundServer, name: str, *args: str) -> dict[str, np.ndarray]:
    target = ("--target", served.target)
    gradstream("create", name, "--spec", json.dumps(SPEC), *target)
    try:
        gradstream("train", name, *args, "--quiet", *target)
        with Client(served.target) as client:
            return client.parameters(name)
    finally:
        gradstream("delete", name, *target)


def batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]


def assert_bitwise(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def write_csv(path: Path, rows: np.ndarray, header: str | None, delimiter: str = ",") -> None:
    np.savetxt(path, rows, delimiter=delimiter, fmt="%.9g", header=header or "", comments="")


def test_label_in_any_column_by_name_or_number(
    served: BackgroundServer, table: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = table
    want = textbook(x, y, batches(ROWS, 8))
    first = tmp_path / "first.csv"
    write_csv(first, np.hstack([y, x]), "target,a,b,c")
    assert_bitwise(
        trained(served, "by-name", str(first), "--y-columns", "target", "--batch-size", "8"), want
    )
    assert_bitwise(
        trained(served, "by-number", str(first), "--y-columns", "1", "--batch-size", "8"), want
    )
    middle = tmp_path / "middle.csv"
    write_csv(middle, np.hstack([x[:, :1], y, x[:, 1:]]), None)  # no header
    assert_bitwise(
        trained(
            served,
            "headerless",
            str(middle),
            "--y-columns",
            "2",
            "--no-header",
            "--batch-size",
            "8",
        ),
        want,
    )


def test_semicolons_quotes_stdin_npy_and_parquet(
    served: BackgroundServer, table: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = table
    want = textbook(x, y, batches(ROWS, 16))
    quoted = tmp_path / "quoted.csv"
    lines = ['"a";"b";"c";"y"'] + [";".join(f'"{v:.9g}"' for v in row) for row in np.hstack([x, y])]
    quoted.write_text("\n".join(lines) + "\n")
    assert_bitwise(
        trained(served, "semi", str(quoted), "--delimiter", ";", "--batch-size", "16"), want
    )

    target = ("--target", served.target)
    gradstream("create", "stdin", "--spec", json.dumps(SPEC), *target)
    text = "\n".join(",".join(f"{v:.9g}" for v in row) for row in np.hstack([x, y]))
    gradstream("train", "stdin", "-", "--batch-size", "16", "--quiet", *target, stdin=text)
    with Client(served.target) as client:
        assert_bitwise(client.parameters("stdin"), want)
    gradstream("delete", "stdin", *target)

    single = tmp_path / "table.npy"
    np.save(single, np.hstack([x, y]))
    assert_bitwise(trained(served, "npy", str(single), "--batch-size", "16"), want)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    pair = ("--x", str(tmp_path / "x.npy"), "--y", str(tmp_path / "y.npy"))
    assert_bitwise(trained(served, "pair", *pair, "--batch-size", "16"), want)

    parquet = tmp_path / "t.parquet"
    columns = {"a": x[:, 0], "label": y[:, 0], "b": x[:, 1], "c": x[:, 2]}
    pq.write_table(pa.table(columns), parquet, row_group_size=7)  # row groups != batches
    assert_bitwise(
        trained(served, "parquet", str(parquet), "--y-columns", "label", "--batch-size", "16"), want
    )


def test_shuffle_with_a_seed_is_the_loop_on_that_permutation(
    served: BackgroundServer, table: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = table
    rng = np.random.default_rng(11)
    order = [
        part for _ in range(3) for part in np.array_split(rng.permutation(ROWS), range(8, ROWS, 8))
    ]
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    got = trained(
        served,
        "shuffled",
        str(data),
        "--shuffle",
        "--seed",
        "11",
        "--epochs",
        "3",
        "--batch-size",
        "8",
    )
    assert_bitwise(got, textbook(x, y, order))
    in_order = textbook(x, y, batches(ROWS, 8) * 3)
    assert not np.array_equal(got["weight"], in_order["weight"])  # it did shuffle


def test_data_errors_name_the_file_row_and_column(served: BackgroundServer, tmp_path: Path) -> None:
    target = ("--target", served.target)
    gradstream("create", "cls", "--spec", json.dumps(CLASSIFIER), *target)
    try:
        text_labels = tmp_path / "text.csv"
        text_labels.write_text("0.5,1.0,cat\n0.1,0.2,dog\n")  # no header: row 1 is data
        line = one_line_error(
            gradstream("train", "cls", str(text_labels), "--labels", *target, check=False), 1
        )
        assert "text.csv row 1, column 3: 'cat' is not a number" in line
        fraction = tmp_path / "fraction.csv"
        fraction.write_text("a,b,y\n1,2,0\n3,4,0.7\n")
        line = one_line_error(
            gradstream("train", "cls", str(fraction), "--labels", *target, check=False), 1
        )
        assert "fraction.csv row 3, column y: label 0.7 is not an integer" in line
        ragged = tmp_path / "ragged.csv"
        ragged.write_text("a,b,y\n1,2,0\n3,4\n")
        line = one_line_error(gradstream("train", "cls", str(ragged), *target, check=False), 1)
        assert "ragged.csv row 3: 2 columns, row 1 has 3" in line
        unknown = one_line_error(
            gradstream("train", "cls", str(fraction), "--y-columns", "label", *target, check=False),
            1,
        )
        assert "--y-columns 'label': no such column (columns: a, b, y)" in unknown
        names = tmp_path / "names.npz"
        np.savez(names, x=np.ones((2, 2), np.float32), y=np.array(["cat", "dog"]))
        line = one_line_error(gradstream("train", "cls", str(names), *target, check=False), 1)
        assert "names.npz y: dtype <U3 is not numeric" in line
        with Client(served.target) as client:
            assert client.get_model("cls").step == 0  # nothing was trained by the bad files
    finally:
        gradstream("delete", "cls", *target)


def test_rejected_batches_name_their_rows_and_can_be_skipped(
    served: BackgroundServer, tmp_path: Path
) -> None:
    target = ("--target", served.target)
    gradstream("create", "rej", "--spec", json.dumps(CLASSIFIER), *target)
    try:
        rows = ["a,b,label"] + [f"{i / 10},{-i / 10},{i % 3}" for i in range(40)]
        rows[23] = "2.2,-2.2,7"  # file row 24: a label out of range
        rows[40] = "4.0,-4.0,9"  # and in the last batch, which travels in a stream of its own
        data = tmp_path / "labels.csv"
        data.write_text("\n".join(rows) + "\n")
        args = ("train", "rej", str(data), "--labels", "--batch-size", "10", *target)
        stopped = one_line_error(gradstream(*args, "--quiet", check=False), 1)
        assert "labels.csv rows 22-31 (batch 3): rejected: y: label 7 is out of range" in stopped
        assert "batches[" not in stopped
        assert "--skip-rejected" in stopped
        went_on = gradstream(*args, "--skip-rejected", "--quiet")
        assert "labels.csv rows 22-31 (batch 3): y: label 7 is out of range" in went_on.stderr
        assert "labels.csv rows 32-41 (batch 4): y: label 9 is out of range" in went_on.stderr
        assert "trained 4 batches" in went_on.stdout
        assert "2 rejected" in went_on.stdout
        shuffled = gradstream(*args, "--skip-rejected", "--shuffle", "--quiet")
        assert re.search(
            r"labels.csv rows (\d+, )+\.\.\. \(10 shuffled rows\) \(batch \d\): y: label 7",
            shuffled.stderr,
        )
    finally:
        gradstream("delete", "rej", *target)


def test_a_short_run_reports_the_last_loss_and_a_rerun_with_a_producer_id_resumes(
    served: BackgroundServer, table: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = table
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y)
    target = ("--target", served.target)
    gradstream("create", "short", "--spec", json.dumps(SPEC), *target)
    try:
        args = ("train", "short", str(data), "--batch-size", "20", "--producer-id", "p", *target)
        first = gradstream(*args).stdout
        assert "trained 3 batches, step 3, loss " in first
        assert "loss n/a" not in first  # 3 batches, --report-every 10: the last still reports
        again = gradstream(*args).stdout
        assert "step 3," in again
        assert "3 duplicate (applied before, not again)" in again
        with Client(served.target) as client:
            assert client.get_model("short").step == 3
    finally:
        gradstream("delete", "short", *target)


def test_a_table_is_streamed_not_read_whole_first(served: BackgroundServer) -> None:
    """Batches train while stdin is still open: the CLI never waits for the end of the data."""
    target = ("--target", served.target)
    gradstream("create", "streamed", "--spec", json.dumps(SPEC), *target)
    command = [*GRADSTREAM, "train", "streamed", "-", "--batch-size", "4", "--quiet", *target]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdin is not None
        process.stdin.write("a,b,c,y\n" + "0.5,0.25,1,2\n" * 12)
        process.stdin.flush()
        with Client(served.target) as client:
            deadline = time.monotonic() + 60
            while client.get_model("streamed").step == 0:
                assert time.monotonic() < deadline, "nothing trained while stdin was open"
                time.sleep(0.1)
        process.stdin.write("0.5,0.25,1,2\n" * 4)
        process.stdin.close()
        assert process.wait(timeout=60) == 0
        assert process.stdout is not None
        out = process.stdout.read()
        assert "trained 4 batches, step 4" in out
    finally:
        process.kill()
        gradstream("delete", "streamed", *target)


CTR = {
    "architecture": {
        "kind": "embedding_mlp",
        "embeddings": [
            {"input": "user", "num_embeddings": 10, "dim": 2, "mode": "sum"},
            {"input": "category", "num_embeddings": 5, "dim": 2, "mode": "mean"},
        ],
        "dense_features": 2,
        "hidden": [3],
        "out_features": 1,
    },
    "init": {"kind": "seed", "seed": 0},
    "loss": {"kind": "bce_with_logits"},
    "optimizer": {"kind": "sgd", "lr": 0.1},
}


def test_columns_map_to_named_inputs(served: BackgroundServer, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    user = rng.integers(0, 10, ROWS)
    categories = rng.integers(0, 5, (ROWS, 2))
    dense = (rng.integers(-64, 64, (ROWS, 2)) / 32).astype(np.float32)  # exact in text
    clicked = rng.integers(0, 2, ROWS)
    path = tmp_path / "clicks.csv"
    # Columns in an order of their own; dense's two columns are given in reverse.
    table = np.column_stack([dense[:, 1], clicked, categories, user, dense[:, 0]])
    write_csv(path, table, "f2,clicked,cat1,cat2,user_id,f1")
    flags: tuple[str, ...] = (
        "--input",
        "user=user_id",
        "--input",
        "category=cat1,cat2",
        "--input",
        "dense=f1,f2",
    )
    flags += ("--y-columns", "clicked")
    target = ("--target", served.target)
    with Client(served.target) as client:
        client.create_model("ctr-cli", CTR)
        client.create_model("ctr-sdk", CTR)
        try:
            info = gradstream("info", "ctr-cli", *target).stdout
            assert "input user: integer, shape (rows, any)" in info
            assert "input dense: float, shape (rows, 2)" in info
            gradstream(
                "train", "ctr-cli", str(path), *flags, "--batch-size", "16", "--quiet", *target
            )
            sdk = [
                (
                    {"user": user[r, None], "category": categories[r], "dense": dense[r]},
                    clicked[r, None].astype(np.float32),
                )
                for r in batches(ROWS, 16)
            ]
            list(client.train("ctr-sdk", sdk))
            assert_bitwise(client.parameters("ctr-cli"), client.parameters("ctr-sdk"))

            new = tmp_path / "new.csv"
            write_csv(new, np.delete(table, 1, axis=1), "f2,cat1,cat2,user_id,f1")
            predicted = gradstream("predict", "ctr-cli", str(new), *flags[:6], *target).stdout
            inputs = {"user": user[:, None], "category": categories, "dense": dense}
            expected = client.predict("ctr-cli", inputs).reshape(-1)
            np.testing.assert_allclose(np.loadtxt(predicted.splitlines()), expected, rtol=1e-7)
            evaluated = json.loads(gradstream("eval", "ctr-cli", str(path), *flags, *target).stdout)
            assert evaluated["rows"] == ROWS and 0 < evaluated["log_loss"] < 1

            line = one_line_error(
                gradstream(
                    "train", "ctr-cli", str(path), *flags[:4], *flags[6:], *target, check=False
                ),
                1,
            )
            assert "the model's input 'dense' has no --input dense=" in line
            line = one_line_error(
                gradstream(
                    "train",
                    "ctr-cli",
                    str(path),
                    *flags[:4],
                    "--input",
                    "dense=f1",
                    *flags[6:],
                    *target,
                    check=False,
                ),
                1,
            )
            assert "column 'f2' is in no --input" in line
        finally:
            client.delete_model("ctr-cli")
            client.delete_model("ctr-sdk")

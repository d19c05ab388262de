"""``exported`` programs: a plain archive trains like the module; a hostile one runs nothing.

Each hostile archive is checked twice: ``torch.export.load`` alone runs its payload (so
the archive really is hostile), and ``load_program`` refuses it with the payload unrun.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from gradstream.server.errors import InvalidArgument
from gradstream.server.exported import check_archive, load_program, signature

LIMIT = 1 << 20


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.tanh(self.hidden(x)))
        return out


def _archive() -> bytes:
    torch.manual_seed(0)
    rows = torch.export.Dim("rows")
    program = torch.export.export(Net(), (torch.randn(4, 3),), dynamic_shapes=({0: rows},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


ARCHIVE = _archive()


class Touch:
    """A pickle whose loading creates ``path``: the stand-in for any code an attacker runs."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.path,))


def _rewrite(data: bytes, change: Callable[[str, bytes], bytes | None]) -> bytes:
    """The archive with each member passed through ``change`` (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            content = change(info.filename.split("/", 1)[1], source.read(info))
            if content is not None:
                target.writestr(info.filename, content)
    return out.getvalue()


def _edit_json(path: str, edit: Callable[[Any], None]) -> Callable[[str, bytes], bytes]:
    def change(name: str, content: bytes) -> bytes:
        if name != path:
            return content
        document = json.loads(content)
        edit(document)
        return json.dumps(document).encode()

    return change


def _pickled_weight(payload: bytes) -> Callable[[str, bytes], bytes]:
    """Weight 0 marked ``use_pickle``, its payload the given pickle."""

    def change(name: str, content: bytes) -> bytes:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(content)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        return payload if name == "data/weights/weight_0" else content

    return change


def _sample_inputs(payload: bytes) -> Callable[[str, bytes], bytes]:
    return lambda name, content: payload if name == "data/sample_inputs/model.pt" else content


def _shape_expression(code: str) -> Callable[[str, bytes], bytes]:
    def edit(program: Any) -> None:
        sizes = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] = code

    return _edit_json("models/model.json", edit)


HOSTILE: dict[str, Callable[[pathlib.Path], Callable[[str, bytes], bytes]]] = {
    "pickled weight": lambda marker: _pickled_weight(pickle.dumps(Touch(marker))),
    "sample inputs that need a full unpickle": lambda marker: _sample_inputs(
        pickle.dumps(Touch(marker))
    ),
    "shape expression sympify evals": lambda marker: _shape_expression(
        f"__import__('pathlib').Path({str(marker)!r}).touch() or Symbol('s0')"
    ),
    "guard that module() compiles and runs": lambda marker: _edit_json(
        "models/model.json",
        lambda p: p.update(
            guards_code=[
                f"L['x'].size()[0] < 0 or __import__('pathlib').Path({str(marker)!r}).touch()"
            ]
        ),
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_and_its_payload_never_runs(
    attack: str, tmp_path: pathlib.Path
) -> None:
    control = tmp_path / "ran-under-torch"
    hostile = _rewrite(ARCHIVE, HOSTILE[attack](control))
    with contextlib.suppress(Exception):  # torch may fail after the payload ran
        torch.export.load(io.BytesIO(hostile)).module()(torch.randn(4, 3))
    assert control.exists(), "the crafted archive must really carry a payload torch runs"

    marker = tmp_path / "ran-under-gradstream"
    with pytest.raises(InvalidArgument) as caught:
        load_program(_rewrite(ARCHIVE, HOSTILE[attack](marker)), LIMIT)
    assert caught.value.field == "program"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            _edit_json("models/model.json", lambda p: p.update(guards_code=["import os"])),
            "guard that is not an expression",
        ),
        (
            _edit_json(
                "models/model.json",
                lambda p: p["graph_module"]["graph"]["nodes"][0].update(target="torch.os.system"),
            ),
            "'torch.os.system'",
        ),
        (
            _edit_json(
                "models/model.json",
                lambda p: p["graph_module"]["graph"]["nodes"][0].update(
                    target="torch.ops.aten.save.default"
                ),
            ),
            "touches files",
        ),
        (_shape_expression("Symbol('s0').__class__"), "shape expression"),
        (
            _edit_json(
                "models/model.json",
                lambda p: p.update(guards_code=["L['x'].size()[0] == L['x'].__class__"]),
            ),
            "guard it may not",
        ),
        (
            lambda name, content: content if name != "data/sample_inputs/model.pt" else None,
            "lacks data/sample_inputs/model.pt",
        ),
        (
            lambda name, content: b"legacy" if name == "archive_format" else content,
            "archive_format",
        ),
    ],
)
def test_archives_torch_would_run_code_from_are_refused(
    change: Callable[[str, bytes], bytes | None], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_archive(_rewrite(ARCHIVE, change), LIMIT)
    assert reason in caught.value.message


def test_extra_members_and_other_formats_are_refused() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(ARCHIVE)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, source.read(info))
        target.writestr("archive/data/constants/custom_obj_0", b"x")
    with pytest.raises(InvalidArgument, match="custom_obj_0"):
        check_archive(out.getvalue(), LIMIT)
    with pytest.raises(InvalidArgument, match="not a zip archive"):
        check_archive(pickle.dumps(Touch(pathlib.Path("never"))), LIMIT)
    compressed = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(ARCHIVE)) as source,
        zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as target,
    ):
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    with pytest.raises(InvalidArgument, match="compressed"):
        check_archive(compressed.getvalue(), LIMIT)


def test_the_size_bound_is_the_setting() -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_program(ARCHIVE, len(ARCHIVE) - 1)
    assert f"is {len(ARCHIVE)} bytes, more than max_program_bytes ({len(ARCHIVE) - 1})" in str(
        caught.value
    )
    load_program(ARCHIVE, len(ARCHIVE))


def test_a_plain_archive_trains_bitwise_like_the_module() -> None:
    module = load_program(ARCHIVE, LIMIT).module()
    torch.manual_seed(0)
    eager = Net()
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in eager.named_parameters()]
    ours = torch.optim.Adam(module.parameters(), lr=0.01)
    theirs = torch.optim.Adam(eager.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(3)
    for rows in (5, 2, 7):  # the batch dimension is dynamic
        x, y = torch.randn(rows, 3, generator=g), torch.randn(rows, 2, generator=g)
        for net, opt in ((module, ours), (eager, theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for a, b in zip(module.parameters(), eager.parameters(), strict=True):
        assert torch.equal(a, b)


class _Inputs(nn.Module):
    """Floats of a fixed width, a bag of ids of free length, and a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(7, 2)
        self.linear = nn.Linear(3 + 2, 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = (self.table(ids) * mask.unsqueeze(-1)).sum(1)
        out: torch.Tensor = self.linear(torch.cat([dense, pooled], dim=1))
        return out


def _save(module: nn.Module, example: tuple[torch.Tensor, ...], dynamic: Any) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, example, dynamic_shapes=dynamic), buffer)
    return buffer.getvalue()


def test_the_signature_declares_each_user_input_by_name_kind_and_sizes() -> None:
    rows, bag = torch.export.Dim("rows"), torch.export.Dim("bag")
    example = (torch.randn(4, 3), torch.randint(0, 7, (4, 5)), torch.ones(4, 5))
    dynamic = ({0: rows}, {0: rows, 1: bag}, {0: rows, 1: bag})
    inputs, in_features, out_features = signature(_save(_Inputs(), example, dynamic), 0)
    assert [(i.name, i.kind, i.shape, i.ids_below) for i in inputs] == [
        ("dense", "float", (3,), 0),
        ("ids", "integer", (-1,), 7),  # passed straight to the table: its rows bound the ids
        ("mask", "float", (-1,), 0),
    ]
    assert (in_features, out_features) == (3 + 1 + 1, 1)
    boolean = (example[0], example[1], torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(InvalidArgument, match=r"input 'mask' has dtype torch.bool; inputs are"):
        signature(_save(_Inputs(), boolean, dynamic), 0)

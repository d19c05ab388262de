"""Architecture ``exported`` through the service: a client's torch.export archive trains
bitwise like the textbook loop, survives a restart, and a hostile one runs nothing."""

from __future__ import annotations

import io
import pathlib
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gradstream.client import (
    Client,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    export_module,
)
from gradstream.server.main import BackgroundServer
from tests.conftest import server_settings
from tests.integration._security import ADMIN, TRAINER, make_pki
from tests.unit.server.test_exported import ARCHIVE as NET_ARCHIVE
from tests.unit.server.test_exported import HOSTILE, _rewrite

SPEC: dict[str, Any] = {
    "architecture": {"kind": "exported"},
    "loss": {"kind": "mse"},
    "optimizer": {"kind": "adam", "lr": 0.01},
    "clip_grad": {"max_norm": 0.5},
}


def _module() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


ARCHIVE = export_module(_module(), (torch.randn(4, 3),))


def _batches(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((5, 3)).astype(np.float32),
            rng.standard_normal((5, 2)).astype(np.float32),
        )
        for _ in range(n)
    ]


def _textbook(batches: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """The plain loop on the archive's module: export's module(), the loss, torch.optim."""
    module = torch.export.load(io.BytesIO(ARCHIVE)).module()
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(module(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm=0.5)
        optimizer.step()
    return {k: v.detach() for k, v in module.named_parameters()}


def _assert_bitwise(got: dict[str, np.ndarray], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for key, value in want.items():
        assert torch.equal(torch.from_numpy(np.asarray(got[key])), value), key


def test_an_exported_mlp_trains_bitwise_like_the_textbook_loop(client: Client, name: str) -> None:
    info = client.create_model(name, SPEC, program=ARCHIVE)
    assert {k: list(v.shape) for k, v in info.parameters.items()} == {
        "0.weight": [8, 3],
        "0.bias": [8],
        "2.weight": [2, 8],
        "2.bias": [2],
    }
    batches = _batches(6)
    results = list(client.train(name, batches))
    assert [r.outcome for r in results] == ["APPLIED"] * 6
    trained = _textbook(batches)
    _assert_bitwise(client.parameters(name), trained)
    # Predict (from a parameter snapshot, on its own threads) is the program's output.
    module = torch.export.load(io.BytesIO(ARCHIVE)).module()
    module.load_state_dict(trained)
    x = _batches(1, seed=9)[0][0]
    with torch.no_grad():
        want = module(torch.from_numpy(x))
    assert torch.equal(torch.from_numpy(np.asarray(client.predict(name, x))), want)


def test_the_program_may_come_from_a_file_and_widths_must_match(
    client: Client, name: str, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "net.pt2"
    path.write_bytes(ARCHIVE)
    client.create_model(name, SPEC, program=path)
    wrong = {**SPEC, "architecture": {"kind": "exported", "in_features": 4}}
    with pytest.raises(InvalidArgument, match=r"spec.architecture.in_features.*is 4.*3"):
        client.create_model(name + "w", wrong, program=ARCHIVE)
    with pytest.raises(InvalidArgument, match="program"):
        client.create_model(name + "n", SPEC)  # exported without a program
    linear = {"architecture": {"kind": "linear", "in_features": 3, "out_features": 2}}
    with pytest.raises(InvalidArgument, match="only read by 'exported'"):
        client.create_model(name + "l", linear, program=ARCHIVE)
    for refused in ("w", "n", "l"):
        with pytest.raises(NotFound):
            client.get_model(name + refused)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.a(x) + z
        return out


def test_a_program_with_two_inputs_takes_them_by_name(client: Client, name: str) -> None:
    archive = export_module(TwoInputs(), (torch.randn(4, 3), torch.randn(4, 1)))
    info = client.create_model(name, SPEC, program=archive)
    assert sorted(info.parameters) == ["a.bias", "a.weight"]
    # x alone is refused, naming the inputs the program takes (tests/integration/
    # test_named_inputs.py trains such a program bitwise through the service).
    with pytest.raises(InvalidArgument, match=r"x: the model takes 2 inputs \(x .*, z "):
        client.predict(name, np.ones((2, 3), np.float32))


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_hostile_archive_through_create_model_runs_nothing(
    attack: str, client: Client, name: str, tmp_path: pathlib.Path
) -> None:
    marker = tmp_path / "payload-ran"
    # The unit tests' archive (input named x), which they prove torch alone runs the payload of.
    crafted = _rewrite(NET_ARCHIVE, HOSTILE[attack](marker))
    with pytest.raises(InvalidArgument, match="program"):
        client.create_model(name, SPEC, program=crafted)
    assert not marker.exists()
    with pytest.raises(NotFound):
        client.get_model(name)


def test_an_oversized_archive_is_refused_before_it_is_read(name: str) -> None:
    settings = server_settings(max_program_bytes=len(ARCHIVE) - 1)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        with pytest.raises(InvalidArgument, match="more than max_program_bytes"):
            client.create_model(name, SPEC, program=ARCHIVE)
        with pytest.raises(NotFound):
            client.get_model(name)


def test_only_a_token_with_the_admin_action_may_upload(tmp_path: pathlib.Path) -> None:
    pki = make_pki(tmp_path)
    with BackgroundServer(server_settings(tokens_file=pki.tokens)) as server:
        with (
            Client(server.target, token=TRAINER, timeout=30) as trainer,
            pytest.raises(PermissionDenied),
        ):
            trainer.create_model("alpha-exported", SPEC, program=ARCHIVE)
        with Client(server.target, token=ADMIN, timeout=30) as admin:
            with pytest.raises(NotFound):
                admin.get_model("alpha-exported")
            admin.create_model("alpha-exported", SPEC, program=ARCHIVE)


def test_a_restart_restores_the_archive_and_training_continues_bitwise(
    tmp_path: pathlib.Path,
) -> None:
    batches = _batches(8, seed=1)
    settings = server_settings(checkpoint_dir=tmp_path)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("net", SPEC, program=ARCHIVE)
        list(client.train("net", batches[:4]))
        client.save_checkpoint("net")
    files = sorted(p.name for p in (tmp_path / "net").glob("ckpt-*/*"))
    assert "program.pt2" in files
    with BackgroundServer(settings) as server, Client(server.target) as client:
        assert client.get_model("net").step == 4
        results = list(client.train("net", batches[4:]))
        assert [r.outcome for r in results] == ["APPLIED"] * 4
        _assert_bitwise(client.parameters("net"), _textbook(batches))


def test_the_activation_bound_uses_the_programs_measured_row_cost() -> None:
    settings = server_settings(max_activation_bytes=4096)
    small, large = _batches(1)[0], (np.ones((1000, 3), np.float32), np.ones((1000, 2), np.float32))
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("net", SPEC, program=ARCHIVE)
        before = client.parameters("net")
        [result] = list(client.train("net", [large], skip_rejected=True))
        assert result.outcome == "REJECTED"
        assert "max_activation_bytes: 1000 rows need about" in result.reason
        after = client.parameters("net")
        assert all(before[k].tobytes() == after[k].tobytes() for k in before)
        [result] = list(client.train("net", [small]))
        assert result.outcome == "APPLIED"


def test_a_program_that_updates_buffers_is_refused_and_eval_mode_batch_norm_trains(
    client: Client, name: str, tmp_path: pathlib.Path
) -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    example = (torch.randn(4, 3),)
    updated = r"updates buffers 1\.num_batches_tracked, 1\.running_mean, 1\.running_var as"
    with pytest.raises(InvalidArgument, match=updated):
        client.create_model(name, SPEC, program=export_module(net.train(), example))
    client.create_model(name, SPEC, program=export_module(net.eval(), example))
    assert [r.outcome for r in client.train(name, _batches(3))] == ["APPLIED"] * 3
    # Its buffers go out with the parameters; the module keeps the mode it was traced in.
    [path] = client.export(name, "safetensors", tmp_path / "out")
    assert path.stat().st_size > 0


def test_a_corrupt_archive_in_a_checkpoint_falls_back_to_the_previous_one(
    tmp_path: pathlib.Path,
) -> None:
    settings = server_settings(checkpoint_dir=tmp_path)
    with BackgroundServer(settings) as server, Client(server.target) as client:
        client.create_model("net", SPEC, program=ARCHIVE)  # checkpointed at step 0
        list(client.train("net", _batches(2)))
        client.save_checkpoint("net")
    # Every checkpoint after the first (step 0): the requested one and the final one.
    _first, *later = sorted((tmp_path / "net").glob("ckpt-*"), key=lambda p: p.name[5:15])
    assert later
    for checkpoint in later:
        program = checkpoint / "program.pt2"
        data = bytearray(program.read_bytes())
        data[len(data) // 2] ^= 0xFF
        program.write_bytes(bytes(data))
    with BackgroundServer(settings) as server, Client(server.target) as client:
        assert client.get_model("net").step == 0

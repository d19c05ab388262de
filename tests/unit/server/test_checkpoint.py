"""checkpoint.py: a checkpoint restores bitwise; a damaged one is refused, never parsed."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from gradstream.server import checkpoint as ck
from gradstream.server.batches import Batch
from gradstream.server.engine import Outcome, Trainer, TrainerFactory, TrainOptions
from gradstream.server.errors import DataLoss
from gradstream.server.metrics import Metrics
from gradstream.server.spec import parse_spec
from gradstream.server.worker import ModelWorker
from tests.conftest import SmallVolume

CPU = torch.device("cpu")
SPEC = {
    "architecture": {"kind": "mlp", "in_features": 3, "out_features": 2, "hidden": [5]},
    "init": {"kind": "seed", "seed": 3},
    "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    "accumulate_steps": 3,
}


def _batches(n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [
        Batch(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g), sequence=i + 1)
        for i in range(n)
    ]


def _train(trainer: Trainer, batches: list[Batch]) -> list[Outcome]:
    options = TrainOptions(producer_id="p")
    return [trainer.train(b, options).outcome for b in batches]


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {f"param/{n}": p.detach().clone() for n, p in trainer.module.named_parameters()}
    for n, p in trainer.module.named_parameters():
        for key, value in trainer.optimizer.state.get(p, {}).items():
            state[f"optim/{n}/{key}"] = value.clone()
    return state


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_restore_mid_accumulation_continues_bitwise_like_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    batches = _batches(20)
    reference = Trainer("m", parse_spec(SPEC), CPU)
    _train(reference, batches)

    first = Trainer("m", parse_spec(SPEC), CPU)
    outcomes = _train(first, batches[:10])  # 3 full steps and one batch pending
    assert outcomes[-1] == Outcome.ACCUMULATED and first.pending == 1
    saved = ck.write(tmp_path / "m", ck.take(first), keep=2)
    _, snapshot, skipped = ck.newest(tmp_path / "m")
    assert skipped == [] and saved.producers == {"p": 10}
    resumed = ck.restore(snapshot, TrainerFactory(CPU))
    assert (resumed.step, resumed.pending, resumed.producers) == (3, 1, {"p": 10})
    # The batches applied before the checkpoint are not applied again...
    assert _train(resumed, batches[:10]) == [Outcome.DUPLICATE] * 10
    _train(resumed, batches[10:])
    # ...and the rest lands exactly where the uninterrupted run did.
    assert resumed.step == reference.step == 6
    _assert_bitwise_equal(_state(resumed), _state(reference))


@pytest.mark.parametrize(
    "optimizer",
    [
        {"kind": "adam", "lr": 0.05, "amsgrad": True, "weight_decay": 0.01},
        {"kind": "adagrad", "lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
        {"kind": "rmsprop", "lr": 0.01, "momentum": 0.5, "centered": True},
    ],
)
def test_restore_mid_schedule_continues_bitwise_with_its_lr(
    tmp_path: Path, optimizer: dict[str, object]
) -> None:
    spec = parse_spec(
        SPEC
        | {
            "optimizer": optimizer,
            "accumulate_steps": 2,
            "schedule": {
                "kind": "sequential",
                "schedulers": [
                    {"kind": "linear", "start_factor": 0.1, "total_iters": 2},
                    {"kind": "cosine_annealing", "t_max": 4, "eta_min": 0.001},
                ],
                "milestones": [2],
            },
            "clip_grad": {"max_norm": 0.1},
        }
    )
    batches = _batches(17)
    reference = Trainer("m", spec, CPU)
    _train(reference, batches)

    first = Trainer("m", spec, CPU)
    _train(first, batches[:7])  # 3 steps (into the cosine), one batch pending
    ck.write(tmp_path / "m", ck.take(first), keep=2)
    _, snapshot, _ = ck.newest(tmp_path / "m")
    resumed = ck.restore(snapshot, TrainerFactory(CPU))
    assert resumed.lr == first.lr != spec.optimizer.lr
    _train(resumed, batches[7:])
    assert resumed.step == reference.step == 8
    assert resumed.lr == reference.lr
    _assert_bitwise_equal(_state(resumed), _state(reference))


def test_a_checkpoint_whose_schedule_state_does_not_fit_is_data_loss(tmp_path: Path) -> None:
    spec = parse_spec(SPEC | {"schedule": {"kind": "step", "step_size": 2}})
    first = Trainer("m", spec, CPU)
    _train(first, _batches(9))
    with pytest.raises(DataLoss, match="schedule state"):
        ck.restore(dataclasses.replace(ck.take(first), schedule=None), TrainerFactory(CPU))


def test_restore_without_optimizer_state_is_seen_to_differ(tmp_path: Path) -> None:
    """The comparison above can fail: dropping the momentum buffers changes the result."""
    batches = _batches(18)
    reference = Trainer("m", parse_spec(SPEC), CPU)
    _train(reference, batches)
    first = Trainer("m", parse_spec(SPEC), CPU)
    _train(first, batches[:9])
    snapshot = ck.take(first)
    amnesiac = dataclasses.replace(
        snapshot, tensors={k: v for k, v in snapshot.tensors.items() if not k.startswith("optim/")}
    )
    resumed = ck.restore(amnesiac, TrainerFactory(CPU))
    _train(resumed, batches[9:])
    assert resumed.step == reference.step
    ref, got = _state(reference), _state(resumed)
    assert any(not torch.equal(ref[k], got[k]) for k in ref if k.startswith("param/"))


def _pending_snapshot() -> ck.Snapshot:
    trainer = Trainer("m", parse_spec(SPEC), CPU)
    _train(trainer, _batches(4))  # one step and one batch pending: grad/ tensors are saved
    return ck.take(trainer)


def test_a_checkpoint_without_a_parameter_is_data_loss_naming_both_sets() -> None:
    snapshot = _pending_snapshot()
    names = sorted(k.removeprefix("param/") for k in snapshot.tensors if k.startswith("param/"))
    tensors = {k: v for k, v in snapshot.tensors.items() if k != f"param/{names[0]}"}
    with pytest.raises(DataLoss) as caught:
        ck.restore(dataclasses.replace(snapshot, tensors=tensors), TrainerFactory(CPU))
    assert f"it holds parameters {names[1:]}, the spec builds {names}" in str(caught.value)


@pytest.mark.parametrize("prefix", ["param/", "grad/"])
@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_a_checkpoint_tensor_that_does_not_fit_its_parameter_is_data_loss(
    prefix: str, change: str
) -> None:
    snapshot = _pending_snapshot()
    key = next(k for k in sorted(snapshot.tensors) if k.startswith(prefix))
    good = snapshot.tensors[key]
    bad = torch.zeros(good.shape[0] + 1, *good.shape[1:]) if change == "shape" else good.double()
    with pytest.raises(DataLoss) as caught:
        ck.restore(
            dataclasses.replace(snapshot, tensors=snapshot.tensors | {key: bad}),
            TrainerFactory(CPU),
        )
    assert (
        f"{key} is {bad.dtype} {list(bad.shape)}, the model has {good.dtype} {list(good.shape)}"
    ) in str(caught.value)


def test_training_a_restored_trainer_leaves_its_snapshot_as_it_was() -> None:
    """Clipping scales gradients and momentum updates its buffers in place: on copies only."""
    spec = parse_spec(SPEC | {"clip_grad": {"max_norm": 0.01}})
    first = Trainer("m", spec, CPU)
    _train(first, _batches(4))  # one step (momentum buffers) and one batch pending
    snapshot = ck.take(first)
    before = {k: v.clone() for k, v in snapshot.tensors.items()}
    assert {k.split("/")[0] for k in before} >= {"grad", "optim"}
    resumed = ck.restore(snapshot, TrainerFactory(CPU))
    _train(resumed, _batches(10)[4:])
    assert resumed.step == 3
    _assert_bitwise_equal(snapshot.tensors, before)


def test_restore_keeps_the_init_tensors_and_the_nonfinite_streak() -> None:
    seeded = Trainer("m", parse_spec(SPEC), CPU)
    given = {n: p.detach().numpy() * 2 for n, p in seeded.module.named_parameters()}
    spec = parse_spec(SPEC | {"init": {"kind": "tensors", "tensors": given}})
    first = Trainer("m", spec, CPU)
    _train(first, _batches(4))
    first.nonfinite_streak = 2
    resumed = ck.restore(ck.take(first), TrainerFactory(CPU))
    assert resumed.nonfinite_streak == 2
    assert resumed.spec.init.kind == "tensors" and resumed.spec.init.tensors.keys() == given.keys()
    for name, value in given.items():
        assert (resumed.spec.init.tensors[name] == value).all(), name
    _assert_bitwise_equal(_state(resumed), _state(first))


def test_a_checkpoint_whose_spec_no_longer_validates_is_data_loss_saying_so() -> None:
    snapshot = _pending_snapshot()
    spec = json.loads(json.dumps(snapshot.spec))
    spec["optimizer"]["lr"] = -1.0
    with pytest.raises(DataLoss) as caught:
        ck.restore(dataclasses.replace(snapshot, spec=spec), TrainerFactory(CPU))
    assert str(caught.value).startswith(
        "checkpoint of model 'm': its spec no longer validates: "
    ), caught.value


def test_restore_builds_with_the_factorys_settings_and_sets_the_rng() -> None:
    snapshot = _pending_snapshot()
    saved_rng = snapshot.tensors["rng/cpu"]
    torch.manual_seed(12345)  # anything but the saved state
    factory = TrainerFactory(
        CPU,
        max_nonfinite_steps=3,
        max_batch_rows=5,
        max_batch_bytes=600,
        max_activation_bytes=700,
        deferred=True,
    )
    resumed = ck.restore(snapshot, factory)
    assert torch.equal(torch.get_rng_state(), saved_rng)
    assert (resumed.name, resumed.max_nonfinite_steps) == ("m", 3)
    assert (
        resumed.kind
        is factory.step_kind(resumed.spec)
        is not TrainerFactory(CPU).step_kind(resumed.spec)
    )
    checker = resumed.checker
    assert (checker.max_rows, checker.max_bytes, checker.max_activation_bytes) == (5, 600, 700)


def test_a_copy_built_from_state_dict_keeps_the_frozen_parameters() -> None:
    """What a data-parallel rank builds from rank 0's state: the same frozen set."""
    names = [n for n, _ in Trainer("m", parse_spec(SPEC), CPU).module.named_parameters()]
    spec = parse_spec(SPEC | {"frozen": [names[0]]})
    first = Trainer("m", spec, CPU)
    _train(first, _batches(4))
    state = first.state_dict()
    assert state["frozen"] == [names[0]]
    copy = TrainerFactory(CPU).build("m", spec, state)
    assert {n: p.requires_grad for n, p in copy.module.named_parameters()} == {
        n: n != names[0] for n in names
    }


def test_a_snapshot_is_a_copy_the_trainer_goes_on_without() -> None:
    """take runs between jobs and is written later: training on must not change it."""
    first = Trainer("m", parse_spec(SPEC), CPU)
    _train(first, _batches(4))  # parameters, momentum buffers and pending gradients
    snapshot = ck.take(first)
    before = {k: v.clone() for k, v in snapshot.tensors.items()}
    _train(first, _batches(10)[4:])
    _assert_bitwise_equal(snapshot.tensors, before)


def _three_checkpoints(directory: Path) -> list[Path]:
    trainer = Trainer("m", parse_spec(SPEC), CPU)
    paths = []
    for chunk in range(3):
        _train(trainer, _batches(30)[chunk * 6 : chunk * 6 + 6])
        paths.append(directory / "m" / ck.write(directory / "m", ck.take(trainer), keep=5).name)
    return paths


@pytest.mark.parametrize("damage", ["truncated", "byte flipped", "meta flipped", "meta gone"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, damage: str
) -> None:
    paths = _three_checkpoints(tmp_path)
    tensors, meta = paths[-1] / ck.TENSORS, paths[-1] / ck.META
    if damage == "truncated":
        os.truncate(tensors, tensors.stat().st_size // 2)
    elif damage == "byte flipped":
        data = bytearray(tensors.read_bytes())
        data[-3] ^= 0x01
        tensors.write_bytes(bytes(data))
    elif damage == "meta flipped":
        text = meta.read_text()
        meta.write_text(text.replace('"step": 6', '"step": 7'))
        assert meta.read_text() != text
    else:
        meta.unlink()
    path, snapshot, skipped = ck.newest(tmp_path / "m")
    assert path == paths[1] and snapshot.step == 4
    assert [p for p, _ in skipped] == [paths[2]]
    reason = skipped[0][1]
    assert "ckpt-0000000003" in reason
    assert ("missing" if damage == "meta gone" else "checksum") in reason


def test_a_pickle_in_place_of_the_tensors_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    paths = _three_checkpoints(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit(), protocol=4)
    for path in paths:  # every checkpoint replaced, checksums made to match
        (path / ck.TENSORS).write_bytes(payload)
        meta = json.loads((path / ck.META).read_text())
        meta["tensors_sha256"] = __import__("hashlib").sha256(payload).hexdigest()
        (path / ck.META).write_text(json.dumps(meta))
    (tmp_path / "m" / "model.pt").write_bytes(payload)  # a stray pickle is never even opened
    with pytest.raises(DataLoss) as caught:
        ck.newest(tmp_path / "m")
    assert "pickle" in caught.value.message and "refused" in caught.value.message
    assert "model 'm' has no valid checkpoint" in caught.value.message
    assert not marker.exists()


def test_an_oversized_safetensors_header_is_refused_before_parsing(tmp_path: Path) -> None:
    paths = _three_checkpoints(tmp_path)
    data = (1 << 40).to_bytes(8, "little") + b"{" + b" " * 64
    (paths[-1] / ck.TENSORS).write_bytes(data)
    _, snapshot, skipped = ck.newest(tmp_path / "m")
    assert snapshot.step == 4
    assert "declares a 1099511627776-byte header" in skipped[0][1]
    assert "refused" in skipped[0][1]


def test_only_the_newest_k_are_kept_and_leftovers_go_at_the_next_start(tmp_path: Path) -> None:
    trainer = Trainer("m", parse_spec(SPEC), CPU)
    for _ in range(5):
        ck.write(tmp_path / "m", ck.take(trainer), keep=2)
    (tmp_path / "m" / ".tmp-0000000099-dead").mkdir()
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == [".tmp-0000000099-dead", "ckpt-0000000004", "ckpt-0000000005"]
    ck.newest(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "ckpt-0000000004",
        "ckpt-0000000005",
    ]


def test_writers_killed_before_their_prune_never_pile_up_beyond_keep_plus_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = Trainer("m", parse_spec(SPEC), CPU)
    real = ck._write_checkpoint

    def killed_after_rename(*args: object, **kwargs: object) -> Path:
        real(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # stands in for SIGKILL between the rename and the prune

    monkeypatch.setattr(ck, "_write_checkpoint", killed_after_rename)
    for _ in range(4):  # four writers in a row, each killed at the same moment
        with pytest.raises(KeyboardInterrupt):
            ck.write(tmp_path / "m", ck.take(trainer), keep=2)
        assert len(list((tmp_path / "m").iterdir())) <= 3


WIDE = {"architecture": {"kind": "linear", "in_features": 1000, "out_features": 100}}


def _checkpoint_bytes(tmp_path: Path, trainer: Trainer) -> int:
    path = tmp_path / "measure"
    saved = ck.write(path, ck.take(trainer), keep=1)
    return sum(f.stat().st_size for f in (path / saved.name).iterdir())


def test_a_disk_with_room_for_keep_checkpoints_still_takes_the_next(
    tmp_path: Path, small_volume: SmallVolume
) -> None:
    trainer = Trainer("m", parse_spec(WIDE), CPU)
    size = _checkpoint_bytes(tmp_path, trainer)
    volume = small_volume(int(2.5 * size))  # keep=2 fit, a third does not
    for _ in range(5):
        ck.write(volume / "m", ck.take(trainer), keep=2)
    assert sorted(p.name for p in (volume / "m").iterdir()) == [
        "ckpt-0000000004",
        "ckpt-0000000005",
    ]


def test_a_full_disk_fails_the_write_keeps_the_last_good_one_and_leaves_no_temp_dir(
    tmp_path: Path, small_volume: SmallVolume
) -> None:
    trainer = Trainer("m", parse_spec(WIDE), CPU)
    size = _checkpoint_bytes(tmp_path, trainer)
    volume = small_volume(int(1.5 * size))
    ck.write(volume / "m", ck.take(trainer), keep=1)
    with pytest.raises(OSError) as caught:
        ck.write(volume / "m", ck.take(trainer), keep=1)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (volume / "m").iterdir()) == ["ckpt-0000000001"]
    ck.read(volume / "m" / "ckpt-0000000001")


def test_requested_checkpoints_never_push_out_the_servers_own(tmp_path: Path) -> None:
    trainer = Trainer("m", parse_spec(SPEC), CPU)
    ck.write(tmp_path / "m", ck.take(trainer), keep=2)
    ck.write(tmp_path / "m", ck.take(trainer), keep=2)
    for _ in range(4):
        ck.write(tmp_path / "m", ck.take(trainer), keep=2, requested=True)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "ckpt-0000000001",
        "ckpt-0000000002",
        "ckpt-0000000005-requested",
        "ckpt-0000000006-requested",
    ]
    assert ck.newest(tmp_path / "m")[0].name == "ckpt-0000000006-requested"


def test_an_unwritable_directory_is_found_before_serving(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        ck.check_directory(blocker / "checkpoints")
    ck.check_directory(tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []


def test_the_durable_sequence_is_the_producers_mark_in_the_newest_checkpoint(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        trainer = Trainer("m", parse_spec(SPEC), CPU)
        worker = ModelWorker(trainer)
        checkpointer = ck.Checkpointer(tmp_path, Metrics(CollectorRegistry()))
        try:
            assert checkpointer.durable_sequence("m", "p") == 0
            _train(trainer, _batches(3))
            await checkpointer.save(worker)
            _train(trainer, _batches(5)[3:])  # applied, not yet durable
            assert trainer.producers == {"p": 5}
            assert checkpointer.durable_sequence("m", "p") == 3
            assert checkpointer.durable_sequence("m", "q") == 0
            assert checkpointer.durable_sequence("n", "p") == 0
        finally:
            worker.close()

    asyncio.run(main())

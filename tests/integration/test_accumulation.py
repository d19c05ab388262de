"""Gradient accumulation against non-finite losses, through the real service.

docs/semantics.md promises that a batch whose loss is not finite adds nothing to the
gradients already accumulated: the window goes on as if that batch had never been sent.
"""

from __future__ import annotations

import numpy as np
import pytest

from gradstream.client import Client

SPEC = {
    "architecture": {"kind": "mlp", "in_features": 2, "hidden": [3], "out_features": 1},
    "init": {"kind": "seed", "seed": 11},
    "optimizer": {"kind": "sgd", "lr": 0.05, "momentum": 0.9},
    "accumulate_steps": 3,
}


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(4, 1)).astype(np.float32)


# Finite inputs whose forward pass overflows float32, so the loss is inf: only overflow
# can make a checked batch's loss non-finite.
BAD = (np.full((4, 2), 3e38, np.float32), np.ones((4, 1), np.float32))


def _state(client: Client, name: str) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in client.parameters(name, gradients=True).items()}


@pytest.mark.parametrize("bad_at", [0, 1, 2])
def test_a_nonfinite_loss_mid_window_adds_nothing_to_the_pending_gradients(
    client: Client, name: str, bad_at: int
) -> None:
    good = [_batch(seed) for seed in range(6)]  # two full windows of 3
    reference, poisoned = f"{name}-ref", f"{name}-bad"
    client.create_model(reference, SPEC)
    client.create_model(poisoned, SPEC)

    # The reference sees only the good batches; after each of the first window's batches
    # its parameters and pending gradients are recorded.
    expected = []
    for batch in good[:3]:
        list(client.train(reference, [batch]))
        expected.append(_state(client, reference))

    outcomes = []
    for i, batch in enumerate(good[:3]):
        if i == bad_at:
            (skipped,) = client.train(poisoned, [BAD], skip_rejected=True)
            assert skipped.outcome == "SKIPPED_NONFINITE", skipped
            assert skipped.reason == "loss is not finite"
            assert skipped.step == 0
            # The gradients pending before the bad batch are there, bit for bit.
            if i > 0:
                assert _state(client, poisoned) == expected[i - 1]
        (result,) = client.train(poisoned, [batch])
        outcomes.append(result.outcome)
        assert _state(client, poisoned) == expected[i]
    assert outcomes == ["ACCUMULATED", "ACCUMULATED", "APPLIED"]
    assert client.get_model(poisoned).pending_batches == 0

    # The next window: the skipped batch left momentum and the step count as they were.
    list(client.train(reference, good[3:]))
    list(client.train(poisoned, good[3:]))
    assert _state(client, poisoned) == _state(client, reference)
    assert client.get_model(poisoned).step == client.get_model(reference).step == 2

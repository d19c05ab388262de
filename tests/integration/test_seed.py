"""The seed notebook's experiments, reproduced through the service (float32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradstream.client import Client

SEED = {
    "architecture": {"kind": "linear", "in_features": 1, "out_features": 1, "bias": False},
    "init": {"kind": "zeros"},
    "loss": {"kind": "mse", "reduction": "mean"},
    "optimizer": {"kind": "sgd", "lr": 0.01},
}


def _step(client: Client, name: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    (result,) = client.train(name, [(x, y)])
    assert result.outcome == "APPLIED"
    assert result.loss is not None
    return result.loss, float(client.parameters(name)["weight"].item())


def test_linear_regression_trajectory_matches_notebook_and_plain_pytorch(
    client: Client, name: str
) -> None:
    x = np.array([1, 2, 3, 4], dtype=np.float32)
    y = np.array([2, 4, 6, 8], dtype=np.float32)
    client.create_model(name, SEED)

    # The notebook's own loop: w * x, ((y_hat - y) ** 2).mean(), manual SGD.
    w = torch.tensor(0.0, dtype=torch.float32, requires_grad=True)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    expected: list[tuple[float, float]] = []
    for _ in range(100):
        loss = ((w * xt - yt) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            w -= 0.01 * w.grad  # type: ignore[operator]
        assert w.grad is not None
        w.grad.zero_()
        expected.append((loss.item(), w.item()))

    got = [_step(client, name, x, y) for _ in range(100)]
    assert [f"{w:.3f}" for _, w in got[:3]] == ["0.300", "0.555", "0.772"]
    assert [f"{loss:.8f}" for loss, _ in got[:3]] == ["30.00000000", "21.67499924", "15.66018772"]
    assert f"{got[24][1]:.3f}" == "1.966"
    # Linear(1, 1) on a column computes the same products and means as w * x.
    assert got == expected
    f5 = client.predict(name, np.array([[5.0]], dtype=np.float32)).item()
    assert f5 == np.float32(expected[-1][1]) * np.float32(5.0)
    assert f"{f5:.3f}" == "10.000"


def test_sgd_on_one_point_gives_the_notebooks_losses_gradients_and_weights(
    client: Client, name: str
) -> None:
    spec = {
        **SEED,
        "init": {"kind": "tensors", "tensors": {"weight": [[1.0]]}},
        "optimizer": {"kind": "sgd", "lr": 0.05},
    }
    client.create_model(name, spec)
    x, y = np.array([[1.0]], np.float32), np.array([[2.0]], np.float32)
    losses, grads, weights = [], [], []
    for _ in range(4):
        (result,) = client.train(name, [(x, y)])
        values = client.parameters(name, gradients=True)
        losses.append(result.loss)
        grads.append(values["weight.grad"].item())
        weights.append(values["weight"].item())
    assert losses == pytest.approx([1.0, 0.81, 0.6561, 0.5314], abs=1e-4)
    assert grads == pytest.approx([-2.0, -1.8, -1.62, -1.458], abs=1e-4)
    assert weights == pytest.approx([1.1, 1.19, 1.271, 1.3439], abs=1e-4)
    # Bitwise what the plain loop gives with the same loss function (the notebook's
    # (y_hat - y) ** 2 rounds its fourth weight one ulp differently from mse_loss).
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    plain = []
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        optimizer.step()
        plain.append(model.weight.item())
    assert weights == plain


@pytest.mark.parametrize(("accumulate", "expected"), [(3, [3.0, 6.0, 9.0]), (1, [3.0, 3.0, 3.0])])
def test_gradients_accumulate_only_with_accumulate_steps(
    client: Client, name: str, accumulate: int, expected: list[float]
) -> None:
    # The notebook's (weights * 3).sum() with weights = ones(4): an L1 loss far below
    # the target has gradient +x, so x = 3 gives dloss/dw = 3 for every weight.
    spec = {
        "architecture": {"kind": "linear", "in_features": 4, "out_features": 1, "bias": False},
        "init": {"kind": "tensors", "tensors": {"weight": np.ones((1, 4))}},
        "loss": {"kind": "l1"},
        "optimizer": {"kind": "sgd", "lr": 0.01},
        "accumulate_steps": accumulate,
    }
    client.create_model(name, spec)
    x = np.full((1, 4), 3.0, np.float32)
    y = np.array([[-1000.0]], np.float32)
    seen, outcomes = [], []
    for _ in range(3):
        (result,) = client.train(name, [(x, y)])
        outcomes.append(result.outcome)
        grad = client.parameters(name, gradients=True)["weight.grad"]
        assert np.all(grad == grad.flat[0])
        seen.append(float(grad.flat[0]))
    assert seen == expected
    if accumulate == 3:
        assert outcomes == ["ACCUMULATED", "ACCUMULATED", "APPLIED"]
        assert client.get_model(name).step == 1
    else:
        assert outcomes == ["APPLIED"] * 3
        assert client.get_model(name).step == 3

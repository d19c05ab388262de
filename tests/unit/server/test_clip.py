"""Clipping by value reports the gradients' 2-norm from before the clip."""

from __future__ import annotations

import torch

from gradstream.server.optim import gradient_clip
from gradstream.server.spec import ClipGradSpec


def test_clip_by_value_returns_the_2_norm_before_clipping() -> None:
    params = [torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)]
    params[0].grad = torch.tensor([3.0, -4.0])
    params[1].grad = torch.tensor([12.0])
    unused = torch.zeros(1, requires_grad=True)  # no gradient: left out of the norm
    clip = gradient_clip(ClipGradSpec(value=1.0))
    assert clip is not None
    norm = clip([*params, unused])
    assert norm.item() == 13.0
    assert params[0].grad.tolist() == [1.0, -1.0] and params[1].grad.tolist() == [1.0]

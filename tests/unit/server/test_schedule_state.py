"""A schedule's saved progress is refused, naming why, when it does not fit the spec's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradstream.server.optim import build_schedule, load_schedule_state, schedule_state
from gradstream.server.spec import parse_spec

LINEAR = {"kind": "linear", "in_features": 3, "out_features": 2}
SEQUENTIAL: dict[str, object] = {
    "kind": "sequential",
    "schedulers": [{"kind": "linear"}, {"kind": "exponential", "gamma": 0.5}],
    "milestones": [2],
}


def _schedule(schedule: dict[str, object]) -> torch.optim.lr_scheduler.LRScheduler:
    spec = parse_spec({"architecture": LINEAR, "schedule": schedule})
    optimizer = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)
    built = build_schedule(spec.schedule, optimizer)
    assert built is not None
    return built


def test_a_saved_state_for_another_number_of_schedulers_is_refused() -> None:
    saved = schedule_state(_schedule({"kind": "exponential", "gamma": 0.5}))
    with pytest.raises(ValueError) as caught:
        load_schedule_state(_schedule(SEQUENTIAL), saved)
    assert str(caught.value) == "1 saved schedulers, the spec builds 3"


def test_an_unknown_key_in_a_saved_state_is_refused() -> None:
    schedule = _schedule({"kind": "exponential", "gamma": 0.5})
    saved = schedule_state(schedule)
    saved[0]["optimizer"] = "not progress"
    with pytest.raises(ValueError) as caught:
        load_schedule_state(schedule, saved)
    assert str(caught.value) == "unknown schedule state ['optimizer']"

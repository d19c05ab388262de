"""benchmarks/cuda_graph.py, the parts that run without CUDA: batches, the eager step,
the parameter comparison, the summaries and the report (tests/cuda runs the graph)."""

from __future__ import annotations

import math
from pathlib import Path

import cuda_graph as cg
import pytest
import torch
from torch import nn

from gradstream.bench.scenarios import SCENARIOS, scenario

CPU = torch.device("cpu")


def test_batches_are_the_bench_scenarios_on_the_device() -> None:
    for name, rows, features in (("small", 4, 1), ("medium", 256, 64)):
        chosen = SCENARIOS[name]
        batches = cg.device_batches(chosen, CPU)
        assert len(batches) == chosen.distinct_batches
        for (x, y), (want_x, want_y) in zip(batches, chosen.batches(), strict=True):
            assert x.shape == (rows, features) and y.shape == (rows, 1)
            assert torch.equal(x, torch.from_numpy(want_x))
            assert torch.equal(y, torch.from_numpy(want_y))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_eager_step_trains_bitwise_like_the_textbook_loop(optimizer: str) -> None:
    chosen = scenario("medium", optimizer)
    batches = cg.device_batches(chosen, CPU)
    model, opt = cg.build(chosen, CPU)
    cg.train(cg.eager_step(model, opt), batches, 0, 20)

    torch.manual_seed(0)
    ref = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    ref_opt: torch.optim.Optimizer = (
        torch.optim.Adam(ref.parameters(), lr=0.001)
        if optimizer == "adam"
        else torch.optim.SGD(ref.parameters(), lr=0.001)
    )
    for i in range(20):
        x, y = batches[i % len(batches)]
        ref_opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(ref(x), y)
        loss.backward()
        ref_opt.step()
    got, want = cg.parameters(model), cg.parameters(ref)
    assert cg.compare(got, want) == {"bitwise": True, "max_abs_diff": 0.0, "within_tolerance": True}
    # It trained: the weights moved from the shared initial ones.
    _, fresh = cg.build(chosen, CPU)
    assert not cg.compare(got, [p.detach() for p in fresh.param_groups[0]["params"]])["bitwise"]


def test_compare_reports_the_largest_difference_and_the_tolerance() -> None:
    a = [torch.zeros(3), torch.ones(2, 2)]
    near = [a[0].clone(), a[1].clone()]
    near[1][1, 0] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    r = cg.compare(near, a)
    assert r["bitwise"] is False and r["within_tolerance"] is True
    assert r["max_abs_diff"] == pytest.approx(2.0**-23)
    far = [a[0].clone(), a[1].clone()]
    far[0][2] = 1e-3
    far[1][0, 1] = 1.0 - 1e-4
    r = cg.compare(far, a)
    assert r["bitwise"] is False and r["within_tolerance"] is False
    assert math.isclose(r["max_abs_diff"], 1e-3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="1 tensors compared with 2"):
        cg.compare(a[:1], a)


def test_summary_is_the_lower_median_and_the_lowest_round() -> None:
    assert cg.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "lowest": 1.0, "rounds": [3.0, 1.0, 2.0]}
    assert cg.summary([4.0, 1.0, 3.0, 2.0])["median"] == 2.0
    rates = {"graph": [4.0, 3.0, 9.0], "eager": [2.0, 3.0, 3.0]}
    assert cg.ratio(rates, "graph", "eager") == {
        "median": 2.0,
        "lowest": 1.0,
        "rounds": [2.0, 1.0, 3.0],
    }


def test_measure_without_cuda_times_eager_alone_and_reports_it() -> None:
    result = cg.measure("small", "sgd", CPU, steps=8, seconds=0.02, rounds=3, compile_step=False)
    assert result["shape"] == "4 x 1" and result["steps"] == 8
    assert list(result["rates"]) == ["eager"]
    rounds = result["rates"]["eager"]["rounds"]
    assert len(rounds) == 3 and all(r > 0 for r in rounds)
    assert result["ratios"] == {} and result["parity"] == {} and result["errors"] == {}
    assert result["compiled"] == {} and result["lr"] == 0.01
    lines = cg.report(result)
    assert len(lines) == 1 and lines[0].startswith("small sgd (4 x 1): steps/s eager ")


def test_report_prints_ratios_parity_and_why_a_contender_did_not_run() -> None:
    rates = {"eager": [100.0, 110.0, 90.0], "graph": [200.0, 330.0, 135.0]}
    result = {
        "scenario": "medium",
        "optimizer": "adam",
        "shape": "256 x 64",
        "steps": 64,
        "lr": 0.001,
        "rates": {c: cg.summary(r) for c, r in rates.items()},
        "ratios": {"graph_vs_eager": cg.ratio(rates, "graph", "eager")},
        "parity": {
            "graph_vs_eager": {"bitwise": False, "max_abs_diff": 3e-8, "within_tolerance": True},
            "graph_vs_eager_capturable": {
                "bitwise": True,
                "max_abs_diff": 0.0,
                "within_tolerance": True,
            },
            "compiled_vs_eager": {
                "bitwise": False,
                "max_abs_diff": 6e-4,
                "within_tolerance": False,
            },
        },
        "compiled": {"graph_breaks": 4, "cudagraph_skips": 0},
        "errors": {"compiled": "RuntimeError: no"},
    }
    head = "medium adam (256 x 64): "
    assert cg.report(result) == [
        head + "steps/s eager 100 (90-110), graph 200 (135-330)",
        head + "graph/eager 2.00x (lowest 1.50x)",
        head + "after 64 steps: graph vs eager max abs diff 3e-08 = 3e-05 lr (within rtol "
        "1.3e-06 atol 1e-05); graph vs eager_capturable bitwise; compiled vs eager max abs diff "
        "0.0006 = 0.6 lr (OUTSIDE rtol 1.3e-06 atol 1e-05)",
        head + "compiled: 4 graph breaks, 0 graphs run without a CUDA graph",
        head + "compiled not run: RuntimeError: no",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA-absent path")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cg.main(["--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"cuda_graph: CUDA is absent (torch {torch.__version__}): nothing measured"
    ]
    assert not (tmp_path / "out.json").exists()


def test_bad_arguments_name_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cg.main(["large"])
    assert exit_.value.code == 2
    assert "scenario 'large': choose from small, medium" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cg.main(["--steps", "3"])
    assert "--steps 3: must exceed the 3 warm-up steps" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_step_trains_the_same_model_within_tolerance_on_the_cpu() -> None:
    # reduce-overhead records no CUDA graph on a CPU, but the step compiles and trains the same.
    chosen = scenario("small", "sgd")
    batches = cg.device_batches(chosen, CPU)
    trained = cg.train_all(chosen, CPU, batches, 8, compile_step=True)
    assert trained.errors == {}
    assert list(trained.steps) == ["eager", "compiled"]
    parity = cg.parity(trained)
    assert list(parity) == ["compiled_vs_eager"]
    assert parity["compiled_vs_eager"]["within_tolerance"], parity
    assert trained.compiled["graph_breaks"] > 0  # zero_grad and backward are not traced
    assert trained.compiled["cudagraph_skips"] > 0

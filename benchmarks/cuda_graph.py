"""The training step captured whole in a CUDA graph, against the eager step, on fixed shapes.

    python3 benchmarks/cuda_graph.py [small medium] [--optimizer sgd adam] [--compile] [--json OUT]

For each scenario (the bench's batch shapes and models) and optimizer, the same model from
the same initial weights trains on the same batches, already on the device, three ways:

- ``eager``: the plain PyTorch loop: zero_grad, forward, loss, backward, optimizer.step;
- ``graph``: that step captured whole in one ``torch.cuda.CUDAGraph``, following PyTorch's
  whole-network capture recipe: static input and target tensors, three warm-up steps on a
  side stream, ``torch.cuda.graph``; Adam is built with ``capturable=True`` (SGD has no
  such option: its update keeps no host-side state and captures as it is). Each step
  copies its batch into the static tensors and replays the graph;
- ``compiled`` (with ``--compile``): the eager step under
  ``torch.compile(mode="reduce-overhead")``, which records CUDA graphs of what it compiles.

Printed per scenario and optimizer: steps/s of each (median round and the range), the
ratios graph/eager and compiled/eager (median of the per-round ratios and the lowest
round), and whether the parameters after ``--steps`` steps equal eager's bit for bit; if
not, the largest absolute difference (also divided by lr, Adam's step size) and whether
it is within ``TOLERANCE``. Adam is also compared with an eager Adam built with
``capturable=True``, which does the same arithmetic as the captured one: that separates
what capturing changes from what the capturable formula changes. Nothing syncs inside a
timed round; each round ends with a synchronize.

Without CUDA it prints one line saying so and exits 0 (``benchmarks/gpu.sh`` goes on).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradstream.bench.loop import build as build_module
from gradstream.bench.scenarios import OPTIMIZERS, Scenario, scenario

Step = Callable[[Tensor, Tensor], None]
Batches = Sequence[tuple[Tensor, Tensor]]

# torch.testing.assert_close's documented defaults for float32.
TOLERANCE = {"rtol": 1.3e-6, "atol": 1e-5}
# The warm-up steps of PyTorch's whole-network capture example, before capturing.
WARMUP_STEPS = 3
SCENARIO_NAMES = ("small", "medium")
CONTENDERS = ("eager", "graph", "compiled")


def build(
    chosen: Scenario, device: torch.device, *, capturable: bool = False, seed: int = 0
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The scenario's model, the same initial weights for every ``seed``, and its optimizer."""
    torch.manual_seed(seed)  # the weights are drawn on the CPU, then moved: same on any device
    model = build_module(chosen.spec, chosen.features).to(device)
    spec = chosen.spec["optimizer"]
    lr = float(spec["lr"])
    if spec["kind"] == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=lr, capturable=capturable)
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def device_batches(chosen: Scenario, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The scenario's batches (the data every bench contender trains on), on ``device``."""
    return [
        (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        for x, y in chosen.batches()
    ]


def eager_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    """One training step as the plain PyTorch loop writes it."""

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    return step


def graph_step(model: nn.Module, optimizer: torch.optim.Optimizer, warmup: Batches) -> Step:
    """The eager step captured whole in one CUDA graph; trains on ``warmup`` first.

    The warm-up steps are real steps (they update the model), so the caller starts its own
    batches after them.
    """
    static_x = torch.empty_like(warmup[0][0])
    static_y = torch.empty_like(warmup[0][1])
    # Capture needs the lazily made state (optimizer buffers, BLAS handles and workspaces,
    # which are per stream) to exist: made on the side stream that then captures.
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in warmup:
            static_x.copy_(x)
            static_y.copy_(y)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(static_x), static_y).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # Gradients made inside the capture live in the graph's pool; each replay rewrites them.
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph, stream=side):
        nn.functional.mse_loss(model(static_x), static_y).backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def step(x: Tensor, y: Tensor) -> None:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    return step


def compiled_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Step:
    """The eager step under ``torch.compile(mode="reduce-overhead")``."""
    compiled = torch.compile(eager_step(model, optimizer), mode="reduce-overhead")

    def step(x: Tensor, y: Tensor) -> None:
        # One training iteration per call: lets the CUDA-graph trees reuse their memory.
        torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        compiled(x, y)

    return step


def train(step: Step, batches: Batches, start: int, stop: int) -> None:
    """Steps ``start`` to ``stop`` - 1 of the sequence that cycles through ``batches``."""
    for i in range(start, stop):
        x, y = batches[i % len(batches)]
        step(x, y)


def steps_per_s(step: Step, batches: Batches, seconds: float, sync: Callable[[], None]) -> float:
    """Steps for at least ``seconds``; the rate counts until the device has finished them."""
    sync()
    steps = 0
    start = time.perf_counter()
    while True:
        x, y = batches[steps % len(batches)]
        step(x, y)
        steps += 1
        if time.perf_counter() - start >= seconds:
            break
    sync()
    return steps / (time.perf_counter() - start)


def time_rounds(
    steps: dict[str, Step],
    batches: Batches,
    seconds: float,
    rounds: int,
    sync: Callable[[], None],
) -> dict[str, list[float]]:
    """Steps/s of every contender per round, the contenders taking turns within a round."""
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            rates[name].append(steps_per_s(step, batches, seconds, sync))
    return rates


def summary(values: Sequence[float]) -> dict[str, Any]:
    """The median (the lower middle of an even count), the lowest, and every value."""
    return {"median": statistics.median_low(values), "lowest": min(values), "rounds": list(values)}


def ratio(rates: dict[str, list[float]], over: str, under: str) -> dict[str, Any]:
    """``over``/``under`` per round, summarized."""
    return summary([a / b for a, b in zip(rates[over], rates[under], strict=True)])


def compare(got: Sequence[Tensor], want: Sequence[Tensor]) -> dict[str, Any]:
    """Bitwise equality, the largest absolute difference, and whether it is within TOLERANCE."""
    if len(got) != len(want):
        raise ValueError(f"{len(got)} tensors compared with {len(want)}")
    bitwise = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    diff = max(
        (float((a.double() - b.double()).abs().max()) for a, b in zip(got, want, strict=True)),
        default=0.0,
    )
    close = all(
        bool(torch.isclose(a, b, rtol=TOLERANCE["rtol"], atol=TOLERANCE["atol"]).all())
        for a, b in zip(got, want, strict=True)
    )
    return {"bitwise": bitwise, "max_abs_diff": diff, "within_tolerance": close}


def parameters(model: nn.Module) -> list[Tensor]:
    """The model's parameters, detached copies on the host."""
    return [p.detach().cpu().clone() for p in model.parameters()]


@dataclass
class Trained:
    """The contenders after the parity steps: their steps (to time) and their parameters."""

    steps: dict[str, Step] = field(default_factory=dict)
    parameters: dict[str, list[Tensor]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    compiled: dict[str, int] = field(default_factory=dict)


def train_all(
    chosen: Scenario, device: torch.device, batches: Batches, count: int, compile_step: bool
) -> Trained:
    """Every contender from the same weights over the same ``count`` steps.

    ``eager`` and ``compiled`` run on any device; ``graph`` and the eager capturable Adam
    (``eager_capturable``) only on CUDA. A contender that cannot be built or run has its
    error instead of parameters.
    """
    from torch._dynamo.utils import counters  # torch.compile's own tallies

    out = Trained()
    adam = chosen.spec["optimizer"]["kind"] == "adam"
    makers: dict[str, Callable[[], tuple[Step, nn.Module, int]]] = {}

    def eager(capturable: bool) -> tuple[Step, nn.Module, int]:
        model, optimizer = build(chosen, device, capturable=capturable)
        return eager_step(model, optimizer), model, 0

    def graph() -> tuple[Step, nn.Module, int]:
        model, optimizer = build(chosen, device, capturable=adam)
        warmup = [batches[i % len(batches)] for i in range(WARMUP_STEPS)]
        return graph_step(model, optimizer, warmup), model, WARMUP_STEPS

    def compiled() -> tuple[Step, nn.Module, int]:
        # The plain optimizer: compiling the step is the whole change.
        model, optimizer = build(chosen, device)
        torch.compiler.reset()
        counters.clear()  # so they count this contender's compilation alone
        return compiled_step(model, optimizer), model, 0

    makers["eager"] = lambda: eager(False)
    if device.type == "cuda":
        makers["graph"] = graph
        if adam:
            makers["eager_capturable"] = lambda: eager(True)
    if compile_step:
        makers["compiled"] = compiled
    for name, make in makers.items():
        try:
            step, model, done = make()
            train(step, batches, done, count)
        except Exception as error:  # a path this torch or device cannot take: say why
            out.errors[name] = f"{type(error).__name__}: {error}"[:600]
            continue
        if name in CONTENDERS:
            out.steps[name] = step
        out.parameters[name] = parameters(model)
    if "compiled" in out.steps:
        out.compiled = {
            "graph_breaks": sum(counters["graph_break"].values()),
            # Graphs reduce-overhead ran without recording a CUDA graph (always so on a CPU).
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        }
    return out


def parity(trained: Trained) -> dict[str, Any]:
    """Each contender's parameters against eager's (and graph's against capturable Adam's)."""
    params = trained.parameters
    pairs = [("graph", "eager"), ("graph", "eager_capturable"), ("compiled", "eager")]
    return {
        f"{a}_vs_{b}": compare(params[a], params[b])
        for a, b in pairs
        if a in params and b in params
    }


def measure(
    name: str,
    optimizer: str,
    device: torch.device,
    *,
    steps: int,
    seconds: float,
    rounds: int,
    compile_step: bool,
) -> dict[str, Any]:
    """One scenario and optimizer: parity after ``steps`` steps, then the timed rounds."""
    chosen = scenario(name, optimizer)
    batches = device_batches(chosen, device)
    trained = train_all(chosen, device, batches, steps, compile_step)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rates = time_rounds(trained.steps, batches, seconds, rounds, sync)
    result: dict[str, Any] = {
        "scenario": name,
        "optimizer": optimizer,
        "shape": f"{chosen.rows} x {chosen.features}",
        "model": chosen.notes,
        "steps": steps,
        "rates": {c: summary(r) for c, r in rates.items()},
        "ratios": {
            f"{c}_vs_eager": ratio(rates, c, "eager")
            for c in ("graph", "compiled")
            if c in rates and "eager" in rates
        },
        "lr": float(chosen.spec["optimizer"]["lr"]),
        "parity": parity(trained),
        "errors": trained.errors,
        "compiled": trained.compiled,
    }
    return result


def _parity_text(label: str, r: dict[str, Any], lr: float) -> str:
    if r["bitwise"]:
        return f"{label} bitwise"
    within = "within" if r["within_tolerance"] else "OUTSIDE"
    return (
        f"{label} max abs diff {r['max_abs_diff']:.3g} = {r['max_abs_diff'] / lr:.3g} lr "
        f"({within} rtol {TOLERANCE['rtol']:g} atol {TOLERANCE['atol']:g})"
    )


def report(result: dict[str, Any]) -> list[str]:
    """The lines printed for one ``measure`` result."""
    head = f"{result['scenario']} {result['optimizer']} ({result['shape']})"
    rates = ", ".join(
        f"{c} {r['median']:,.0f} ({min(r['rounds']):,.0f}-{max(r['rounds']):,.0f})"
        for c, r in result["rates"].items()
    )
    lines = [f"{head}: steps/s {rates}"]
    ratios = [
        f"{key.replace('_vs_', '/')} {r['median']:.2f}x (lowest {r['lowest']:.2f}x)"
        for key, r in result["ratios"].items()
    ]
    if ratios:
        lines.append(f"{head}: {', '.join(ratios)}")
    checks = [
        _parity_text(key.replace("_vs_", " vs "), r, result["lr"])
        for key, r in result["parity"].items()
    ]
    if checks:
        lines.append(f"{head}: after {result['steps']} steps: {'; '.join(checks)}")
    if result["compiled"]:
        compiled = result["compiled"]
        lines.append(
            f"{head}: compiled: {compiled['graph_breaks']} graph breaks, "
            f"{compiled['cudagraph_skips']} graphs run without a CUDA graph"
        )
    lines.extend(f"{head}: {c} not run: {e}" for c, e in result["errors"].items())
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "scenarios", nargs="*", help=f"of {', '.join(SCENARIO_NAMES)} (default all)"
    )
    parser.add_argument("--optimizer", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=64, help="steps before parameters compare")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of a timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compile", action="store_true", help='also torch.compile(mode="reduce-overhead")'
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenarios) - set(SCENARIO_NAMES))
    if unknown:
        parser.error(f"scenario {unknown[0]!r}: choose from {', '.join(SCENARIO_NAMES)}")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps {args.steps}: must exceed the {WARMUP_STEPS} warm-up steps")
    if not torch.cuda.is_available():
        print(f"cuda_graph: CUDA is absent (torch {torch.__version__}): nothing measured")
        return 0
    device = torch.device("cuda")
    head = (
        f"cuda_graph: {torch.cuda.get_device_name(device)}, torch {torch.__version__}; "
        f"{args.rounds} rounds of {args.seconds:g} s; steps/s median (range)"
    )
    print(head, flush=True)
    results = []
    for name in args.scenarios or SCENARIO_NAMES:
        for optimizer in args.optimizer:
            result = measure(
                name,
                optimizer,
                device,
                steps=args.steps,
                seconds=args.seconds,
                rounds=args.rounds,
                compile_step=args.compile,
            )
            results.append(result)
            print("\n".join(report(result)), flush=True)
            if args.json:  # after each result: a run stopped by a time limit keeps what it did
                args.json.write_text(json.dumps({"machine": head, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

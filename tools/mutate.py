"""`make mutate`: mutmut over the training and admission core, then the score.

The tool's settings are pyproject.toml's ``[tool.mutmut]``; this script adds what mutmut
cannot be told there: the functions in scope (mutant name patterns) and the score over
them. It runs mutmut in ``.mutate/``, where ``src`` links to ``server/``, so a mutant's
module name is its import name (``gradstream.server.engine``). See docs/testing.md.

    python -m tools.mutate              # run the whole scope, print the score
    python -m tools.mutate --score      # print the score of the last run
    python -m tools.mutate engine.*     # run only these patterns (under gradstream.server.)
"""

from __future__ import annotations

import argparse
import collections
import difflib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutate"
MUTANTS = WORK / "mutants"

# mutmut's mangled names: module.x_function or module.xǁClassǁmethod, then __mutmut_N.
_C = "\u01c1"  # mutmut's class separator


def _method(cls: str, name: str) -> str:
    return f"x{_C}{cls}{_C}{name}__mutmut_*"


def _function(name: str) -> str:
    return f"x_{name}__mutmut_*"


# What the brief calls the numeric and admission core, by module.
SCOPE: dict[str, list[str]] = {
    # The step pipeline (the deferred path too: tests force it on the CPU), exactly-once
    # admission, state capture. Left out: stage (pinned memory, CUDA only) and the RPC
    # helpers around the step (predict, gradients, parameters, update, info).
    "engine": [
        _function("step_kind"),
        _function("_plain_sgd"),
        _method("LocalGradients", "accumulate"),
        _method("TrainerFactory", "build"),
        _method("Trainer", "__init__"),
        _method("Trainer", "train_batches"),
        _method("Trainer", "_is_duplicate"),
        _method("Trainer", "_check_diverged"),
        _method("Trainer", "_admit"),
        _method("Trainer", "train"),
        _method("Trainer", "apply"),
        _method("Trainer", "_plain_sgd_step"),
        _method("Trainer", "_train_deferred"),
        _method("Trainer", "_fused_step"),
        _method("Trainer", "_resolve"),
        _method("Trainer", "_skipped"),
        _method("Trainer", "_mark"),
        _method("Trainer", "_gradients_nonfinite"),
        _method("Trainer", "state_dict"),
        _method("Trainer", "load_state_dict"),
    ],
    "batches": ["*"],
    "session": [
        _function("checked"),
        _function("decode"),
        _function("decode_message"),
        _function("_block"),
        _function("train_message"),
    ],
    "spec": ["*"],
    "optim": ["*"],
    # Checkpoint state capture and restore, and the durable sequence a producer resumes from.
    "checkpoint": [
        _function("take"),
        _function("_cpu_copy"),
        _function("restore"),
        _method("Checkpointer", "durable_sequence"),
    ],
}

KILLED = {1, 3}  # mutmut's exit codes for a mutant the tests failed on
STATUS = {0: "survived", 33: "no tests", 5: "no tests", None: "not run", 36: "timeout"}


def patterns(only: list[str] | None = None) -> list[str]:
    """The mutant name patterns in scope (``only``: module-relative patterns instead)."""
    if only:
        return [f"gradstream.server.{p}" for p in only]
    return [f"gradstream.server.{m}.{p}" for m, ps in SCOPE.items() for p in ps]


def prepare() -> None:
    """.mutate/ with links to the sources, tests, docs and pyproject.toml."""
    WORK.mkdir(exist_ok=True)
    for name, target in [
        ("src", "../server"),
        ("tests", "../tests"),
        ("docs", "../docs"),
        ("pyproject.toml", "../pyproject.toml"),
    ]:
        link = WORK / name
        if not link.is_symlink():
            link.symlink_to(target)


def run(names: list[str]) -> int:
    mutmut = Path(sys.executable).parent / "mutmut"
    # mutmut copies tests/ and pyproject.toml into mutants/ once and keeps the copies:
    # drop them, so a test added since the last run is the one the mutants meet.
    shutil.rmtree(MUTANTS / "tests", ignore_errors=True)
    (MUTANTS / "pyproject.toml").unlink(missing_ok=True)
    # Two workers, one per core of the 2-core machine this is sized for; MUTATE_CHILDREN
    # sets another number.
    children = os.environ.get("MUTATE_CHILDREN", "2")
    command = [str(mutmut), "run", "--max-children", children, *names]
    # Few, fixed Hypothesis examples per property (tests/conftest.py); one torch thread per
    # worker: the workers fill the cores, and more threads per kernel only wait on each other.
    env = {**os.environ, "GRADSTREAM_MUTATE": "1", "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    code = subprocess.run(command, cwd=WORK, env=env, check=False).returncode
    print(f"mutmut ran {time.monotonic() - start:.0f} s with {children} workers")
    return code


def results(names: list[str]) -> dict[str, int | None]:
    """Exit code per mutant in scope, from mutmut's per-file records."""
    found: dict[str, int | None] = {}
    for meta in sorted((MUTANTS / "src").rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for key, code in codes.items():
            if any(fnmatch.fnmatchcase(key, n) for n in names):
                found[key] = code
    return found


def _functions(module: str) -> dict[str, list[str]]:
    """The source lines of every function of mutmut's copy of ``module``, by name."""
    lines = (MUTANTS / "src" / "gradstream" / "server" / f"{module}.py").read_text().splitlines()
    found: dict[str, list[str]] = {}
    name, indent, body = "", 0, list[str]()
    for line in [*lines, "def end():"]:
        stripped = line.lstrip()
        depth = len(line) - len(stripped)
        ends = stripped and depth <= indent and not stripped.startswith(("#", ")", "]"))
        if name and ends:
            found[name], name = body, ""
        if not name and stripped.startswith("def ") and "__mutmut_" in stripped:
            name, indent = stripped[4 : stripped.index("(")], depth
            # The signature, under its original name (a default may be what was mutated).
            body = [line.replace(name, name.split("__mutmut_")[0].removeprefix("x_"))]
        elif name:
            body.append(line)
    return found


def ignored_by_pattern(keys: list[str]) -> set[str]:
    """Mutants marked equivalent, found by the lines they change.

    ``do_not_mutate_patterns`` marks every mutant on a line: mutmut applies the patterns
    when it makes the mutants, and a run made before a pattern was added still holds
    those mutants, which the score leaves out as a new run would. ``[tool.mutate]
    equivalent`` marks one mutation of a line that also holds mutants the tests kill: a
    mutant is equivalent when a line it removes matches ``line`` and the line it puts
    there matches ``becomes``. mutmut still runs those; the score leaves them out.
    """
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    patterns = [re.compile(p) for p in tool["mutmut"].get("do_not_mutate_patterns", [])]
    marks = [
        (re.compile(m["line"]), re.compile(m["becomes"]))
        for m in tool.get("mutate", {}).get("equivalent", [])
    ]
    out: set[str] = set()
    cache: dict[str, dict[str, list[str]]] = {}
    for key in keys:
        module, _, function = key.removeprefix("gradstream.server.").partition(".")
        functions = cache.setdefault(module, _functions(module))
        base = function.split("__mutmut_")[0]
        original = functions.get(f"{base}__mutmut_orig", [])
        mutated = functions.get(function, [])
        diff = list(difflib.ndiff(original, mutated))
        removed = [line[2:] for line in diff if line.startswith("- ")]
        added = [line[2:] for line in diff if line.startswith("+ ")]
        marked = any(p.search(line) for p in patterns for line in removed)
        pairs = [(r, a) for r in removed for a in added]
        if marked or any(w.search(r) and b.search(a) for w, b in marks for r, a in pairs):
            out.add(key)
    return out


def score(names: list[str]) -> int:
    """Print killed / total per module and overall, and the survivors; 0 if anything ran."""
    found = results(names)
    if not found:
        print("no mutation results: run `make mutate` first")
        return 1
    by_module: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    survivors: list[str] = []
    equivalent = ignored_by_pattern(list(found))
    for key, code in sorted(found.items()):
        module = key.split(".x")[0].removeprefix("gradstream.server.")
        if key in equivalent:
            by_module[module]["equivalent"] += 1
            continue
        status = "killed" if code in KILLED else STATUS.get(code, f"exit {code}")
        by_module[module][status] += 1
        if status != "killed":
            survivors.append(f"  {status:9} {key}")
    total = collections.Counter[str]()
    print(f"{'module':12} {'killed':>7} {'run':>5} {'score':>7}  other")
    for module, counts in sorted(by_module.items()):
        total.update(counts)
        _line(module, counts)
    _line("total", total)
    if survivors:
        print("not killed (`cd .mutate && ../.venv/bin/mutmut show NAME` shows one):")
        print("\n".join(survivors))
    return 0


def _line(label: str, counts: collections.Counter[str]) -> None:
    run_ = sum(v for k, v in counts.items() if k not in {"not run", "equivalent"})
    killed = counts["killed"]
    pct = f"{100 * killed / run_:.1f}%" if run_ else "-"
    other = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed")
    print(f"{label:12} {killed:7} {run_:5} {pct:>7}  {other}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--score", action="store_true", help="only print the last run's score")
    parser.add_argument("only", nargs="*", help="patterns under gradstream.server. to run")
    args = parser.parse_args()
    names = patterns(args.only)
    if not args.score:
        if not args.only:
            # A whole run starts from fresh copies: mutmut keeps a copied file that exists.
            shutil.rmtree(MUTANTS, ignore_errors=True)
        prepare()
        code = run(names)
        if code != 0:
            print(f"mutmut exited {code}")
    return score(names)


if __name__ == "__main__":
    sys.exit(main())

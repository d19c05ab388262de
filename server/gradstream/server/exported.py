"""A user's own network as a ``torch.export`` archive, loaded without running anything from it.

``torch.export.load`` trusts its input: in torch 2.13 it unpickles weights and
constants marked ``use_pickle`` (``torch.load(weights_only=False)``), opaque constants
(``pickle.loads``) and torchbind objects; it loads the sample inputs with
``weights_only=True`` but falls back to a full unpickle when that fails; it evaluates
every symbolic shape expression with ``sympy.sympify`` (``eval``); it compiles the
archive's ``guards_code`` into Python that ``ExportedProgram.module()`` runs; it looks
node targets up as any attribute path under ``torch``, ``math`` or ``operator``; and
when the archive is not a pt2 package it falls back to the 2.7 format, whose parts are
unpickled the same way. So the archive is checked here before torch reads it, and
refused unless it is a plain pt2 package: raw tensor payloads only, sample inputs that
load weights-only, shape expressions made of symbols, numbers and sympy's arithmetic,
guards that only compare input sizes, and only ATen operators (none that reads or
writes files) and arithmetic.
"""

from __future__ import annotations

import ast
import io
import json
import math
import operator
import re
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from gradstream.server.errors import InvalidArgument
from gradstream.server.spec import InputKind, InputSpec

FIELD = "program"
# Members of a pt2 package holding one program named "model", under its root folder.
_MEMBERS = re.compile(
    r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+)$"
)
_REQUIRED = (
    "archive_format",
    "archive_version",
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
)
_MAX_MEMBERS = 100_000
# Plain arithmetic on shapes and scalars, as export's symbolic shape code writes it.
_OPERATORS = frozenset(
    [
        "getitem",
        "add",
        "sub",
        "mul",
        "floordiv",
        "truediv",
        "mod",
        "neg",
        "pow",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and_",
        "or_",
        "not_",
    ]
)
_TORCH_FUNCTIONS = frozenset(
    ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_sqrt", "sym_ite")
)
_MATH_FUNCTIONS = frozenset(("ceil", "floor", "trunc", "sqrt"))
# ATen operators with a file name argument (aten::save, aten::from_file).
_FILE_OPS = frozenset(("save", "from_file"))
_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)$")
# Names a shape expression may use: sympy's constructors and torch's sympy functions.
_SYMPY_CALLS = frozenset(
    [
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Mod",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "IntTrueDiv",
        "FloatTrueDiv",
        "PowByNatural",
        "FloatPow",
        "TruncToInt",
        "TruncToFloat",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        "LShift",
        "RShift",
        "BitwiseFn_bitwise_and",
        "BitwiseFn_bitwise_or",
    ]
)
_SYMBOL = re.compile(r"^[a-z]+[0-9]+$")
_EXPR_NODES = (
    ast.Expression,
    ast.Call,
    ast.Name,
    ast.Load,
    ast.Constant,
    ast.keyword,
    ast.BinOp,
    ast.UnaryOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Pow,
    ast.USub,
    ast.UAdd,
)


def load_program(data: bytes, max_bytes: int) -> torch.export.ExportedProgram:
    """The archive's program, after ``check_archive`` found nothing in it that would run."""
    check_archive(data, max_bytes)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many kinds on a malformed program
        raise InvalidArgument(FIELD, f"is not a loadable torch.export program: {exc}") from None
    _check_graph(program)
    return program


def check_archive(data: bytes, max_bytes: int) -> None:
    """Refuse an archive torch would unpickle, ``eval`` or ``exec`` anything from."""
    if max_bytes and len(data) > max_bytes:
        raise InvalidArgument(
            FIELD, f"is {len(data)} bytes, more than max_program_bytes ({max_bytes})"
        )
    members = _members(data, max_bytes)
    fmt = members["archive_format"].decode(errors="replace")
    if fmt != "pt2":
        raise InvalidArgument(FIELD, f"archive_format is {fmt!r}, not 'pt2'")
    for kind in ("weights", "constants"):
        config = _json(members, f"data/{kind}/model_{kind}_config.json")
        payloads = config.get("config") if isinstance(config, dict) else None
        if not isinstance(payloads, dict):
            raise InvalidArgument(FIELD, f"data/{kind} has no payload config")
        prefix = "weight_" if kind == "weights" else "tensor_"
        for name, meta in payloads.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
                raise InvalidArgument(
                    FIELD, f"{kind} {name!r} is pickled; only raw tensor payloads are loaded"
                )
            path = meta.get("path_name")
            if not (isinstance(path, str) and re.fullmatch(prefix + r"\d+", path)):
                raise InvalidArgument(FIELD, f"{kind} {name!r} is stored as {path!r}")
            if f"data/{kind}/{path}" not in members:
                raise InvalidArgument(FIELD, f"{kind} {name!r}: data/{kind}/{path} is missing")
    _check_sample_inputs(members["data/sample_inputs/model.pt"])
    program = _json(members, "models/model.json")
    if not isinstance(program, dict):
        raise InvalidArgument(FIELD, "models/model.json is not an object")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise InvalidArgument(FIELD, "has malformed guards_code")
    for guard in guards:
        _check_guard(guard)
    for key, value in _walk(program):
        if key == "expr_str":
            _check_expression(value)
        elif key in ("as_graph", "as_graphs"):
            raise InvalidArgument(FIELD, "has a subgraph (control flow); only flat graphs load")
        elif key == "as_operator":
            _check_target(value)
    graph = program.get("graph_module", {}).get("graph", {})
    for node in graph.get("nodes", []) if isinstance(graph, dict) else []:
        _check_target(node.get("target") if isinstance(node, dict) else None)


def _members(data: bytes, max_bytes: int) -> dict[str, bytes]:
    """Every member by its path under the root folder; refuses anything not in a plain package."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InvalidArgument(FIELD, f"is not a zip archive (torch.export.save): {exc}") from None
    if len(infos) > _MAX_MEMBERS:
        raise InvalidArgument(FIELD, f"has {len(infos)} members")
    # Stored, not compressed, as torch.export.save writes them: no zip bomb to inflate.
    if any(info.compress_type != zipfile.ZIP_STORED for info in infos):
        raise InvalidArgument(FIELD, "has compressed members; torch.export.save stores them")
    total = sum(info.file_size for info in infos)
    if max_bytes and total > max_bytes:
        raise InvalidArgument(
            FIELD, f"unpacks to {total} bytes, more than max_program_bytes ({max_bytes})"
        )
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1:
        raise InvalidArgument(FIELD, f"has {len(roots)} root folders, a pt2 package one")
    members: dict[str, bytes] = {}
    for info in infos:
        path = info.filename.split("/", 1)[1] if "/" in info.filename else ""
        if info.is_dir():
            continue
        if not _MEMBERS.match(path) or path in members:
            raise InvalidArgument(
                FIELD, f"holds {info.filename!r}, which a plain torch.export program has not"
            )
        members[path] = archive.read(info)
    missing = [path for path in _REQUIRED if path not in members]
    if missing:
        raise InvalidArgument(FIELD, f"lacks {', '.join(missing)}: not a torch.export package")
    return members


def _json(members: dict[str, bytes], path: str) -> Any:
    try:
        return json.loads(members[path])
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(FIELD, f"{path} is not JSON: {exc}") from None


def _walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, depth first, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                yield key, child
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _check_sample_inputs(data: bytes) -> None:
    """torch falls back to a full unpickle when the weights-only load fails: fail first."""
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # the weights-only unpickler refuses in many ways
        raise InvalidArgument(
            FIELD, f"its sample inputs do not load weights-only: {type(exc).__name__}"
        ) from None


def _expression(text: Any, what: str) -> ast.Expression:
    """``text`` parsed as one Python expression (nothing runs), or refused."""
    if not isinstance(text, str) or len(text) > 10_000:
        raise InvalidArgument(FIELD, f"has a malformed {what}")
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise InvalidArgument(FIELD, f"has a {what} that is not an expression: {text!r}") from None


def _check_expression(text: Any) -> None:
    """A shape expression sympify may ``eval``: only symbols, numbers and sympy arithmetic."""
    for node in ast.walk(_expression(text, "shape expression")):
        allowed = isinstance(node, _EXPR_NODES)
        if isinstance(node, ast.Call):
            allowed = isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS
        elif isinstance(node, ast.Name):
            allowed = node.id in _SYMPY_CALLS or node.id in ("True", "False")
            allowed = allowed or bool(_SYMBOL.match(node.id))
        elif isinstance(node, ast.Constant):
            value = node.value
            allowed = isinstance(value, bool | int | float) or (
                isinstance(value, str) and bool(_SYMBOL.match(value))
            )
        if not allowed:
            raise InvalidArgument(FIELD, f"has a shape expression it may not: {text[:200]!r}")


_GUARD_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.UnaryOp,
    ast.BinOp,
    ast.Subscript,
    ast.Name,
    ast.Attribute,
    ast.Call,
    ast.Constant,
    ast.Load,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.And,
    ast.Or,
    ast.Not,
    ast.USub,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.FloorDiv,
    ast.Mod,
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_guard(text: Any) -> None:
    """A guard torch compiles into Python: input sizes compared, as export writes them.

    ``L['x'].size()[0] == L['z'].size()[0]``: the inputs (``L[...]``), their
    ``size()``/``stride()``, numbers and comparisons; nothing else, so nothing else runs.
    """
    for node in ast.walk(_expression(text, "guard")):
        allowed = isinstance(node, _GUARD_NODES)
        if isinstance(node, ast.Name):
            allowed = node.id == "L"
        elif isinstance(node, ast.Attribute):
            allowed = node.attr in ("size", "stride")
        elif isinstance(node, ast.Call):
            allowed = isinstance(node.func, ast.Attribute) and not node.keywords
        elif isinstance(node, ast.Constant):
            value = node.value
            allowed = isinstance(value, bool | int) or (
                isinstance(value, str) and bool(_IDENTIFIER.match(value))
            )
        if not allowed:
            raise InvalidArgument(FIELD, f"has a guard it may not: {text[:200]!r}")


def _check_target(target: Any) -> None:
    """ATen operators (no file access) and arithmetic: what a traced network calls."""
    if not isinstance(target, str):
        raise InvalidArgument(FIELD, f"has a node whose target is {target!r}")
    aten = _ATEN_TARGET.match(target)
    if aten:
        if aten[1] in _FILE_OPS:
            raise InvalidArgument(FIELD, f"calls {target}, which touches files")
        return
    module, _, name = target.partition(".")
    allowed = {"_operator": _OPERATORS, "torch": _TORCH_FUNCTIONS, "math": _MATH_FUNCTIONS}
    if name not in allowed.get(module, ()):
        raise InvalidArgument(FIELD, f"calls {target!r}; only ATen operators and arithmetic")


def _check_graph(program: torch.export.ExportedProgram) -> None:
    """The loaded graph calls only what ``_check_target`` let through (defence in depth)."""
    arithmetic = {
        *(getattr(operator, name) for name in _OPERATORS),
        *(getattr(torch, name) for name in _TORCH_FUNCTIONS),
        *(getattr(math, name) for name in _MATH_FUNCTIONS),
    }
    for node in program.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if target.namespace == "aten" and target._opname not in _FILE_OPS:
                continue
        elif node.op == "call_function" and any(target is f for f in arithmetic):
            continue
        raise InvalidArgument(FIELD, f"calls {target!r}; only ATen operators and arithmetic")


def _user_inputs(program: torch.export.ExportedProgram) -> list[tuple[str, Any]]:
    """The program's user inputs (not its parameters, buffers or constants), as traced values."""
    names = list(program.graph_signature.user_inputs)
    values = {
        node.name: node.meta.get("val") for node in program.graph.nodes if node.op == "placeholder"
    }
    return [(name, values.get(name)) for name in names]


# ATen ops that look rows up in a table: (table, ids, ...) as their first two arguments.
_LOOKUPS = ("embedding", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only")


def _id_bounds(program: torch.export.ExportedProgram) -> dict[str, int]:
    """For each user input that indexes a table directly, the table's row count.

    An id past a table's end is an IndexError in the middle of a step; with the bound
    known, such a batch is refused before it runs, naming the input and the range.
    """
    bounds: dict[str, int] = {}
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace != "aten" or target._opname not in _LOOKUPS or len(node.args) < 2:
            continue
        table, ids = node.args[0], node.args[1]
        rows = getattr(getattr(table, "meta", {}).get("val"), "shape", (None,))[0]
        if isinstance(ids, torch.fx.Node) and ids.op == "placeholder" and isinstance(rows, int):
            bounds[ids.name] = min(rows, bounds.get(ids.name, rows))
    return bounds


def _input_spec(name: str, value: Any, ids_below: int = 0) -> InputSpec:
    """How batches must carry one user input: its dtype's kind and its sizes after the rows."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is None or dtype is None or len(shape) < 1:
        raise InvalidArgument(
            FIELD, f"input {name!r} is {shape}; every input is a tensor of rows (rows, ...)"
        )
    if dtype.is_floating_point:
        kind: InputKind = "float"
    elif dtype in (torch.int64, torch.int32):
        kind = "integer"
    else:
        raise InvalidArgument(
            FIELD, f"input {name!r} has dtype {dtype}; inputs are floating point or int64/int32"
        )
    # A size torch traced as a symbol is free (any size); a number is fixed.
    trailing = tuple(d if isinstance(d, int) else -1 for d in shape[1:])
    return InputSpec(name, kind, trailing, ids_below if kind == "integer" else 0)


def _mutated_buffers(program: torch.export.ExportedProgram) -> list[str]:
    """Buffers the program writes: returned as mutated, or written in place by an operator."""
    signature = program.graph_signature
    buffers = dict(signature.inputs_to_buffers)  # placeholder name -> buffer name
    found = set(signature.buffers_to_mutate.values())
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        arguments = target._schema.arguments
        values = [
            node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            for i, a in enumerate(arguments)
        ]
        # aten::batch_norm updates its running statistics when training without saying so.
        training = any(
            a.name == "training" and v is True for a, v in zip(arguments, values, strict=True)
        )
        for argument, value in zip(arguments, values, strict=True):
            writes = argument.alias_info is not None and argument.alias_info.is_write
            if (writes or training) and isinstance(value, torch.fx.Node) and value.name in buffers:
                found.add(buffers[value.name])
    return sorted(found)


def signature(data: bytes, max_bytes: int) -> tuple[tuple[InputSpec, ...], int, int]:
    """``(inputs, in_features, out_features)`` of a program gradstream can train.

    Each user input is a tensor of rows, float or integer, taken by its name; the one
    output is (rows, out_features). ``in_features`` is the width of a one-input program's
    (rows, width) input (what ``x`` carries), else the elements of one row of every input
    (a free size counted as 1). Anything else is refused.
    """
    program = load_program(data, max_bytes)
    bounds = _id_bounds(program)
    inputs = tuple(
        _input_spec(name, value, bounds.get(name, 0)) for name, value in _user_inputs(program)
    )
    if not inputs:
        raise InvalidArgument(FIELD, "has no user inputs; a model reads at least one")
    mutated = _mutated_buffers(program)
    if mutated:
        # Checkpoints hold parameters and optimizer state, not buffers: a restart would
        # lose what these buffers learned (batch norm's running statistics).
        raise InvalidArgument(
            FIELD,
            f"updates buffers {', '.join(mutated)} as it runs (batch norm traced in train "
            "mode); export it in eval mode, or without them",
        )
    outputs = next(node for node in program.graph.nodes if node.op == "output").args[0]
    out_shapes = [getattr(o.meta.get("val"), "shape", None) for o in outputs]
    if len(out_shapes) != 1 or out_shapes[0] is None or len(out_shapes[0]) != 2:
        raise InvalidArgument(
            FIELD, f"has outputs of shapes {out_shapes}; one (rows, out_features) is trained"
        )
    out = out_shapes[0][1]
    if not isinstance(out, int):
        raise InvalidArgument(FIELD, f"its output's width is {out}, not a fixed number")
    in_features = sum(math.prod(max(d, 1) for d in i.shape) for i in inputs)
    return inputs, in_features, int(out)


def build(data: bytes) -> torch.nn.Module:
    """A trainable module of the archive (``ExportedProgram.module()``), loaded afresh.

    Each call loads its own copy: module() may share tensors with its program, and no
    two trainers (nor a create's measurements) may share parameters.
    """
    return load_program(data, 0).module()

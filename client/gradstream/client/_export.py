"""Your own network as bytes the server's ``exported`` architecture loads: ``torch.export``."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any


def export_module(module: Any, example_inputs: Sequence[Any]) -> bytes:
    """``torch.export.save`` bytes of ``module`` traced on ``example_inputs``.

    Every tensor input's first dimension is the batch: exported as one dynamic size
    shared by all inputs, so batches of any row count run (give at least 2 example rows;
    torch specializes a size of 1). What cannot be exported: Python control flow that
    depends on tensor values. The program is traced in the module's current mode: call
    ``module.train()`` or ``module.eval()`` first, as dropout and batch norm are traced
    as they behave in that mode. torch is imported here, not when the client is.
    """
    import torch

    inputs = tuple(example_inputs)
    rows = torch.export.Dim("rows")
    dynamic = tuple(
        {0: rows} if isinstance(t, torch.Tensor) and t.ndim > 0 else None for t in inputs
    )
    program = torch.export.export(module, inputs, dynamic_shapes=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()

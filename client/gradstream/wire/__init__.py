"""The wire format both the SDK and the server use; it never imports torch.

``tensor``  numpy arrays <-> ``gradstream.v1.Tensor``: dtype codes, shape and size rules,
            the alignment of large data
``inputs``  a model's named inputs (dicts of name -> array) <-> ``NamedTensor`` entries
``train``   Train requests written straight to wire bytes (the SDK's encoder)
``spec``    model spec dicts <-> ``gradstream.v1.ModelSpec``
"""

from gradstream.wire.inputs import (
    input_items,
    inputs_from_proto,
    inputs_to_proto,
    set_model_input,
    wire_inputs,
)
from gradstream.wire.spec import SpecError, spec_from_proto, spec_to_proto
from gradstream.wire.tensor import (
    ALIGN,
    MAX_DIMS,
    NUMPY_DTYPES,
    TensorFormatError,
    as_array,
    from_parts,
    from_proto,
    to_proto,
    wire_array,
)

__all__ = [
    "ALIGN",
    "MAX_DIMS",
    "NUMPY_DTYPES",
    "SpecError",
    "TensorFormatError",
    "as_array",
    "from_parts",
    "from_proto",
    "input_items",
    "inputs_from_proto",
    "inputs_to_proto",
    "set_model_input",
    "spec_from_proto",
    "spec_to_proto",
    "to_proto",
    "wire_array",
    "wire_inputs",
]

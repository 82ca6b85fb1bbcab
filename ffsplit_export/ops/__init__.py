"""The ``ffsplit`` ONNX op domain: schemas and NumPy reference implementations.

The reference is the specification: the ONNX Runtime C++ kernels and the Triton kernels
are tested against it. Every op computes ``Y[..., N] = X[..., K] @ W.T`` in float32,
where ``W[N, K]`` is decoded from packed constant inputs (layouts in
:mod:`ffsplit_export.formats.packing`).
"""

from __future__ import annotations

from ._ffn import ACTIVATIONS as FFN_ACTIVATIONS
from ._ffn import fused_ffn_nbits_reference, fused_ffn_reference, skipped_fraction
from ._spec import (
    DOMAIN,
    OPS,
    SEMANTICS,
    VERSION,
    OpSpec,
    check_op_weights,
    decode_weight,
    matmulnbits_reference,
    reference_matmul,
    reference_ops,
    register_schemas,
)

__all__ = [
    "FFN_ACTIVATIONS",
    "fused_ffn_reference",
    "fused_ffn_nbits_reference",
    "skipped_fraction",
    "DOMAIN",
    "OPS",
    "SEMANTICS",
    "VERSION",
    "OpSpec",
    "check_op_weights",
    "decode_weight",
    "matmulnbits_reference",
    "reference_matmul",
    "reference_ops",
    "register_schemas",
]

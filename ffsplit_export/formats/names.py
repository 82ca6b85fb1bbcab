"""Stable string names of the on-disk weight formats."""

from __future__ import annotations

from enum import Enum

from ..errors import ConfigError


class _NamedEnum(str, Enum):
    def __str__(self) -> str:  # print the stable value, not Class.MEMBER
        return self.value

    @classmethod
    def parse(cls, value: str | _NamedEnum, option: str):
        try:
            return cls(value)
        except ValueError as e:
            names = ", ".join(m.value for m in cls)
            raise ConfigError(f"{option}={value!r} is not a known format; use one of: {names}") from e


class LightFormat(_NamedEnum):
    """Formats of the light (compressed) part of a split FFN."""

    DENSE = "dense"
    SPARSE_FP32 = "sparse-fp32"
    SPARSE_INT8 = "sparse-int8"
    NM24_INT8 = "2:4-int8"
    INT8 = "int8"
    INT4 = "int4"
    LOWRANK = "lowrank"
    SPARSE_INT4 = "sparse-int4"  # appended: existing members keep their order


class HeavyFormat(_NamedEnum):
    """Formats of the heavy (dense) part of a split FFN."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class OtherLinearFormat(_NamedEnum):
    """Formats of the model's other linear layers (attention, lm_head)."""

    FP32 = "fp32"
    INT8 = "int8"
    INT4 = "int4"


class EmbeddingFormat(_NamedEnum):
    """Formats of the token embedding table (``--embedding``)."""

    FP32 = "fp32"
    INT8 = "int8"
    INT4 = "int4"


class PruneMethod(_NamedEnum):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"


class Target(_NamedEnum):
    """Where the exported graph runs."""

    ORT_CPU = "ort-cpu"
    PORTABLE = "portable"
    TENSORRT = "tensorrt"


class Quantizer(_NamedEnum):
    """How quantized codes are chosen (``--quantizer``): round-to-nearest, or GPTQ's error compensation."""

    RTN = "rtn"
    GPTQ = "gptq"


class Int4Grid(_NamedEnum):
    """The grid of int4 MatMulNBits weights (``--int4-grid``): symmetric codes around the op's
    default zero point, or asymmetric with a uint4 zero point per block (``zero_points``), the
    block's range from min / max or from a clipping search minimising the squared error."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"
    ASYMMETRIC_MSE = "asymmetric-mse"

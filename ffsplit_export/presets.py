"""Named recipes (``--preset accurate|balanced|fast``): points measured on the speed/accuracy front.

A preset is a table of :class:`~ffsplit_export.config.CompressionConfig` fields plus the
MatMulNBits ``nbits_accuracy_level`` the export ships with; an option the user gives explicitly
overrides the preset's field. The values were chosen from ``samples/frontier.py`` on
SmolLM2-135M (README, "The speed/accuracy front": perplexity measured through ONNX Runtime at
the shipped accuracy level, bytes and decode speed of each, same run as ONNX Runtime's own
quantizer and the GenAI model builder). ``balanced`` and ``fast`` moved to group 64 and the int4
embedding shared with the tied lm_head for the bytes axis (README, "The bytes axis"): SmolLM2
80.7 MiB (ppl 16.57) and 77.7 MiB (16.91) against the GenAI builder's 82.5 MiB (20.03). ``balanced`` is the default of ``ffsplit-export
export``, ``optimum-cli export ffsplit`` and :func:`ffsplit_export.export`.

Core module: imports only errors (``config.py`` imports this table; ``tests/test_layers.py``).
:meth:`CompressionConfig.from_preset` builds a preset's config.
"""

from __future__ import annotations

from types import MappingProxyType

from .errors import ConfigError

__all__ = [
    "DEFAULT_PRESET",
    "NO_PRESET",
    "PRESETS",
    "PRESET_FIELDS",
    "preset_accuracy_level",
    "preset_names",
    "resolve_preset",
]

DEFAULT_PRESET = "balanced"
NO_PRESET = "none"  # --preset none: CompressionConfig's own field defaults, accuracy level 0

# the option fields a preset sets (CLI dest names = CompressionConfig / ExportOptions field names)
PRESET_FIELDS = (
    "light_format",
    "light_sparsity",
    "prune_method",
    "heavy_fraction",
    "heavy_format",
    "other_linear",
    "embedding",
    "group_size",
    "quantizer",
    "int4_grid",
    "nbits_accuracy_level",
)

_INT4 = {
    "light_format": "int4",
    "light_sparsity": 0.5,  # unused by int4 (no pruning)
    "prune_method": "wanda",  # unused by int4
    "heavy_fraction": 0.1,
    "heavy_format": "int8",
    "other_linear": "int4",
    # int4 table; with a tied lm_head (SmolLM2) the embedding gathers from the lm_head's codes
    "embedding": "int4",
    "quantizer": "gptq",
    # uint4 zero point per group, range by clipping search (samples/int4_grid_compare.py, SmolLM2
    # PyTorch ppl, GPTQ g32: symmetric 15.387, asymmetric 14.068, asymmetric-mse 13.669)
    "int4_grid": "asymmetric-mse",
    "nbits_accuracy_level": 4,
}

PRESETS = MappingProxyType(
    {
        "accurate": MappingProxyType(
            {
                "light_format": "int8",
                "light_sparsity": 0.5,  # unused by int8
                "prune_method": "wanda",  # unused by int8
                "heavy_fraction": 0.1,
                "heavy_format": "fp32",
                "other_linear": "int8",
                "embedding": "int8",
                "group_size": 128,
                "quantizer": "rtn",  # int8 round-to-nearest is already within 1 % of dense
                "int4_grid": "symmetric",  # no int4 weights
                "nbits_accuracy_level": 4,
                "note": "closest to dense: FFN light part int8 (no pruning), 10 % fp32 heavy, "
                "attention / lm_head / embedding int8",
            }
        ),
        "balanced": MappingProxyType(
            {
                **_INT4,
                "group_size": 64,
                "note": "the default: GPTQ int4 (group 64, zero points) light part and attention / "
                "lm_head, 10 % int8 heavy, int4 embedding sharing the tied lm_head's table",
            }
        ),
        # no split: on stock MatMulNBits every FFN part costs its own nodes (SmolLM2, GenAI loop, idle:
        # balanced 10.5 ms/token, this 7.7, the GenAI builder's int4 7.5); GPTQ codes on the builder's
        # grid (symmetric, group 32) at its bytes: perplexity 18.69 against its 20.03
        # (asymmetric group 64: 18.13 at 76.0 MiB but 8.7 ms/token; symmetric group 64: 22.32)
        "fast": MappingProxyType(
            {
                **_INT4,
                "heavy_fraction": 0.0,
                "group_size": 32,
                "int4_grid": "symmetric",
                "note": "fastest decode: every FFN weight GPTQ int4 (group 32, symmetric, no heavy part), "
                "attention / lm_head the same, int4 embedding sharing the tied lm_head's table",
            }
        ),
    }
)

# a preset's fields that a target cannot carry, replaced there (TensorRT has no MatMulNBits /
# GatherBlockQuantized): the rest of the preset stays; explicit options still win
TARGET_OVERRIDES = MappingProxyType(
    {
        "tensorrt": MappingProxyType(
            {
                "light_format": "sparse-int8",
                "prune_method": "sparsegpt",
                "heavy_format": "fp16",
                "other_linear": "fp32",
                "embedding": "fp32",
                "nbits_accuracy_level": 0,
            }
        )
    }
)


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def _check(name: str) -> None:
    if name not in PRESETS:
        raise ConfigError(
            f"unknown preset {name!r}; available: {', '.join(PRESETS)}, or {NO_PRESET} "
            "(or give the options one by one)"
        )


def resolve_preset(name: str | None = DEFAULT_PRESET, target: str | None = None, **explicit) -> dict:
    """The option values of preset ``name`` with every explicit (non-None) option laid over them.

    With ``target``, the preset's fields that target cannot carry are replaced first
    (``TARGET_OVERRIDES``). ``name`` None or ``"none"``: no preset, only the explicit options.
    Keys other than the preset fields are passed through unchanged.
    """
    base: dict = {}
    if name is not None and name != NO_PRESET:
        _check(name)
        base = {k: v for k, v in PRESETS[name].items() if k != "note"}
        base.update(TARGET_OVERRIDES.get(str(target), {}))
    base.update({k: v for k, v in explicit.items() if v is not None})
    return base


def preset_accuracy_level(name: str | None, target: str | None = None) -> int:
    """The MatMulNBits accuracy_level preset ``name`` ships with (0 without a preset)."""
    if name is None or name == NO_PRESET:
        return 0
    return int(resolve_preset(name, target)["nbits_accuracy_level"])

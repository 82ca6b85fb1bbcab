"""Tile configurations and kernel signatures of the Triton kernels (pure Python, no triton).

A kernel's parameters follow TensorRT's AOT plugin calling convention: input pointers in
the op's input order, then int32 scalars (the plugin's extra args), then the output pointer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class TileConfig:
    """One autotune candidate. ``use_dot`` picks tensor-core ``tl.dot`` (M >= 16) over a
    broadcast-and-reduce product that wastes nothing when M is 1..8 (decoding)."""

    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    use_dot: bool
    num_stages: int = 2

    def constexprs(self) -> dict:
        return {
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "USE_DOT": self.use_dot,
        }

    def as_dict(self) -> dict:
        return asdict(self)


CONFIGS: tuple[TileConfig, ...] = (
    TileConfig("decode_m4", 4, 32, 32, 4, False),
    TileConfig("decode_m8", 8, 32, 32, 4, False),
    TileConfig("prefill_m32", 32, 32, 32, 4, True),
    TileConfig("prefill_m64", 64, 32, 32, 8, True),
)

#: Column chunks must hold whole mask bytes (8) and whole 2:4 meta bytes (8 columns).
K_MULTIPLE = 8


def config_by_name(name: str) -> TileConfig:
    for c in CONFIGS:
        if c.name == name:
            return c
    raise ConfigError(f"unknown tile config {name!r}; use one of {[c.name for c in CONFIGS]}")


def config_for_tactic(tactic: int) -> TileConfig:
    """TensorRT tactics are 1-based indices into :data:`CONFIGS` (0 is kept for 'default')."""
    if tactic <= 0:
        return CONFIGS[0]
    if tactic > len(CONFIGS):
        raise ConfigError(f"tactic {tactic} out of range 1..{len(CONFIGS)}")
    return CONFIGS[tactic - 1]


def heuristic_config(m: int) -> TileConfig:
    """Config to use without autotuning: smallest tile that covers M, dot tiles past 8 rows."""
    if m <= 4:
        return CONFIGS[0]
    if m <= 8:
        return CONFIGS[1]
    if m <= 32:
        return CONFIGS[2]
    return CONFIGS[3]


@dataclass(frozen=True)
class KernelSpec:
    """How one op is compiled: kernel function name, Triton signature, fixed constexprs."""

    op_type: str
    kernel: str  # attribute name in ffsplit_export.trt.kernels
    signature: dict[str, str]
    fixed_constexprs: dict[str, object]
    variant: str  # short label of the index dtype variant
    #: BLOCK_K of the tl.dot configs when not 0, and ptxas' register limit when not 0:
    #: SparseMatMulInt4 decodes two gathers per weight; with the configs' 32-column chunks
    #: ptxas spilled (up to 156 B at prefill_m32 on sm_80) and, unasked, capped the decode
    #: configs at 96 registers with a 4 B spill; 16 columns and maxnreg 255 spill nothing
    dot_block_k: int = 0
    maxnreg: int = 0

    def constexprs(self, cfg: TileConfig) -> dict:
        """The compile-time constants of ``cfg`` for this kernel."""
        c = {**cfg.constexprs(), **self.fixed_constexprs}
        if cfg.use_dot and self.dot_block_k:
            c["BLOCK_K"] = self.dot_block_k
        return c

    def full_signature(self) -> dict[str, str]:
        sig = dict(self.signature)
        for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "USE_DOT", *self.fixed_constexprs):
            sig[k] = "constexpr"
        return sig


_SCALARS = {"M": "i32", "N": "i32", "K": "i32"}

#: rows of row_ptr SparseMatMulInt4's kernel sums per step to find its block's first group scale
INT4_ROW_CHUNK = 256


def kernel_spec(op_type: str, row_ptr_dtype: str = "i64", byte_elems: str = "u8") -> KernelSpec:
    """The spec of ``op_type``; ``row_ptr_dtype`` is ``i64`` (on-disk layout) or ``i32``
    (the int32 re-layout that :mod:`ffsplit_export.trt.layout` makes for TensorRT).

    ``byte_elems`` is how the uint8 arrays (bitmask ``mask``, 2:4 ``meta``) arrive: ``u8``
    (bytes, or their byte-identical int32 view; strides in bytes) or ``i32``: one byte value per
    int32 element, which is what TensorRT's ONNX parser makes of a UINT8 initializer
    (onnx-tensorrt ``ModelImporter.cpp``: "UINT8 data ... is being converted to INT32") when it
    parses an unmodified export, as ONNX Runtime's TensorRT EP does (strides in elements).
    The kernel code is the same; only the pointer type differs."""
    if row_ptr_dtype not in ("i64", "i32"):
        raise ConfigError(f"row_ptr dtype {row_ptr_dtype!r} must be 'i64' or 'i32'")
    if byte_elems not in ("u8", "i32"):
        raise ConfigError(f"byte_elems {byte_elems!r} must be 'u8' or 'i32'")
    wide = "_wide" if byte_elems == "i32" else ""
    if op_type in ("SparseMatMulInt8", "SparseMatMulFP32"):
        int8 = op_type == "SparseMatMulInt8"
        sig = {
            "x_ptr": "*fp32",
            "mask_ptr": f"*{byte_elems}",
            "values_ptr": "*i8" if int8 else "*fp32",
            "row_ptr_ptr": f"*{row_ptr_dtype}",
        }
        fixed: dict[str, object] = {}
        if int8:
            sig["scales_ptr"] = "*fp32"
        else:
            fixed["scales_ptr"] = None
        sig.update(_SCALARS)
        sig["MASK_STRIDE"] = "i32"
        sig["y_ptr"] = "*fp32"
        fixed["HAS_SCALES"] = int8
        return KernelSpec(
            op_type, "sparse_bitmask_matmul_kernel", sig, fixed, f"row_ptr_{row_ptr_dtype}{wide}"
        )
    if op_type == "SparseMatMulInt4":
        sig = {
            "x_ptr": "*fp32",
            "mask_ptr": f"*{byte_elems}",
            "values_ptr": f"*{byte_elems}",  # nibble stream: bytes, or one byte per int32 (parser)
            "row_ptr_ptr": f"*{row_ptr_dtype}",
            "scales_ptr": "*fp32",
            **_SCALARS,
            "MASK_STRIDE": "i32",
            "GROUP_SIZE": "i32",
            "y_ptr": "*fp32",
        }
        return KernelSpec(
            op_type,
            "sparse_int4_matmul_kernel",
            sig,
            {"ROW_CHUNK": INT4_ROW_CHUNK},
            f"row_ptr_{row_ptr_dtype}{wide}",
            dot_block_k=16,
            maxnreg=255,
        )
    if op_type == "Sparse24MatMulInt8":
        sig = {
            "x_ptr": "*fp32",
            "values_ptr": "*i8",
            "meta_ptr": f"*{byte_elems}",
            "scales_ptr": "*fp32",
            **_SCALARS,
            "VALUES_STRIDE": "i32",
            "META_STRIDE": "i32",
            "y_ptr": "*fp32",
        }
        return KernelSpec(op_type, "sparse24_matmul_kernel", sig, {}, f"nm24{wide}")
    raise ConfigError(
        f"no Triton kernel for op {op_type!r}; kernels exist for SparseMatMulInt8, SparseMatMulFP32, "
        "SparseMatMulInt4, Sparse24MatMulInt8"
    )


OP_TYPES = ("SparseMatMulInt8", "SparseMatMulFP32", "SparseMatMulInt4", "Sparse24MatMulInt8")


def all_specs() -> list[KernelSpec]:
    """Every compiled variant: both row_ptr dtypes for the bitmask ops, one for 2:4, and the
    parser-widened byte arrays (int64 row_ptr, as an unmodified export arrives)."""
    return [
        kernel_spec("SparseMatMulInt8", "i64"),
        kernel_spec("SparseMatMulInt8", "i32"),
        kernel_spec("SparseMatMulInt8", "i64", "i32"),
        kernel_spec("SparseMatMulFP32", "i64"),
        kernel_spec("SparseMatMulFP32", "i32"),
        kernel_spec("SparseMatMulFP32", "i64", "i32"),
        kernel_spec("SparseMatMulInt4", "i64"),
        kernel_spec("SparseMatMulInt4", "i32"),
        kernel_spec("SparseMatMulInt4", "i64", "i32"),
        kernel_spec("Sparse24MatMulInt8"),
        kernel_spec("Sparse24MatMulInt8", byte_elems="i32"),
    ]


# ----------------------------------------------------------------------------- FusedFFNNBits
#: the two kernels of ffsplit::FusedFFNNBits (ffsplit_export.trt.fused_kernels): up [+ gate] ->
#: activation -> a[M, F], then down; TensorRT runs them as two plugin nodes (see plugin.py)
FUSED_FFN_KERNELS = ("FusedFFNNBitsUp", "FusedFFNNBitsDown")
_FUSED_ACTS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


def fused_ffn_kernel_specs(
    *,
    heavy_bits: int,
    light_bits: int,
    heavy_zp: bool,
    light_zp: bool,
    gated: bool,
    activation: str,
    skip: bool,
    up_bias: bool,
    gate_bias: bool,
    down_bias: bool,
    byte_elems: str = "u8",
) -> tuple[KernelSpec, KernelSpec]:
    """The (up, down) kernel specs of one FusedFFNNBits node. ``heavy_bits`` 32 also stands for
    "no heavy part" (H = 0, dummy inputs). Byte arrays (B, zero points) arrive as bytes (or their
    int32 view, same offsets; ``u8``) or one byte value per int32 element (``i32``, TensorRT's
    parser-widened uint8); block sizes and the thresholds' float32 bits are int32 arguments."""
    if heavy_bits not in (4, 8, 32) or light_bits not in (4, 8):
        raise ConfigError(
            f"FusedFFNNBits heavy_bits={heavy_bits} / light_bits={light_bits}: use 4, 8 (32 heavy)"
        )
    if activation not in _FUSED_ACTS:
        raise ConfigError(f"FusedFFNNBits activation {activation!r}; use one of {list(_FUSED_ACTS)}")
    if byte_elems not in ("u8", "i32"):
        raise ConfigError(f"byte_elems {byte_elems!r} must be 'u8' or 'i32'")
    heavy_zp = bool(heavy_zp) and heavy_bits != 32
    hb = "*fp32" if heavy_bits == 32 else f"*{byte_elems}"
    lb = f"*{byte_elems}"
    zp = f"*{byte_elems}"

    def part(prefix):
        bt = hb if "h_" in prefix else lb
        return {f"{prefix}b_ptr": bt, f"{prefix}s_ptr": "*fp32", f"{prefix}z_ptr": zp}

    up_sig = {"x_ptr": "*fp32", **part("uh_"), **part("ul_"), "up_bias_ptr": "*fp32"}
    up_sig.update({**part("gh_"), **part("gl_"), "gate_bias_ptr": "*fp32"})
    thresholds = ("THRESHOLD_BITS", "PRODUCT_THRESHOLD_BITS", "INPUT_THRESHOLD_BITS")
    up_sig.update({n: "i32" for n in ("M", "H", "L", "D", "HEAVY_BS", "LIGHT_BS", *thresholds)})
    up_sig["a_ptr"] = "*fp32"
    common = {
        "HEAVY_BITS": heavy_bits,
        "LIGHT_BITS": light_bits,
        "HEAVY_ZP": heavy_zp,
        "LIGHT_ZP": bool(light_zp),
    }
    up_fixed = {
        **common,
        "GATED": bool(gated),
        "ACT": _FUSED_ACTS[activation],
        "SKIP": bool(skip),
        "HAS_UP_BIAS": bool(up_bias),
        "HAS_GATE_BIAS": bool(gate_bias) and bool(gated),
    }
    down_sig = {"a_ptr": "*fp32", **part("dh_"), **part("dl_"), "down_bias_ptr": "*fp32"}
    down_sig.update({n: "i32" for n in ("M", "D", "H", "L", "HEAVY_BS", "LIGHT_BS")})
    down_sig["y_ptr"] = "*fp32"
    down_fixed = {**common, "SKIP": bool(skip), "HAS_DOWN_BIAS": bool(down_bias)}
    tag = (
        f"h{heavy_bits}{'z' if heavy_zp else ''}_l{light_bits}{'z' if light_zp else ''}"
        f"{'_wide' if byte_elems == 'i32' else ''}"
    )
    up_tag = f"{tag}_{activation}{'_gated' if gated else ''}{'_skip' if skip else ''}"
    up_tag += f"{'_ub' if up_bias else ''}{'_gb' if up_fixed['HAS_GATE_BIAS'] else ''}"
    down_tag = f"{tag}{'_skip' if skip else ''}{'_db' if down_bias else ''}"
    # BLOCK_K 16 in the tl.dot configs: with 32 columns ptxas spilled up to 104 B (prefill_m32, the
    # gated up kernel's two accumulators and its gathered scales) on sm_80 and sm_90; with 16, ptxas
    # still capped prefill_m64 (8 warps) at 128 registers and spilled 16 B on sm_90 unless maxnreg is 255
    return (
        KernelSpec(
            "FusedFFNNBitsUp", "ffn_nbits_up_kernel", up_sig, up_fixed, up_tag, dot_block_k=16, maxnreg=255
        ),
        KernelSpec(
            "FusedFFNNBitsDown",
            "ffn_nbits_down_kernel",
            down_sig,
            down_fixed,
            down_tag,
            dot_block_k=16,
            maxnreg=255,
        ),
    )


def fused_ffn_specs() -> list[KernelSpec]:
    """The FusedFFNNBits variants compiled ahead of time (the plugin compiles any other variant
    for the current GPU when TensorRT builds the engine): the presets' shapes of the op."""
    variants = [
        # gated silu (Llama / SmolLM2): dense heavy, int4 light symmetric, threshold skipping
        dict(heavy_bits=32, light_bits=4, heavy_zp=False, light_zp=False, gated=True, activation="silu",
             skip=True, up_bias=False, gate_bias=False, down_bias=False),
        # ungated gelu with biases (Whisper / MPT): int8 heavy, int4 light with zero points
        dict(heavy_bits=8, light_bits=4, heavy_zp=False, light_zp=True, gated=False, activation="gelu",
             skip=False, up_bias=True, gate_bias=False, down_bias=True),
        # TEAL input skipping (--input-sparsity: MPT / Whisper): ungated gelu, skip, int4 light with zero
        # points, biases; the up kernel zeroes the light up's silent input channels (input_threshold)
        dict(heavy_bits=8, light_bits=4, heavy_zp=False, light_zp=True, gated=False, activation="gelu",
             skip=True, up_bias=True, gate_bias=False, down_bias=True),
        # relu exact skipping (T5 v1.0 / OPT): int8 light, parser-widened byte arrays
        dict(heavy_bits=32, light_bits=8, heavy_zp=False, light_zp=False, gated=False, activation="relu",
             skip=True, up_bias=True, gate_bias=False, down_bias=True, byte_elems="i32"),
    ]  # fmt: skip
    return [s for v in variants for s in fused_ffn_kernel_specs(**v)]

"""AOT compilation of ffsplit::FusedFFNNBits' two Triton kernels for sm_80 / sm_90 (no GPU needed),
checked as tests/test_trt_aot.py checks the other ops' kernels."""

from __future__ import annotations

import re

import pytest

from ffsplit_export.errors import ConfigError


def _entry_params(ptx: str) -> list[str]:
    return [
        p.strip() for p in re.search(r"\.entry\s+\S+\s*\((.*?)\)", ptx, re.S).group(1).split(",") if p.strip()
    ]


def _check(out, summary, n_expected):
    from ffsplit_export.trt.configs import fused_ffn_specs

    assert len(summary["kernels"]) == n_expected
    sigs = {(s.op_type, s.variant): s for s in fused_ffn_specs()}
    for e in summary["kernels"]:
        spec = sigs[(e["kernel"], e["variant"])]
        ptx = (out / e["ptx"]).read_text()
        assert e["ptx_target"].startswith(f".target {e['arch']}"), e["ptx_target"]
        assert (out / e["cubin"]).read_bytes()[:4] == b"\x7fELF"
        assert 0 < e["registers"] <= 255
        where = (e["kernel"], e["variant"], e["config"]["name"], e["arch"])
        assert e["spill_stores_bytes"] == 0 and e["spill_loads_bytes"] == 0, where
        assert e["shared_mem_bytes"] < 48 * 1024, where
        # TensorRT's AOT convention: input pointers, int32 scalars, output pointer, nothing else
        params = _entry_params(ptx)
        sig = [t for t in spec.full_signature().values() if t != "constexpr"]
        assert len(params) == len(sig), where
        for p, t in zip(params, sig):
            assert (".u32" in p) == (t == "i32") and (".u64" in p) == t.startswith("*"), (where, p, t)
        assert sig[-1] == "*fp32" and list(spec.signature)[-1] in ("a_ptr", "y_ptr")


def _reads_param(ptx: str, index: int) -> bool:
    """Whether the kernel body loads its ``index``-th .param (0-based)."""
    name = _entry_params(ptx)[index].split()[-1]
    return re.search(r"\[" + re.escape(name) + r"\]", ptx.split("{", 1)[1]) is not None


def test_one_fused_variant_compiles(tmp_path):
    """Fast: the gated silu variant's two kernels and the TEAL (input_threshold) variant's up kernel,
    decode and prefill tiles, sm_90; only the TEAL up kernel reads INPUT_THRESHOLD_BITS."""
    pytest.importorskip("triton")
    from ffsplit_export.trt.aot import compile_all
    from ffsplit_export.trt.configs import CONFIGS, fused_ffn_specs

    teal = [s for s in fused_ffn_specs() if s.kernel == "ffn_nbits_up_kernel" and s.fixed_constexprs["SKIP"]]
    teal = [s for s in teal if not s.fixed_constexprs["GATED"] and s.fixed_constexprs["ACT"] == 1]
    assert len(teal) == 1, teal
    specs = fused_ffn_specs()[:2] + teal
    cfgs = [CONFIGS[0], CONFIGS[2]]
    summary = compile_all(tmp_path, [90], specs=specs, configs=cfgs)
    _check(tmp_path, summary, len(specs) * len(cfgs))
    for e in summary["kernels"]:
        if e["kernel"] != "FusedFFNNBitsUp":
            continue
        sig = [k for k, t in specs[0].full_signature().items() if t != "constexpr"]
        reads = _reads_param((tmp_path / e["ptx"]).read_text(), sig.index("INPUT_THRESHOLD_BITS"))
        assert reads == (e["variant"] == teal[0].variant), (e["variant"], e["config"]["name"])


@pytest.mark.slow
def test_every_fused_variant_compiles_for_both_archs(tmp_path):
    """Every AOT variant x tile config x sm_80 / sm_90 (~70 s cold, ~14 s from triton's cache): no spills (the specs'
    BLOCK_K 16 for tl.dot tiles and maxnreg 255 are what makes this hold)."""
    pytest.importorskip("triton")
    from ffsplit_export.trt.aot import compile_all
    from ffsplit_export.trt.configs import CONFIGS, fused_ffn_specs

    summary = compile_all(tmp_path, [80, 90], specs=fused_ffn_specs())
    _check(tmp_path, summary, 2 * len(fused_ffn_specs()) * len(CONFIGS))


def test_specs_name_their_variant_and_reject_bad_values():
    from ffsplit_export.trt.configs import CONFIGS, fused_ffn_kernel_specs

    kw = dict(heavy_bits=8, light_bits=4, heavy_zp=True, light_zp=False, gated=True, activation="silu",
              skip=True, up_bias=True, gate_bias=True, down_bias=False)  # fmt: skip
    up, down = fused_ffn_kernel_specs(**kw)
    assert up.kernel == "ffn_nbits_up_kernel" and down.kernel == "ffn_nbits_down_kernel"
    assert up.fixed_constexprs["HEAVY_BITS"] == 8 and up.fixed_constexprs["HEAVY_ZP"] is True
    assert up.fixed_constexprs["ACT"] == 3 and up.fixed_constexprs["GATED"] and up.fixed_constexprs["SKIP"]
    assert down.fixed_constexprs["HAS_DOWN_BIAS"] is False and up.constexprs(CONFIGS[2])["BLOCK_K"] == 16
    assert up.signature["uh_b_ptr"] == "*u8" and up.signature["THRESHOLD_BITS"] == "i32"
    # the thresholds' float32 bits, then a: TensorRT passes the int32 args in this order (plugin.py)
    assert list(up.signature)[-4:] == [
        "THRESHOLD_BITS", "PRODUCT_THRESHOLD_BITS", "INPUT_THRESHOLD_BITS", "a_ptr"
    ]  # fmt: skip
    dense, _ = fused_ffn_kernel_specs(**{**kw, "heavy_bits": 32})
    assert dense.signature["uh_b_ptr"] == "*fp32" and dense.fixed_constexprs["HEAVY_ZP"] is False
    wide, _ = fused_ffn_kernel_specs(**kw, byte_elems="i32")
    assert wide.signature["ul_b_ptr"] == "*i32" and wide.variant != up.variant
    for bad in ({"light_bits": 32}, {"heavy_bits": 2}, {"activation": "tanh"}):
        with pytest.raises(ConfigError):
            fused_ffn_kernel_specs(**{**kw, **bad})
    with pytest.raises(ConfigError, match="byte_elems"):
        fused_ffn_kernel_specs(**kw, byte_elems="i16")

"""ffsplit::FusedFFNNBits' Triton kernels vs the NumPy reference, under the Triton interpreter on CPU.

As in test_triton_kernels.py, TRITON_INTERPRET=1 must be set before triton is imported, so the
cases run in a child process (this file run as a script) that prints one JSON line per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

# Max abs error allowed: float32 accumulation (and float32 activations) against the float64
# reference rounded to float32. Measured max over every case x config x layout: 9.5e-07 (finite |Y| <= 6.2);
# the input_threshold (TEAL) cases: 4.8e-07.
ATOL = 1e-4
RTOL = 1e-5

# name: (M, D, F, H, attributes, part kinds, target skipped fraction of light neurons or None)
# part kinds: heavy_bits, light_bits, block sizes, zero_points (asymmetric grid), biases
CASES = {
    # gated silu, dense heavy, int4 symmetric light, M = 1, odd sizes, threshold skipping ~half
    "silu_gated_h32_l4_m1_thr": (1, 45, 37, 5, dict(activation="silu", gated=1, skip=1), dict(
        heavy_bits=32, light_bits=4, heavy_block_size=16, light_block_size=16, zero_points=False), 0.5),
    # gated silu, int8 heavy, int8 light symmetric, M = 3, no skipping
    "silu_gated_h8_l8_m3": (3, 40, 29, 7, dict(activation="silu", gated=1), dict(
        heavy_bits=8, light_bits=8, heavy_block_size=32, light_block_size=32, zero_points=False), None),
    # ungated gelu, dense heavy, int4 light with zero points, biases, M = 5
    "gelu_h32_l4z_m5": (5, 33, 27, 4, dict(activation="gelu"), dict(
        heavy_bits=32, light_bits=4, heavy_block_size=16, light_block_size=32, zero_points=True), None),
    # ungated gelu, int8 heavy and int8 light with zero points, threshold skipping ~half, M = 2
    "gelu_h8z_l8z_m2_thr": (2, 50, 41, 6, dict(activation="gelu", skip=1), dict(
        heavy_bits=8, light_bits=8, heavy_block_size=16, light_block_size=16, zero_points=True), 0.5),
    # relu exact skipping (zeros only), no heavy part (H = 0), int4 light with zero points
    "relu_h0_l4z_m2_exact": (2, 24, 19, 0, dict(activation="relu", skip=1), dict(
        heavy_bits=32, light_bits=4, heavy_block_size=16, light_block_size=16, zero_points=True, bias=False),
        None),
    # product threshold only (|act(gate) * up|), int8 heavy, int4 light with zero points
    "silu_gated_h8_l4z_m3_prod": (3, 40, 45, 6, dict(activation="silu", gated=1, skip=1), dict(
        heavy_bits=8, light_bits=4, heavy_block_size=16, light_block_size=16, zero_points=True), None),
    # both thresholds ("mixed"): a small one on |act(gate)| and the product one
    "silu_gated_h32_l8_m2_mixed": (2, 36, 50, 5, dict(activation="silu", gated=1, skip=1), dict(
        heavy_bits=32, light_bits=8, heavy_block_size=16, light_block_size=32, zero_points=False), 0.1),
    # an inf down-light scale (row 3, first block of 16 light neurons): Y[:, 3] is inf / NaN for a
    # token with a live neuron in that block and finite where the threshold skips all 16 of them
    "relu_infdown_m6_thr": (6, 20, 35, 3, dict(activation="relu", skip=1), dict(
        heavy_bits=32, light_bits=8, heavy_block_size=16, light_block_size=16, zero_points=True), 0.85),
    # TEAL input skipping (INPUT below), ungated: gelu, dense heavy, int4 light with zero points, M = 1
    "gelu_in_h32_l4z_m1": (1, 40, 30, 5, dict(activation="gelu", skip=1), dict(
        heavy_bits=32, light_bits=4, heavy_block_size=16, light_block_size=16, zero_points=True), None),
    # ... with neuron threshold skipping too, int8 heavy, int8 light symmetric, M = 3
    "gelu_in_h8_l8_m3_thr": (3, 36, 33, 4, dict(activation="gelu", skip=1), dict(
        heavy_bits=8, light_bits=8, heavy_block_size=16, light_block_size=32, zero_points=False), 0.4),
    # ... relu, no heavy part, a NaN (row 0) and an inf (row 1) in X (NONFINITE_X), row 2 finite
    "relu_in_h0_l8z_m3_nanx": (3, 24, 21, 0, dict(activation="relu", skip=1), dict(
        heavy_bits=32, light_bits=8, heavy_block_size=16, light_block_size=16, zero_points=True, bias=False),
        None),
}  # fmt: skip
# M > 8 (only the tl.dot configs) and several tiles of neurons (all twelve cases: ~8 s in the interpreter)
SLOW_CASES = {
    "gelu_tanh_gated_h4_l4_m17_thr": (17, 48, 70, 9, dict(activation="gelu_tanh", gated=1, skip=1), dict(
        heavy_bits=4, light_bits=4, heavy_block_size=32, light_block_size=16, zero_points=False), 0.4),
    "silu_gated_h32_l8z_m11": (11, 37, 66, 33, dict(activation="silu", gated=1), dict(
        heavy_bits=32, light_bits=8, heavy_block_size=16, light_block_size=64, zero_points=True), None),
    "gelu_gated_h32_l4_m12_prod": (12, 30, 41, 4, dict(activation="gelu", gated=1, skip=1), dict(
        heavy_bits=32, light_bits=4, heavy_block_size=16, light_block_size=32, zero_points=False), None),
    "relu_infdown_m17_thr": (17, 20, 35, 3, dict(activation="relu", skip=1), dict(
        heavy_bits=32, light_bits=8, heavy_block_size=16, light_block_size=16, zero_points=True), 0.85),
    # TEAL input skipping at M = 10 (tl.dot tiles), int4 heavy and light, a NaN in X (row 4)
    "gelu_in_h4_l4_m10_thr_nanx": (10, 40, 45, 6, dict(activation="gelu", skip=1), dict(
        heavy_bits=4, light_bits=4, heavy_block_size=32, light_block_size=16, zero_points=False), 0.3),
}  # fmt: skip
#: gated cases with a product_threshold skipping about this fraction (with threshold too: "mixed")
PRODUCT = {
    "silu_gated_h8_l4z_m3_prod": 0.4,
    "silu_gated_h32_l8_m2_mixed": 0.4,
    "gelu_gated_h32_l4_m12_prod": 0.5,
}
#: cases whose down light scale [row * n_blocks + block] is set to +inf
NONFINITE = {"relu_infdown_m6_thr": (3, 0), "relu_infdown_m17_thr": (3, 0)}
#: ungated cases with an input_threshold that zeroes about this fraction of X's entries for the light up
INPUT = {
    "gelu_in_h32_l4z_m1": 0.5,
    "gelu_in_h8_l8_m3_thr": 0.3,
    "relu_in_h0_l8z_m3_nanx": 0.5,
    "gelu_in_h4_l4_m10_thr_nanx": 0.5,
}
#: cases with one X entry set to -input_threshold exactly (|x| <= t: zeroed, the boundary included)
TIE_X = {"gelu_in_h32_l4z_m1": (0, 11)}
#: cases with non-finite X entries {(row, channel): value}; |NaN| <= t is false, so X' keeps them
NONFINITE_X = {
    "relu_in_h0_l8z_m3_nanx": {(0, 3): np.nan, (1, 7): np.inf},
    "gelu_in_h4_l4_m10_thr_nanx": {(4, 9): np.nan},
}


def _err(y: np.ndarray, ref: np.ndarray) -> float:
    """Max |y - ref| over the finite entries; inf when the NaN / +inf / -inf entries differ."""
    for test in (np.isnan, np.isposinf, np.isneginf):
        if not np.array_equal(test(y), test(ref)):
            return float("inf")
    ok = np.isfinite(ref)
    return float(np.abs(y[ok] - ref[ok]).max()) if ok.any() else 0.0


def _inputs(name: str):
    """(x, inputs 1..21, attrs, skipped fraction of the reference) of one case, seeded by name."""
    import zlib

    from ffsplit_export.ops._ffn import (
        NBITS_PARTS,
        _nbits_weight,
        activation,
        fused_ffn_nbits_reference,
        random_nbits_ffn_inputs,
        zero_silent_channels,
    )

    m, d, f, h, attrs, kinds, frac = {**CASES, **SLOW_CASES}[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    ins = random_nbits_ffn_inputs(rng, d, f, h, gated=bool(attrs.get("gated")), **kinds)
    x = rng.standard_normal((m, d)).astype(np.float32)
    if name in NONFINITE:
        row, block = NONFINITE[name]
        ins[11] = ins[11].copy()  # down light scales [D * n_blocks]
        ins[11][row * -(-(f - h) // kinds["light_block_size"]) + block] = np.inf
    for (row, col), v in NONFINITE_X.get(name, {}).items():
        x[row, col] = v
    attrs = {
        **attrs,
        "heavy_bits": kinds["heavy_bits"],
        "light_bits": kinds["light_bits"],
        "heavy_block_size": kinds["heavy_block_size"],
        "light_block_size": kinds["light_block_size"],
    }

    def light_pre(prefix):  # float64 pre-activation of the light neurons (up: from X')
        i = NBITS_PARTS[f"{prefix}_light"] - 1
        w = _nbits_weight(ins[i : i + 3], "light", None, d, kinds["light_bits"], kinds["light_block_size"])
        xl = zero_silent_channels(x, attrs.get("input_threshold", 0.0)) if prefix == "up" else x
        pre = np.nan_to_num(xl, nan=0.0, posinf=0.0).astype(np.float64) @ w.astype(np.float64).T
        bias = ins[6 if prefix == "up" else 20]
        return pre + bias[h:] if bias is not None else pre

    def cut(scores, fraction):
        # in the widest gap of the sorted scores near the target fraction, so a float32 rounding
        # difference cannot move a neuron across it
        v = np.sort(np.abs(scores).ravel())
        lo, hi = int(len(v) * (fraction - 0.1)), int(len(v) * (fraction + 0.1))
        j = lo + int(np.argmax(np.diff(v[lo : hi + 1])))
        return float((v[j] + v[j + 1]) / 2)

    if name in INPUT:  # TEAL: |x| at about that quantile
        attrs["input_threshold"] = float(np.float32(cut(x[np.isfinite(x)], INPUT[name])))
        if name in TIE_X:
            x[TIE_X[name]] = -np.float32(attrs["input_threshold"])
    score = activation(attrs["activation"], light_pre("gate" if attrs.get("gated") else "up"))
    if frac is not None:
        attrs["threshold"] = cut(score, frac)
    if name in PRODUCT:  # CATS-style on |act(gate) * up| (gated only)
        attrs["product_threshold"] = cut(score * light_pre("up"), PRODUCT[name])
    _, skipped = fused_ffn_nbits_reference(
        x, *ins, activation_kind=attrs["activation"], **{k: v for k, v in attrs.items() if k != "activation"},
        return_skipped=True,
    )  # fmt: skip
    return x, ins, attrs, float(skipped.mean()) if skipped.size else 0.0


def _layouts(ins):
    """disk: uint8 as stored; int32: the byte-identical int32 view; wide: one byte per int32."""
    from ffsplit_export.trt.layout import bytes_as_int32_rows

    def view(a):
        return bytes_as_int32_rows(a) if a is not None and a.dtype == np.uint8 else a

    def widen(a):
        return a.astype(np.int32) if a is not None and a.dtype == np.uint8 else a

    return {
        "disk": (ins, "u8"),
        "int32": ([view(a) for a in ins], "u8"),
        "wide": ([widen(a) for a in ins], "i32"),
    }


def _worker(names: list[str]) -> None:
    import torch

    from ffsplit_export.ops._ffn import fused_ffn_nbits_reference
    from ffsplit_export.trt.configs import CONFIGS
    from ffsplit_export.trt.fused_kernels import launch_fused_ffn

    for name in names:
        x, ins, attrs, frac = _inputs(name)
        act = attrs.pop("activation")
        ref = fused_ffn_nbits_reference(x, *ins, activation_kind=act, **attrs)
        off = {"skip": 0, "threshold": 0.0, "product_threshold": 0.0, "input_threshold": 0.0}
        plain = fused_ffn_nbits_reference(x, *ins, activation_kind=act, **{**attrs, **off})
        effect = _err(plain, ref)  # what skipping changes (0 for exact relu zeros)
        in_effect = 0.0  # what the input threshold alone changes, on the finite rows
        if attrs.get("input_threshold"):
            no_in = fused_ffn_nbits_reference(
                x, *ins, activation_kind=act, **{**attrs, "input_threshold": 0.0}
            )
            fin = np.isfinite(x).all(axis=1)
            in_effect = _err(no_in[fin], ref[fin])
        m = x.shape[0]
        cfgs = [c for c in CONFIGS if c.block_m >= m][:1] + ([CONFIGS[2]] if m <= 8 else [])
        for cfg in cfgs:
            for lname, (ws, elems) in _layouts(ins).items():
                if lname != "disk" and cfg is not cfgs[0]:
                    continue
                y = launch_fused_ffn(
                    torch.from_numpy(x),
                    *(None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in ws),
                    activation=act, config=cfg, byte_elems=elems, **attrs,
                )  # fmt: skip
                err = _err(y.numpy(), ref)
                out = {
                    "case": f"{name}/{cfg.name}/{lname}",
                    "err": err,
                    "ref_max": float(np.nanmax(np.abs(np.where(np.isinf(ref), 0, ref)))),
                }
                col = ref[:, NONFINITE[name][0]] if name in NONFINITE else ref[:, 0]
                out["col_finite"] = int(np.isfinite(col).sum())
                out["nonfinite_rows"] = [bool(~np.isfinite(ref[r]).all()) for r in range(ref.shape[0])]
                print(
                    json.dumps({**out, "skipped": frac, "effect": effect, "in_effect": in_effect}), flush=True
                )
        # batched X [B, T, D] takes the reshape path
        x3 = np.stack([x, x])
        y3 = launch_fused_ffn(torch.from_numpy(x3), *(None if a is None else torch.from_numpy(a) for a in ins),
                              activation=act, **attrs)  # fmt: skip
        err = _err(y3.numpy(), np.stack([ref, ref]))
        print(
            json.dumps(
                {
                    "case": f"{name}/3d",
                    "err": err,
                    "ref_max": float(np.nanmax(np.abs(np.where(np.isinf(ref), 0, ref)))),
                    "skipped": frac,
                }
            )
        )


def _split_model(name):
    """(x, original one-node model, the model after split_fused_ffn, reference Y) of one case."""
    from ffsplit_export.ops._ffn import fused_ffn_nbits_model, fused_ffn_nbits_reference
    from ffsplit_export.trt.fused_nodes import split_fused_ffn

    x, ins, attrs, _ = _inputs(name)
    act = attrs.pop("activation")
    model = fused_ffn_nbits_model(ins, activation=act, **attrs)
    ref = fused_ffn_nbits_reference(x, *ins, activation_kind=act, **attrs)
    before = model.SerializeToString()
    assert split_fused_ffn(model) == 1
    return x, before, model, ref


def _node_worker(names: list[str]) -> None:
    """Child process: the two plugin nodes' own inputs and attributes drive the kernels."""
    import torch
    from onnx import helper, numpy_helper

    from ffsplit_export.trt.fused_kernels import launch_plugin_nodes

    for name in names:
        x, _, model, ref = _split_model(name)
        inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
        up, down = model.graph.node
        attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in (up, down)]
        for a in attrs:
            a["activation"] = a.get("activation", b"").decode()
        y = launch_plugin_nodes(
            torch.from_numpy(x), [inits[i] for i in up.input[1:]], [inits[i] for i in down.input[1:]], *attrs
        )
        err = _err(y.numpy(), ref)
        print(
            json.dumps(
                {
                    "case": f"{name}/nodes",
                    "err": err,
                    "ref_max": float(np.nanmax(np.abs(np.where(np.isinf(ref), 0, ref)))),
                }
            )
        )


def _run(names):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(names, results):
    for name in names:
        rows = [r for r in results if r["case"].startswith(name + "/")]
        assert len(rows) >= 4, (name, rows)  # every layout and the 3-D input ran
        frac = max({**CASES, **SLOW_CASES}[name][-1] or 0.0, PRODUCT.get(name, 0.0))
        if frac:  # the thresholds really skip about that fraction, and that changes Y
            assert abs(rows[0]["skipped"] - frac) <= 0.15, rows[0]
            assert rows[0]["effect"] > 100 * ATOL, rows[0]
        if name in NONFINITE:  # both outcomes occur in the inf column: some tokens finite, some not
            assert 0 < rows[0]["col_finite"] < {**CASES, **SLOW_CASES}[name][0], rows[0]
        if name in INPUT:  # zeroing X's silent channels for the light up changes Y (finite rows)
            assert rows[0]["in_effect"] > 100 * ATOL, rows[0]
        if name in NONFINITE_X:  # X' keeps NaN / inf: exactly the rows holding one are non-finite
            want = [
                any(r == row for r, _ in NONFINITE_X[name]) for row in range(len(rows[0]["nonfinite_rows"]))
            ]
            assert rows[0]["nonfinite_rows"] == want, rows[0]
    bad = [r for r in results if not r["err"] <= ATOL + RTOL * r["ref_max"]]
    assert not bad, bad[:5]


def test_fused_ffn_kernels_match_reference_in_interpreter():
    names = list(CASES)
    _check(names, _run(names))


def test_fused_ffn_kernels_dot_configs_in_interpreter():
    names = list(SLOW_CASES)
    _check(names, _run(names))


def test_relu_exact_case_skips_zeros():
    """The exact-skip case is meaningful: the reference really skips light neurons (relu zeros)."""
    _, _, _, frac = _inputs("relu_h0_l4z_m2_exact")
    assert 0.2 < frac < 0.8


def test_launch_rejects_bad_input():
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    from ffsplit_export.errors import FormatError
    from ffsplit_export.trt.fused_kernels import launch_fused_ffn

    x, ins, attrs, _ = _inputs("silu_gated_h8_l8_m3")
    t = [None if a is None else torch.from_numpy(a) for a in ins]
    act = attrs.pop("activation")
    with pytest.raises(FormatError, match="input_threshold=0.1 needs gated=0"):  # TEAL is for ungated FFNs
        launch_fused_ffn(torch.from_numpy(x), *t, activation=act, input_threshold=0.1, **attrs)
    xu, insu, attrsu, _ = _inputs("gelu_in_h32_l4z_m1")
    tu = [None if a is None else torch.from_numpy(a) for a in insu]
    actu = attrsu.pop("activation")
    for bad, want in (
        ({"input_threshold": -0.5}, ">= 0"),
        ({"input_threshold": float("nan")}, "finite"),
        ({"skip": 0}, "skip=1"),
    ):
        with pytest.raises(FormatError, match=want):
            launch_fused_ffn(torch.from_numpy(xu), *tu, activation=actu, **{**attrsu, **bad})
    with pytest.raises(FormatError, match="float32"):
        launch_fused_ffn(torch.from_numpy(x).double(), *t, activation=act, **attrs)
    with pytest.raises(FormatError, match="activation"):
        launch_fused_ffn(torch.from_numpy(x), *t, activation="tanh", **attrs)
    with pytest.raises(FormatError, match="threshold"):
        launch_fused_ffn(torch.from_numpy(x), *t, activation=act, **{**attrs, "threshold": 0.5})  # skip=0
    with pytest.raises(FormatError, match="gate"):
        launch_fused_ffn(torch.from_numpy(x), *t, activation=act, **{**attrs, "gated": 0})
    empty = launch_fused_ffn(torch.zeros(2, 0, x.shape[1]), *t, activation=act, **attrs)  # no tokens
    assert tuple(empty.shape) == (2, 0, x.shape[1])


def test_split_fused_ffn_writes_two_plugin_nodes():
    """The TensorRT form: Up + Down nodes with the plugin attributes, every input an initializer,
    no UINT8 left (int32 view), the original weights dropped."""
    import onnx

    from ffsplit_export.trt.fused_nodes import DOWN_INPUTS, DOWN_OP, UP_INPUTS, UP_OP
    from ffsplit_export.trt.onnx_nodes import check_plugin_node

    for name in ("silu_gated_h32_l4_m1_thr", "relu_h0_l4z_m2_exact", "gelu_in_h8_l8_m3_thr"):
        _, before, model, _ = _split_model(name)
        up, down = model.graph.node
        assert (up.op_type, down.op_type) == (UP_OP, DOWN_OP)
        assert check_plugin_node(up) is None and check_plugin_node(down) is None
        assert len(up.input) == 1 + len(UP_INPUTS) and len(down.input) == 1 + len(DOWN_INPUTS)
        assert up.input[0] == "X" and down.input[0] == up.output[0] and down.output[0] == "Y"
        inits = {t.name: t for t in model.graph.initializer}
        assert all(i in inits for i in [*up.input[1:], *down.input[1:]])
        assert all(t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT32) for t in inits.values())
        assert not any(n.startswith("w") for n in inits)  # the FusedFFNNBits initializers are gone
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in up.attribute}
        orig = onnx.load_from_string(before)
        want_h = {"silu": 5, "relu": 0, "gelu": 4}[name[:4]]
        assert attrs["heavy_neurons"] == want_h and attrs["skip"] == 1
        assert attrs["threshold"] > 0 if "thr" in name else attrs["threshold"] == 0
        orig_attrs = {a.name: onnx.helper.get_attribute_value(a) for a in orig.graph.node[0].attribute}
        assert attrs["input_threshold"] == orig_attrs.get("input_threshold", 0.0)
        assert (attrs["input_threshold"] > 0) == (name in INPUT)
        assert len(orig.graph.node) == 1


def test_split_rejects_bad_input_threshold():
    """input_threshold is checked as the op checks it (ungated, skip=1, finite >= 0)."""
    from onnx import helper

    from ffsplit_export.errors import FormatError
    from ffsplit_export.ops._ffn import fused_ffn_nbits_model
    from ffsplit_export.trt.fused_nodes import split_fused_ffn

    for name, value, want in (
        ("silu_gated_h8_l8_m3", 0.25, "needs gated=0"),
        ("gelu_in_h32_l4z_m1", -0.25, ">= 0"),
    ):
        _, ins, attrs, _ = _inputs(name)
        attrs.pop("input_threshold", None)
        model = fused_ffn_nbits_model(ins, **attrs)
        model.graph.node[0].attribute.append(helper.make_attribute("input_threshold", value))
        with pytest.raises(FormatError, match=want):
            split_fused_ffn(model)


def test_plugin_nodes_match_reference_in_interpreter():
    """The plugin nodes' inputs (int32 view, dummies) and attributes, fed to the kernels as
    plugin.py feeds them, give the reference of the original FusedFFNNBits node."""
    names = ["silu_gated_h32_l4_m1_thr", "gelu_h8z_l8z_m2_thr", "relu_h0_l4z_m2_exact", "silu_gated_h8_l8_m3"]
    names += ["gelu_in_h8_l8_m3_thr", "relu_in_h0_l8z_m3_nanx"]  # input_threshold (TEAL), NaN / inf in X
    results = _run(["nodes", *names])
    assert len(results) == len(names)
    bad = [r for r in results if not r["err"] <= ATOL + RTOL * r["ref_max"]]
    assert not bad, bad


if __name__ == "__main__":
    if sys.argv[1] == "nodes":
        _node_worker(sys.argv[2:])
    else:
        _worker(sys.argv[1:])

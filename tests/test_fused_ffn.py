"""``ffsplit::FusedFFN``: the ONNX Runtime kernel against the NumPy reference, the PyTorch module
against the reference, bad nodes refused at session creation, and fused exports of tiny models.

Skips the ONNX Runtime parts cleanly when the library is not built.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffsplit_export.errors import ConfigError, PluginNotFoundError
from ffsplit_export.ops import fused_ffn_reference, skipped_fraction
from ffsplit_export.ops._ffn import fused_ffn_model, random_ffn_inputs
from ffsplit_export.runtime._plugin import plugin_path, session_options

ort = pytest.importorskip("onnxruntime")
try:
    plugin_path()
    _MISSING = ""
except PluginNotFoundError as _e:
    _MISSING = str(_e)
needs_plugin = pytest.mark.skipif(bool(_MISSING), reason=f"ffsplit ORT library not built: {_MISSING}")

ACTS = ("relu", "gelu", "gelu_tanh", "silu")


def _session(model, isa: str | None = None, monkeypatch=None):
    if isa is not None:
        monkeypatch.setenv("FFSPLIT_ISA", isa)
    return ort.InferenceSession(
        model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
    )


def _close(y, r, rtol=1e-5):
    # float32 accumulation over K <= 200 terms of magnitude ~1: measured max |diff| ~1e-6
    scale = max(1.0, float(np.abs(r[np.isfinite(r)]).max(initial=0.0)))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(r))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(r))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(r))
    fin = np.isfinite(r)
    np.testing.assert_allclose(y[fin], r[fin], rtol=0, atol=rtol * scale * 10)


@needs_plugin
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("gated", [0, 1])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("skip", [0, 1])
def test_kernel_matches_reference(isa, gated, act, skip, monkeypatch):
    from ffsplit_export.ops._spec import register_schemas

    register_schemas()
    rng = np.random.default_rng([gated, ACTS.index(act), skip])
    d, f, h = 72, 203, 21  # odd sizes: partial mask bytes / words, chunk tails
    ins = random_ffn_inputs(rng, d, f, h, 0.5, bool(gated))
    try:
        sess = _session(fused_ffn_model(ins, act, gated, skip), isa, monkeypatch)
    except Exception as e:  # an ISA this CPU lacks
        if "not supported by this CPU" in str(e):
            pytest.skip(f"{isa} not supported here")
        raise
    for m in (1, 16, 37):
        x = rng.standard_normal((m, d)).astype(np.float32)
        _close(
            sess.run(None, {"X": x})[0],
            fused_ffn_reference(x, *ins, activation_kind=act, gated=gated, skip=skip),
        )
    x3 = rng.standard_normal((2, 3, d)).astype(np.float32)  # rank 3
    y3 = sess.run(None, {"X": x3})[0]
    assert y3.shape == x3.shape
    _close(y3, fused_ffn_reference(x3, *ins, activation_kind=act, gated=gated, skip=skip))


@needs_plugin
@pytest.mark.parametrize("h,f", [(0, 40), (40, 40), (1, 2)])
def test_empty_heavy_or_light(h, f):
    rng = np.random.default_rng(3)
    ins = random_ffn_inputs(rng, 24, f, h, 0.75, True)
    sess = _session(fused_ffn_model(ins, "silu", 1, 1))
    x = rng.standard_normal((5, 24)).astype(np.float32)
    _close(sess.run(None, {"X": x})[0], fused_ffn_reference(x, *ins, activation_kind="silu", gated=1, skip=1))


@needs_plugin
@pytest.mark.parametrize("skip", [0, 1])
def test_non_finite_semantics(skip):
    """NaN / inf in X and an inf scale in the light down weight: same NaN / inf positions as the reference
    (with skip=1 a zero activation keeps an inf down column out of the output)."""
    rng = np.random.default_rng(5)
    ins = random_ffn_inputs(rng, 40, 96, 8, 0.5, False)
    ins[10] = ins[10].copy()
    ins[10][[3, 17]] = np.inf  # down_scales of two output rows
    sess = _session(fused_ffn_model(ins, "relu", 0, skip))
    x = rng.standard_normal((6, 40)).astype(np.float32)
    x[1, 4] = np.nan
    x[2, 9] = np.inf
    r = fused_ffn_reference(x, *ins, activation_kind="relu", gated=0, skip=skip)
    _close(sess.run(None, {"X": x})[0], r)
    assert np.isnan(r[1]).all()


@needs_plugin
def test_exact_skip_is_lossless_on_relu():
    rng = np.random.default_rng(7)
    ins = random_ffn_inputs(rng, 64, 256, 26, 0.5, False)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    y0 = _session(fused_ffn_model(ins, "relu", 0, 0)).run(None, {"X": x})[0]
    y1 = _session(fused_ffn_model(ins, "relu", 0, 1)).run(None, {"X": x})[0]
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-5)  # summation order only (measured ~5e-7)
    frac = skipped_fraction(x, *ins, activation_kind="relu", gated=0)
    assert 0.3 < frac < 0.7  # random pre-activations: about half the ReLUs are zero


@needs_plugin
@pytest.mark.parametrize(
    "change,msg",
    [
        (lambda ins, kw: kw.update(activation="tanh"), "activation 'tanh'"),
        (lambda ins, kw: kw.update(gated=1), "takes 19 inputs"),
        (lambda ins, kw: kw.update(skip=2), "skip must be"),
        (lambda ins, kw: ins.__setitem__(4, ins[4][::-1].copy()), "row_ptr"),
        (lambda ins, kw: ins.__setitem__(6, ins[6][:, :-1].copy()), "down_heavy"),
        (lambda ins, kw: ins.__setitem__(1, ins[1][:-1].copy()), "up_bias"),
    ],
)
def test_bad_nodes_fail_at_creation(change, msg):
    from onnx import helper

    rng = np.random.default_rng(9)
    ins = random_ffn_inputs(rng, 16, 48, 8, 0.5, False)
    kw = {"activation": "relu", "gated": 0, "skip": 0}
    change(ins, kw)
    model = fused_ffn_model(ins, "relu", 0, 0)
    node = model.graph.node[0]
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute(k, v) for k, v in kw.items()])
    with pytest.raises(Exception, match=msg):
        _session(model)


@needs_plugin
def test_weights_must_be_constant():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(11)
    ins = random_ffn_inputs(rng, 16, 48, 8, 0.5, False)
    model = fused_ffn_model(ins, "relu", 0, 0)
    init = model.graph.initializer[0]
    model.graph.input.append(helper.make_tensor_value_info(init.name, TensorProto.FLOAT, list(init.dims)))
    del model.graph.initializer[0]
    with pytest.raises(Exception, match="constant initializer"):
        _session(model)


def test_reference_evaluator_runs_the_op():
    from onnx.reference import ReferenceEvaluator

    from ffsplit_export.ops import reference_ops

    rng = np.random.default_rng(13)
    ins = random_ffn_inputs(rng, 16, 40, 4, 0.5, True)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    ev = ReferenceEvaluator(fused_ffn_model(ins, "gelu_tanh", 1, 1), new_ops=reference_ops())
    np.testing.assert_array_equal(
        ev.run(None, {"X": x})[0], fused_ffn_reference(x, *ins, activation_kind="gelu_tanh", gated=1, skip=1)
    )


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt", "tiny-t5-gated"])
def test_module_computes_the_op(name):
    """The PyTorch FusedFFN module (what validation compares with) equals the NumPy reference of the
    node it exports, and the fused model equals the split model it replaces."""
    from ffsplit_export.adapters import find_ffns
    from ffsplit_export.fused import FusedFFN, fuse_ffns_
    from ffsplit_export.models.tiny import build_tiny
    from ffsplit_export.pipeline import compress

    model, pre, _ = build_tiny(name)
    res = compress(model, pre, num_samples=4, progress=False)
    batch = res.batches[0].inputs
    with torch.no_grad():
        before = res.model(**batch)[0]
    rec = fuse_ffns_(res.model, 1, find_ffns(res.model))
    assert rec["fused"] == len(find_ffns(model)) and not rec["kept_subgraph"]
    with torch.no_grad():
        after = res.model(**batch)[0]
    # measured 0 (relu, silu: same arithmetic); 1.5e-5 on logits ~1 for gelu_new vs F.gelu(tanh)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    mods = [m for m in res.model.modules() if isinstance(m, FusedFFN)]
    assert mods
    for m in mods[:2]:
        x = torch.randn(3, m.up_in_features())
        ins = [t.numpy() for t in m.onnx_inputs()]
        ref = fused_ffn_reference(
            x.numpy(), *ins, activation_kind=m.kind, gated=int(m.gate is not None), skip=m.skip
        )
        np.testing.assert_allclose(m(x).detach().numpy(), ref, rtol=0, atol=1e-5)  # measured ~5e-7


def test_bad_activation_sparsity():
    from ffsplit_export.export.core import ExportOptions

    for bad in ("-0.1", "1", "1.5", "abc", "nan", ""):
        with pytest.raises(ConfigError, match="--activation-sparsity") as e:
            ExportOptions(activation_sparsity=bad)
        assert "\n" not in str(e.value) and "0 < F < 1" in str(e.value)
    # tensorrt: the kernels compute level 0; the message names the fused options given
    for kw, flag in (
        ({"fused_ffn": True}, "--fused-ffn"),
        ({"activation_sparsity": "exact"}, "--activation-sparsity=exact"),
        ({"input_sparsity": "0.3"}, "--input-sparsity=0.3"),
    ):
        assert ExportOptions(target="tensorrt", **kw).fused_trt
        with pytest.raises(ConfigError, match="--nbits-accuracy-level=4") as e:
            ExportOptions(target="tensorrt", nbits_accuracy_level=4, **kw)
        assert flag in str(e.value) and "level 0" in str(e.value)
    with pytest.raises(ConfigError, match="--target ort-cpu"):
        ExportOptions(target="portable", activation_sparsity="0.4")
    assert ExportOptions(activation_sparsity="exact").skip_mode == 1
    opts = ExportOptions(activation_sparsity="0.4")
    assert opts.skip_mode == 1 and opts.sparsity.fraction == 0.4 and opts.sparsity.label == 0.4
    assert ExportOptions(activation_sparsity="0.0").skip_mode == 0


@pytest.mark.parametrize("bad", ["-0.2", "1.0", "abc"])
def test_bad_activation_sparsity_cli(bad, tmp_path, capsys):
    """The CLI prints one line and exits 2 before loading anything."""
    from ffsplit_export.cli import main

    try:  # argparse's own type check exits (SystemExit 2); later checks return 2
        rc = main(["export", "tiny-llama", str(tmp_path / "out"), "--activation-sparsity", bad])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert "--activation-sparsity" in err and err.count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_eval_activation_sparsity_needs_compress(capsys):
    from ffsplit_export.cli import main

    assert main(["eval", "tiny-llama", "--pytorch", "--activation-sparsity", "0.4"]) == 2
    assert "--compress" in capsys.readouterr().err


def _quantile_threshold(x, ins, act, gated, q):
    """A threshold that skips about a fraction q of the light neurons of x (from the reference's s)."""
    from ffsplit_export.ops._ffn import activation
    from ffsplit_export.ops._spec import reference_matmul

    h = ins[0].shape[0]
    lin = (ins[12], ins[13], ins[14:18]) if gated else (ins[0], ins[1], ins[2:6])
    pre = reference_matmul("SparseMatMulInt8", x.reshape(-1, x.shape[-1]), *lin[2]) + lin[1][h:]
    s = np.abs(activation(act, pre).astype(np.float32))
    return float(np.quantile(s, q))


@needs_plugin
@pytest.mark.parametrize("isa", ["scalar", "avx2"])
@pytest.mark.parametrize("gated", [0, 1])
@pytest.mark.parametrize("act", ACTS)
def test_kernel_threshold_matches_reference(isa, gated, act, monkeypatch):
    """threshold > 0: ONNX Runtime equals the NumPy reference at M = 1, 3 (gated: the decode path that
    reads up rows of live neurons only) and 16, also with NaN / inf in X, and the skipping really
    changes the output (the thresholded neurons are gone)."""
    rng = np.random.default_rng([gated, ACTS.index(act), 21])
    d, f, h = 72, 203, 21
    ins = random_ffn_inputs(rng, d, f, h, 0.5, bool(gated))
    xs = {m: rng.standard_normal((m, d)).astype(np.float32) for m in (1, 3, 16)}
    q = 0.7 if act == "relu" else 0.4  # relu: above its ~0.5 exact zeros
    t = _quantile_threshold(xs[16], ins, act, gated, q)
    assert t > 0
    try:
        sess = _session(fused_ffn_model(ins, act, gated, 1, t), isa, monkeypatch)
    except Exception as e:  # an ISA this CPU lacks
        if "not supported by this CPU" in str(e):
            pytest.skip(f"{isa} not supported here")
        raise
    bad = xs[3].copy()
    bad[1, 5], bad[2, 7] = np.nan, np.inf
    for m, x in [*xs.items(), (3, bad)]:
        ref = fused_ffn_reference(x, *ins, activation_kind=act, gated=gated, skip=1, threshold=t)
        _close(sess.run(None, {"X": x})[0], ref)
        frac = skipped_fraction(x, *ins, activation_kind=act, gated=gated, threshold=t)
        if m == 16:
            assert q - 0.01 <= frac <= q + 0.05, frac  # the q-quantile of these very rows
            full = fused_ffn_reference(x, *ins, activation_kind=act, gated=gated, skip=0)
            assert np.abs(full - ref).max() > 1e-4  # thresholding is not a no-op


@needs_plugin
@pytest.mark.parametrize(
    "kw,msg",
    [({"skip": 1, "threshold": -0.5}, "threshold must be"), ({"skip": 0, "threshold": 0.5}, "needs skip=1")],
)
def test_bad_threshold_fails_at_creation(kw, msg):
    from onnx import helper

    from ffsplit_export.errors import FormatError

    rng = np.random.default_rng(19)
    ins = random_ffn_inputs(rng, 16, 48, 8, 0.5, False)
    model = fused_ffn_model(ins, "gelu", 0, 0)
    node = model.graph.node[0]
    del node.attribute[:]
    node.attribute.extend(
        [helper.make_attribute(k, v) for k, v in {"activation": "gelu", "gated": 0, **kw}.items()]
    )
    with pytest.raises(Exception, match=msg):
        _session(model)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    with pytest.raises(FormatError, match="threshold"):
        fused_ffn_reference(x, *ins, activation_kind="gelu", gated=0, **kw)


@pytest.fixture(scope="module")
def calibrated_04():
    """Tiny models compressed, fused and calibrated for 40 % activation sparsity (cached per module)."""
    from ffsplit_export.fused import fuse_ffns_, parse_activation_sparsity
    from ffsplit_export.models.tiny import build_tiny
    from ffsplit_export.pipeline import compress

    cache = {}

    def get(name):
        if name not in cache:
            model, pre, _ = build_tiny(name)
            res = compress(model, pre, num_samples=16, progress=False)
            rec = fuse_ffns_(res.model, parse_activation_sparsity("0.4"), batches=res.batches)
            cache[name] = (res, rec)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mpt", "tiny-t5-gated", "tiny-whisper", "tiny-t5"])
def test_calibrated_fraction(name, calibrated_04):
    """On the calibration data, the thresholds skip 0.4 of the light neurons per FFN: within 0.01 at
    calibration (the quantile, thresholds off), within 0.03 with every layer's thresholds on (later
    layers see earlier skipping; measured 0.399-0.405). ReLU (tiny-t5) has more exact zeros than 0.4:
    its thresholds are 0 (exact skipping) and it skips its zero fraction (measured 0.53-0.55)."""
    res, rec = calibrated_04(name)
    assert rec["fused"] == len(rec["thresholds"]) > 0
    for ffn, frac in rec["skipped_fraction"].items():
        if name == "tiny-t5":
            assert rec["thresholds"][ffn] == 0.0 and frac >= 0.4
        else:
            assert rec["thresholds"][ffn] > 0
            assert abs(rec["skipped_fraction_quantile"][ffn] - 0.4) <= 0.01
            assert abs(frac - 0.4) <= 0.03, (ffn, frac)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mpt"])
def test_module_threshold_matches_reference_and_kernel(name, calibrated_04):
    """PyTorch module (what validation, eval and recover compute) == NumPy reference == ONNX Runtime,
    with the calibrated thresholds, at M = 1 and M = 16, on the FFN's calibration inputs."""
    from ffsplit_export.fused import fused_modules

    res, _ = calibrated_04(name)
    mods = fused_modules(res.model)
    xs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: xs.setdefault(mod.name, args[0].detach())) for m in mods
    ]
    with torch.no_grad():
        res.model(**res.batches[0].inputs)
    for hk in hooks:
        hk.remove()
    for m in mods:
        assert m.threshold > 0 and m.skip == 1
        x_all = xs[m.name].reshape(-1, m.up_in_features())
        ins = [t.numpy() for t in m.onnx_inputs()]
        gated = int(m.gate is not None)
        sess = None
        if not _MISSING:
            sess = _session(fused_ffn_model(ins, m.kind, gated, 1, m.threshold))
        for rows in (1, 16):
            x = x_all[:rows].contiguous()
            ref = fused_ffn_reference(
                x.numpy(), *ins, activation_kind=m.kind, gated=gated, skip=1, threshold=m.threshold
            )
            with torch.no_grad():
                np.testing.assert_allclose(m(x).numpy(), ref, rtol=0, atol=1e-5)  # measured <= 3e-8
            if sess is not None:
                _close(sess.run(None, {"X": x.numpy()})[0], ref)
        frac = skipped_fraction(
            x_all.numpy(), *ins, activation_kind=m.kind, gated=gated, threshold=m.threshold
        )
        assert 0.2 < frac < 0.6  # calibrated to 0.4 over all batches; one batch is close


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-opt"])
def test_exact_export_matches_unfused(name, tmp_path):
    """tiny OPT (ReLU): the fused export with exact skipping gives the unfused export's outputs."""
    import onnx

    from ffsplit_export.export.api import export
    from ffsplit_export.export.core import ExportOptions

    outs = {}
    for tag, opts in (("plain", ExportOptions()), ("exact", ExportOptions(activation_sparsity="exact"))):
        man = export(name, tmp_path / tag, options=opts, preset="none", num_samples=4, progress=False)
        outs[tag] = tmp_path / tag / "model.onnx"
        if tag == "exact":
            assert man["fused_ffn"]["fused"] == 2 and not man["fused_ffn"]["kept_subgraph"]
            ops = [n.op_type for n in onnx.load(outs[tag], load_external_data=False).graph.node]
            assert ops.count("FusedFFN") == 2
    rng = np.random.default_rng(0)
    s0 = ort.InferenceSession(str(outs["plain"]), session_options(), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(str(outs["exact"]), session_options(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s0.get_inputs():
        shape = [d if isinstance(d, int) else (1 if "batch" in str(d) else 5) for d in i.shape]
        if "past" in i.name:
            shape[2] = 4
        if i.type == "tensor(int64)":
            feeds[i.name] = rng.integers(0, 50, shape).astype(np.int64)
            if "attention_mask" in i.name:
                feeds[i.name] = np.ones([shape[0], 9], np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    if "position_ids" in feeds:
        feeds["position_ids"] = np.arange(4, 9, dtype=np.int64)[None]
    y0, y1 = s0.run(None, feeds)[0], s1.run(None, feeds)[0]
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-4)


def test_unsupported_formats_keep_the_subgraph():
    """A light format neither fused op takes (lowrank) leaves every FFN as today's subgraph, with
    the reason for both ops (int4 fuses into FusedFFNNBits: tests/test_fused_nbits_export.py)."""
    from ffsplit_export.fused import fuse_ffns_
    from ffsplit_export.models.tiny import build_tiny
    from ffsplit_export.pipeline import compress
    from ffsplit_export.split import SplitConfig

    model, pre, _ = build_tiny("tiny-mpt")
    res = compress(model, pre, config=SplitConfig(light_format="lowrank"), num_samples=4, progress=False)
    rec = fuse_ffns_(res.model, 1)
    assert rec["fused"] == 0 and rec["kept_subgraph"]
    for why in rec["kept_subgraph"].values():
        assert (
            "light format lowrank (the op takes sparse-int8)" in why
            and "FusedFFNNBits: light format lowrank" in why
        )


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-whisper"])
def test_threshold_export_validates(name, tmp_path):
    """``export --activation-sparsity 0.4``: every FFN one FusedFFN node whose ``threshold`` is the
    manifest's; the export's own validation (ONNX Runtime vs the thresholded PyTorch model) passed."""
    import onnx

    from ffsplit_export.export.api import export
    from ffsplit_export.export.core import ExportOptions

    man = export(
        name,
        tmp_path / "out",
        options=ExportOptions(activation_sparsity="0.4"),
        num_samples=8,
        progress=False,
        preset="none",  # the fused op's formats (sparse-int8 light, fp32 heavy), not balanced's int4
    )
    rec = man["fused_ffn"]
    assert rec["activation_sparsity"] == 0.4 and man["options"]["activation_sparsity"] == 0.4
    assert rec["fused"] == len(rec["thresholds"]) and not rec["kept_subgraph"]
    assert abs(rec["skipped_fraction_mean"] - 0.4) <= 0.03
    want = sorted(np.float32(t) for t in rec["thresholds"].values())
    onnx_file = "model.onnx" if name == "tiny-llama" else "encoder_model.onnx"
    g = onnx.load(tmp_path / "out" / onnx_file, load_external_data=False).graph
    got = [
        np.float32(a.f)
        for n in g.node
        if n.op_type == "FusedFFN"
        for a in n.attribute
        if a.name == "threshold"
    ]
    assert got and all(t in want for t in got)
    assert man["validation"]

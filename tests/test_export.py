"""ONNX export of split models: files, validation, runtime, targets, CLI and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import needs_plugin

from ffsplit_export.config import CompressionConfig
from ffsplit_export.errors import CalibrationError, ConfigError
from ffsplit_export.export import ExportOptions, export
from ffsplit_export.manifest import Manifest
from ffsplit_export.split import SplitConfig

SEQ2SEQ_FILES = {
    "encoder_model.onnx",
    "decoder_model.onnx",
    "decoder_with_past_model.onnx",
    "decoder_model_merged.onnx",
}
CASES = [
    ("tiny-t5", SEQ2SEQ_FILES),
    ("tiny-whisper", SEQ2SEQ_FILES),
    ("tiny-mpt", {"model.onnx"}),
    ("tiny-llama", {"model.onnx"}),
    ("tiny-gpt2", {"model.onnx"}),
    ("tiny-opt", {"model.onnx"}),
    ("tiny-bert", {"model.onnx"}),
]


def _export(name, out, target="ort-cpu", **kw):
    options = ExportOptions(target=target, overwrite=True)
    cfg = SplitConfig(**{k: kw.pop(k) for k in list(kw) if k in SplitConfig.__dataclass_fields__})
    kw.setdefault("num_samples", 8)
    kw.setdefault("progress", False)
    return export(name, out, config=cfg, options=options, **kw)


@pytest.mark.slow  # a full optimum export (still run by .ci/run)
@needs_plugin
@pytest.mark.parametrize("name,files", CASES)
def test_export_ort_cpu(name, files, tmp_path):
    out = tmp_path / "out"
    m = _export(name, out)
    assert files <= set(m["onnx_files"]), m["onnx_files"]
    manifest = Manifest.read(out)  # the one reader accepts what export wrote
    assert manifest == json.loads((out / "ffsplit.json").read_text())
    assert manifest.compression_config == CompressionConfig(num_samples=8)  # what _export passed
    assert manifest["target"] == "ort-cpu" and manifest["ffn"]["ffn_size_ratio"] < 0.35
    worst = max(max(r["outputs"].values()) for r in manifest["validation"].values())
    assert worst < 2e-3  # measured <= 3e-6 on every tiny model
    ref = max(max(r["reference_evaluator"].values()) for r in manifest["validation"].values())
    assert ref < 2e-3
    graph = onnx.load(str(out / sorted(files)[0]), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in graph.graph.node}
    if name not in ("tiny-t5", "tiny-whisper"):  # decoder files of seq2seq hold the FFNs in subgraphs
        assert ("ffsplit", "SparseMatMulInt8") in ops
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    if name == "tiny-whisper":
        assert (out / "preprocessor_config.json").exists()


def _generate_inputs(name, pre) -> dict:
    """A fixed prompt: a 1 s tone for Whisper, seven token ids otherwise."""
    if name == "tiny-whisper":
        feats = pre.feature_extractor(
            [np.sin(np.arange(16000) / 9).astype(np.float32)], sampling_rate=16000, return_tensors="pt"
        ).input_features
        return {"input_features": feats}
    ids = torch.tensor([[5, 70, 80, 90, 100, 33, 2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.slow  # a full optimum export (still run by .ci/run)
@needs_plugin
@pytest.mark.parametrize("name", ["tiny-t5", "tiny-mpt", "tiny-whisper", "tiny-llama"])
def test_generate_matches_pytorch(name, tmp_path):
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress
    from ffsplit_export.runtime import load

    out = tmp_path / "out"
    _export(name, out, other_linear="int8")
    model, pre, _ = load_model(name)
    torch_model = compress(model, pre, other_linear="int8", num_samples=8, progress=False).model
    ort_model = load(out)
    inputs = _generate_inputs(name, pre)
    gen = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with torch.no_grad():
        want = torch_model.generate(**inputs, **gen)
    got = ort_model.generate(**inputs, **gen)
    assert torch.equal(torch.as_tensor(got), want), (got, want)


@pytest.mark.slow  # a full optimum export (still run by .ci/run)
@pytest.mark.parametrize("name", ["tiny-t5", "tiny-mpt"])
def test_portable_dense_matches_optimum_export(name, tmp_path):
    """--light-format dense --target portable gives the outputs of a plain optimum export of the original."""
    import onnxruntime as ort
    from optimum.exporters.onnx import onnx_export_from_model

    from ffsplit_export.models.tiny import build_tiny

    out = tmp_path / "ffsplit"
    m = _export(name, out, target="portable", light_format="dense")
    domains = {n.domain for f in m["onnx_files"] for n in onnx.load(str(out / f)).graph.node}
    assert domains <= {"", "com.microsoft"}
    model, _, task = build_tiny(name)
    onnx_export_from_model(model, tmp_path / "plain", task=task, do_validation=False)
    fname = "encoder_model.onnx" if name == "tiny-t5" else "model.onnx"
    a = ort.InferenceSession(str(out / fname), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "plain" / fname), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in a.get_inputs():
        shape = [d if isinstance(d, int) else (2 if "batch" in str(d) else 5) for d in i.shape]
        if "past" in i.name:
            shape[2] = 0 if len(shape) == 4 else shape[2]
        feeds[i.name] = (
            np.random.default_rng(0).integers(3, 200, shape)
            if "int" in i.type
            else np.zeros(shape, np.float32)
        )
        if "mask" in i.name:
            feeds[i.name] = np.ones(shape, np.int64)
    ya, yb = a.run(None, feeds), b.run(None, feeds)
    diff = max(float(np.abs(x - y).max()) for x, y in zip(ya, yb))
    assert diff < 1e-4, diff  # measured ~1e-6 (summation order of the split)


def test_tensorrt_target_nodes(tmp_path):
    out = tmp_path / "out"
    _export("tiny-mpt", out, target="tensorrt")
    g = onnx.load(str(out / "model.onnx"))
    plug = [n for n in g.graph.node if n.domain == "ffsplit"]
    assert plug and all(n.op_type == "SparseMatMulInt8" for n in plug)
    for n in plug:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"plugin_namespace": b"ffsplit", "plugin_version": b"1", "aot": 1}
    assert {n.domain for n in g.graph.node} <= {"", "ffsplit"}
    onnx.checker.check_model(g)
    from onnx.reference import ReferenceEvaluator

    from ffsplit_export.ops import reference_ops

    ev = ReferenceEvaluator(g, new_ops=reference_ops())
    feeds = {"input_ids": np.array([[3, 4, 5]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    for i in g.graph.input:
        if i.name.startswith("past"):
            feeds[i.name] = np.zeros((1, 4, 0, 16), np.float32)
    logits = ev.run(["logits"], feeds)[0]
    assert logits.shape == (1, 3, 384) and np.isfinite(logits).all()


def test_bad_input_and_atomic_output(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="--overwrite"):
        export("tiny-mpt", out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(ConfigError, match="MatMulNBits"):
        export("tiny-mpt", tmp_path / "x", options=ExportOptions(target="tensorrt"), other_linear="int4")
    with pytest.raises(ConfigError, match="GatherBlockQuantized"):
        export("tiny-mpt", tmp_path / "x", options=ExportOptions(target="tensorrt"), embedding="int8")
    with pytest.raises(ConfigError, match="--embedding"):
        export("tiny-mpt", tmp_path / "x", embedding="int3", progress=False)
    with pytest.raises(ConfigError, match="--target"):
        ExportOptions(target="cuda")
    # an export that fails half-way leaves nothing behind
    with pytest.raises(CalibrationError, match="--num-samples=0"):
        export("tiny-mpt", tmp_path / "y", config=SplitConfig(prune_method="sparsegpt"), num_samples=0)
    assert not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # a full optimum export (still run by .ci/run)
@needs_plugin
def test_cli_and_optimum_cli_write_the_same_files(tmp_path):
    bin_dir = Path(sys.executable).parent
    args = ["tiny-mpt", "--num-samples", "4", "--quiet"]
    a = subprocess.run(
        [sys.executable, "-m", "ffsplit_export.cli", "export", args[0], str(tmp_path / "a"), *args[1:]],
        capture_output=True,
        text=True,
    )
    assert a.returncode == 0, a.stderr[-2000:]
    cli = bin_dir / "optimum-cli"
    if not cli.exists():
        pytest.skip("optimum-cli not installed")
    b = subprocess.run(
        [str(cli), "export", "ffsplit", args[0], str(tmp_path / "b"), *args[1:]],
        capture_output=True,
        text=True,
    )
    if "invalid choice: 'ffsplit'" in b.stderr:
        pytest.skip(
            "ffsplit not registered with optimum-cli (package not installed, e.g. running from source)"
        )
    assert b.returncode == 0, b.stderr[-2000:]
    fa = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert fa == sorted(p.name for p in (tmp_path / "b").iterdir())
    ma = onnx.load(str(tmp_path / "a" / "model.onnx"))
    mb = onnx.load(str(tmp_path / "b" / "model.onnx"))
    assert [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]


def test_load_tensorrt_without_tensorrt_says_what_is_missing(tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    from ffsplit_export.errors import FFSplitError
    from ffsplit_export.runtime import load

    out = tmp_path / "out"
    _export("tiny-mpt", out, target="tensorrt")
    with pytest.raises(FFSplitError, match="(?i)tensorrt"):
        load(out, provider="tensorrt")
    with pytest.raises(ConfigError, match="provider='tensorrt'"):
        load(out)


@pytest.mark.slow  # a full optimum export (still run by .ci/run)
@needs_plugin
@pytest.mark.parametrize("name", ["tiny-t5", "tiny-whisper", "tiny-llama", "tiny-gpt2"])
def test_embedding_int8(name, tmp_path):
    """--embedding int8: GatherBlockQuantized in the graph, validated in ORT and the reference
    evaluator, greedy tokens equal to PyTorch, and fewer bytes than the fp32 table."""
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress
    from ffsplit_export.runtime import load

    out = tmp_path / "out"
    m = _export(name, out, other_linear="int8", embedding="int8")
    assert (
        m["embedding"]["format"] == "int8" and m["embedding"]["bytes"] < 0.3 * m["embedding"]["dense_bytes"]
    )
    worst = max(max(r["outputs"].values()) for r in m["validation"].values())
    ref = max(max(r["reference_evaluator"].values()) for r in m["validation"].values())
    assert worst < 2e-3 and ref < 2e-3, (worst, ref)
    ops = set()
    for f in m["onnx_files"]:
        g = onnx.load(str(out / f), load_external_data=False)
        ops |= {(n.domain, n.op_type) for n in g.graph.node}
        for n in g.graph.node:  # the merged decoder keeps its nodes in If branches
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    ops |= {(x.domain, x.op_type) for x in a.g.node}
    assert ("com.microsoft", "GatherBlockQuantized") in ops
    model, pre, _ = load_model(name)
    torch_model = compress(
        model, pre, other_linear="int8", embedding="int8", num_samples=8, progress=False
    ).model
    inputs = _generate_inputs(name, pre)
    gen = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        want = torch_model.generate(**inputs, **gen)
    assert torch.equal(torch.as_tensor(load(out).generate(**inputs, **gen)), want)


def test_quantized_embedding_matches_its_table():
    from ffsplit_export.linear import QuantizedEmbedding

    torch.manual_seed(0)
    w = torch.randn(50, 48)
    q = QuantizedEmbedding(w)
    assert q.block_size == 16 and q.data.dtype == torch.uint8 and q.scales.shape == (50, 3)
    blocks = w.reshape(50, 3, 16).abs().amax(-1, keepdim=True) / 127  # one step of each block
    err = (q.weight - w).reshape(50, 3, 16).abs()
    assert (err <= blocks / 2 + 1e-7).all()
    ids = torch.tensor([[0, 7, 49, 7]])
    assert torch.equal(q(ids), q.weight[ids])
    with pytest.raises(ConfigError, match="divisible by 16"):
        QuantizedEmbedding(torch.randn(4, 20))

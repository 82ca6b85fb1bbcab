"""The post-export fusion pass (export/fusion.py): RMSNorm / rotary / attention -> ONNX Runtime contrib ops.

Each case exports a tiny model with the pass on (the ort-cpu default) and off, and checks the fused
op types, that our ffsplit / MatMulNBits nodes and the graph's interface are unchanged, and the fused
graph's outputs against the compressed PyTorch model on inputs the fused attention is made for
(no padding: batch 2 decoding one token, batch 1 with several new tokens after a cache).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import needs_plugin

from ffsplit_export.errors import ConfigError
from ffsplit_export.export import ExportOptions

KW = dict(other_linear="int4", num_samples=8, progress=False)  # light sparse-int8: ffsplit nodes stay
PRESET = "none"  # the exact path (a preset may set accuracy_level 4)


def _export(name, out, **opts):
    from ffsplit_export.export.api import export

    options = ExportOptions(target="ort-cpu", overwrite=True, **opts)
    return export(name, out, options=options, preset=PRESET, **KW)


def _ops(path) -> Counter:
    g = onnx.load(str(path), load_external_data=False).graph
    return Counter((n.domain or "ai.onnx", n.op_type) for n in g.node)


def _kept(path) -> Counter:
    """Our nodes and the quantized matmuls, with their weights: the pass must not touch them."""
    g = onnx.load(str(path), load_external_data=False).graph
    return Counter(
        (n.domain, n.op_type, tuple(n.input[1:]))
        for n in g.node
        if n.domain == "ffsplit" or n.op_type == "MatMulNBits"
    )


def _interface(path):
    g = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in g.input], [o.name for o in g.output]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = tmp_path_factory.mktemp("fusion")
    fused, plain = base / "fused", base / "plain"
    return _export("tiny-llama", fused), fused, _export("tiny-llama", plain, fuse_attention=False), plain


def _torch_model():
    from ffsplit_export.models.loading import load_model
    from ffsplit_export.pipeline import compress

    model, pre, _ = load_model("tiny-llama")
    return compress(model, pre, **KW).model.eval()  # preset "none": the fields' own defaults


def _session(path):
    import onnxruntime as ort

    from ffsplit_export.runtime import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def _run_both(model, sess, batch: int, past: int, new: int, seed: int):
    """ONNX Runtime and PyTorch on the same unpadded inputs: [(name, ort, torch)] per output."""
    from transformers import DynamicCache

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache = [
        (torch.randn(batch, kv, past, hd, generator=g), torch.randn(batch, kv, past, hd, generator=g))
        for _ in range(cfg.num_hidden_layers)
    ]
    ids = torch.randint(3, cfg.vocab_size, (batch, new), generator=g)
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    pos = torch.arange(past, past + new).expand(batch, new)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i, (k, v) in enumerate(cache):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, feeds)))
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=DynamicCache.from_legacy_cache(tuple(cache)),
            use_cache=True,
        )
    want = {"logits": out.logits.numpy()}
    for i, (k, v) in enumerate(out.past_key_values.to_legacy_cache()):
        want[f"present.{i}.key"], want[f"present.{i}.value"] = k.numpy(), v.numpy()
    return [(n, got[n], want[n]) for n in names]


@pytest.mark.slow  # two full optimum exports (still run by .ci/run)
@needs_plugin
def test_llama_fuses_and_keeps_interface(llama):
    m_fused, fused, m_plain, plain = llama
    ops, old = _ops(fused / "model.onnx"), _ops(plain / "model.onnx")
    layers = 2  # tiny-llama
    assert ops["com.microsoft", "GroupQueryAttention"] == layers
    assert ops["com.microsoft", "SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["ai.onnx", "SimplifiedLayerNormalization"] == 1  # the first norm (no residual yet)
    for gone in ("Softmax", "Pow", "Sqrt", "Neg", "Expand"):
        assert ops["ai.onnx", gone] == 0, gone
    assert sum(ops.values()) < sum(old.values()) / 4  # measured 71 vs 657 nodes
    # off: optimum's graph, none of the contrib ops the pass writes
    assert not {op for (dom, op) in old if op in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization")}
    assert old["ai.onnx", "Softmax"] == layers and old["ai.onnx", "Pow"] == 2 * layers + 1
    assert _kept(fused / "model.onnx") == _kept(plain / "model.onnx")
    assert _kept(fused / "model.onnx")[next(iter(_kept(fused / "model.onnx")))] >= 1
    assert any(d == "ffsplit" for (d, _o, _i) in _kept(fused / "model.onnx"))
    assert _interface(fused / "model.onnx") == _interface(plain / "model.onnx")
    assert m_fused["options"]["fuse_attention"] is True and m_plain["options"]["fuse_attention"] is False
    assert m_fused["graph_fusion"]["model.onnx"]["GroupQueryAttention"] == layers
    assert m_plain["graph_fusion"] == {"enabled": False}
    v = m_fused["validation"]["model.onnx"]
    assert v["inputs"] == {"batch_size": 1, "attention_mask": "all ones"}
    assert max(v["outputs"].values()) < 2e-5  # measured 2.1e-7
    assert max(v["reference_evaluator"].values()) < 2e-5  # NumPy reference of the unfused graph


@pytest.mark.slow
@needs_plugin
@pytest.mark.parametrize("batch,past,new", [(2, 5, 1), (3, 40, 1), (1, 6, 4), (2, 0, 7)])
def test_llama_fused_matches_pytorch(llama, batch, past, new):
    _, fused, _, _ = llama
    model, sess = _torch_model(), _session(fused / "model.onnx")
    for name, got, want in _run_both(model, sess, batch, past, new, seed=batch * 100 + past):
        assert got.shape == want.shape, name
        tol = 1e-4 + 5e-4 * float(np.abs(want).max())  # the export's exact-path tolerance
        assert float(np.abs(got - want).max()) <= tol, (name, float(np.abs(got - want).max()))


@pytest.mark.slow
@needs_plugin
def test_llama_fused_generate_matches_pytorch(llama):
    """ORTModelForCausalLM.generate on the fused graph: batch 2, prompts of equal length (no padding)."""
    from ffsplit_export.runtime import load

    _, fused, _, _ = llama
    model = _torch_model()
    ids = torch.tensor([[5, 70, 80, 90, 100, 33, 2], [40, 41, 42, 43, 44, 45, 46]])
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), **gen)
    got = load(fused).generate(ids, attention_mask=torch.ones_like(ids), **gen)
    assert torch.equal(torch.as_tensor(got), want), (got, want)


@pytest.mark.slow
@needs_plugin
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-mpt"])
def test_no_match_leaves_graph_as_exported(name, tmp_path):
    """LayerNorm and ALiBi / learned positions: nothing to fuse, the file is byte-identical."""
    m = _export(name, tmp_path / "on")
    _export(name, tmp_path / "off", fuse_attention=False)
    stats = m["graph_fusion"]["model.onnx"]
    assert not any(
        stats[op] for op in ("GroupQueryAttention", "SimplifiedLayerNormalization", "RotaryEmbedding")
    )
    assert stats["nodes_after"] == stats["nodes_before"]
    assert (tmp_path / "on" / "model.onnx").read_bytes() == (tmp_path / "off" / "model.onnx").read_bytes()


def test_fuse_attention_option():
    assert ExportOptions().fuse_attention is True  # on for ort-cpu
    assert ExportOptions(target="portable").fuse_attention is False
    with pytest.raises(ConfigError, match="ort-cpu"):
        ExportOptions(target="portable", fuse_attention=True)
    with pytest.raises(ConfigError, match="fuse_attention"):
        ExportOptions(fuse_attention="yes")


def test_cli_no_fuse_attention():
    import argparse

    from ffsplit_export.cli.options import add_export_arguments, export_options_from_args

    p = argparse.ArgumentParser()
    add_export_arguments(p)
    assert export_options_from_args(p.parse_args(["tiny-llama", "/tmp/x"])).fuse_attention is True
    off = p.parse_args(["tiny-llama", "/tmp/x", "--no-fuse-attention"])
    assert export_options_from_args(off).fuse_attention is False
